"""Gradual failback (stickyproxy.routing.ramp): who has returned to a ramping backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from hashlib import blake2b

import pytest

from stickyproxy.routing import ramp
from stickyproxy.routing.ramp import POINT_SPACE, Ramp, key_point, progress, returned

KEYS = [f"user-{i}" for i in range(20_000)]
POINTS = [key_point(k) for k in KEYS]
HALF = POINT_SPACE // 2
# Binomial spread of a share over 20k keys is at most 0.0036 (p = 0.5): 5 sigma.
SHARE_TOLERANCE = 0.018


@pytest.mark.parametrize(
    "start, duration, now, expected",
    [
        (100.0, 30.0, 100.0, 0.0),  # at the start
        (100.0, 30.0, 50.0, 0.0),  # before it (a clock behind the one that started it)
        (100.0, 30.0, 115.0, 0.5),
        (100.0, 30.0, 106.0, 0.2),
        (100.0, 30.0, 130.0, 1.0),  # at the end
        (100.0, 30.0, 1e9, 1.0),  # long after
        (100.0, 0.0, 100.0, 1.0),  # no ramp
        (100.0, 0.0, 0.0, 1.0),
    ],
)
def test_progress_is_linear_and_clamped(start, duration, now, expected):
    assert progress(start, duration, now) == pytest.approx(expected)
    assert Ramp(start, duration).progress(now) == pytest.approx(expected)


@pytest.mark.parametrize(
    "point, now, expected",
    [
        (0, 100.0, False),  # nobody at the start, not even the lowest point
        (0, 100.001, True),  # the lowest point returns first
        (POINT_SPACE - 1, 129.999, False),  # the highest point returns last
        (POINT_SPACE - 1, 130.0, True),  # everybody at the end
        (HALF - 1, 115.0, True),  # below the threshold at half way
        (HALF, 115.0, False),  # on the threshold: not yet (strictly below)
        (HALF, 115.001, True),
        (HALF, 99.0, False),  # before the start
        (HALF, 1e9, True),
    ],
)
def test_a_key_returns_once_progress_passes_its_point(point, now, expected):
    r = Ramp(100.0, 30.0)
    assert returned(point, 100.0, 30.0, now) is expected
    assert r.returned(point, now) is expected


@pytest.mark.parametrize("duration", [0.0, -0.0])
def test_zero_duration_means_no_ramp(duration):
    assert all(returned(p, 10.0, duration, 10.0) for p in (0, HALF, POINT_SPACE - 1))
    assert not Ramp(10.0, duration).active(10.0)


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_duration_is_refused(bad):
    with pytest.raises(ValueError, match="ramp duration"):
        Ramp(0.0, bad)


def test_active_until_the_end():
    r = Ramp(5.0, 10.0)
    assert [r.active(t) for t in (4.0, 5.0, 14.999, 15.0, 16.0)] == [True, True, True, False, False]


def test_key_point_is_a_personalised_blake2b_pinned_across_releases():
    # Every proxy of a fleet, of any release, must put a key at the same point.
    assert key_point("user-1") == 1898045375733279383
    for k in KEYS[:200]:
        ref = blake2b(k.encode(), digest_size=8, person=b"sticky-ramp-v1").digest()
        assert key_point(k) == int.from_bytes(ref, "big")
    assert key_point("é") != key_point("e")


def test_points_are_spread_over_the_whole_space():
    assert min(POINTS) < POINT_SPACE // 100
    assert max(POINTS) > POINT_SPACE - POINT_SPACE // 100
    assert len(set(POINTS)) == len(POINTS)


def test_none_has_returned_at_the_start_and_every_key_at_the_end():
    r = Ramp(1000.0, 30.0)
    assert not any(r.returned(p, 1000.0) for p in POINTS)
    assert all(r.returned(p, 1030.0) for p in POINTS)


@pytest.mark.parametrize("elapsed", [1.5, 3.0, 7.5, 15.0, 22.5, 27.0, 29.0])
def test_share_returned_follows_progress(elapsed):
    r = Ramp(1000.0, 30.0)
    now = 1000.0 + elapsed
    share = sum(r.returned(p, now) for p in POINTS) / len(POINTS)
    assert share == pytest.approx(r.progress(now), abs=SHARE_TOLERANCE)


def test_a_returned_key_stays_returned():
    r = Ramp(0.0, 30.0)
    before: set[int] = set()
    for now in [*(tenth / 10 for tenth in range(0, 300, 7)), 30.0]:
        after = {i for i, p in enumerate(POINTS) if r.returned(p, now)}
        assert before <= after
        before = after
    assert len(before) == len(POINTS)


def test_return_time_is_when_the_key_returns():
    r = Ramp(50.0, 20.0)
    for p in POINTS[:2000]:
        t = r.return_time(p)
        assert 50.0 <= t <= 70.0
        assert not r.returned(p, t - 1e-6)
        assert r.returned(p, t + 1e-6)


_OTHER_PROCESS = """
import json, sys
from stickyproxy.routing.ramp import Ramp, key_point
keys, start, duration, instants = json.load(sys.stdin)
r = Ramp(start, duration)
print(json.dumps([[k for k in keys if r.returned(key_point(k), t)] for t in instants]))
"""


def test_two_proxies_agree_on_every_key_at_the_same_instant():
    """A second process with another hash seed, as another proxy of the fleet would be."""
    keys = KEYS[:5000]
    start, duration, instants = (
        1_700_000_000.0,
        30.0,
        [1_700_000_000.0, 1_700_000_004.25, 1_700_000_015.0, 1_700_000_029.9, 1_700_000_030.0],
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS],
        env=env,
        check=True,
        input=json.dumps([keys, start, duration, instants]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    theirs = json.loads(out.stdout)
    r = Ramp(start, duration)
    ours = [[k for k in keys if r.returned(key_point(k), t)] for t in instants]
    assert ours == theirs
    assert len(ours[0]) == 0 and len(ours[-1]) == len(keys)
    assert 0 < len(ours[2]) < len(keys)


def test_module_functions_and_the_class_agree():
    r = Ramp(3.0, 9.0)
    for now in (2.0, 3.0, 4.5, 7.0, 11.9, 12.0):
        assert [r.returned(p, now) for p in POINTS[:500]] == [
            ramp.returned(p, 3.0, 9.0, now) for p in POINTS[:500]
        ]
