"""The benchmark's CPU placement for latency runs (bench/placement.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import placement
from bench.cpu import process_tree
from bench.placement import Placement

START_TIMEOUT_S = 10


@pytest.mark.parametrize(
    ("cores", "workers", "expected"),
    [
        # the proxy takes the last cores, the load client and the backends the rest
        ((0, 1), 1, Placement(proxy=(1,), load=(0,))),
        ((0, 1, 2, 3), 1, Placement(proxy=(3,), load=(0, 1, 2))),
        ((0, 1, 2, 3), 2, Placement(proxy=(2, 3), load=(0, 1))),
        ((3, 1, 2), 2, Placement(proxy=(2, 3), load=(1,))),
        ((0, 1, 2), 2, Placement(proxy=(1, 2), load=(0,))),
        # not enough cores to keep the load off the proxy's: nothing is pinned
        ((0, 1), 2, None),
        ((0,), 1, None),
        ((), 1, None),
        ((0, 1), 0, None),
    ],
)
def test_plan_gives_the_proxy_cores_of_its_own_or_none(cores, workers, expected):
    assert placement.plan(cores, workers) == expected


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(placement.available_cores()) < 2,
    reason="needs sched_setaffinity and two CPUs",
)
def test_pin_binds_a_process_and_its_children():
    core = placement.available_cores()[-1]
    script = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'input()'])"
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    try:
        tree: list[int] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(tree) < 2 and time.monotonic() < deadline:  # poll until the child exists
            tree = process_tree(parent.pid)
            time.sleep(0.01)
        assert len(tree) == 2, "the child process did not start"
        placement.pin([parent.pid], [core])
        assert all(os.sched_getaffinity(pid) == {core} for pid in tree)
    finally:
        parent.communicate(b"\n", timeout=10)
