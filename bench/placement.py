"""CPU placement for latency runs: the proxy under test on cores of its own.

A latency figure should be the proxy's, not the load generator's. On a separate machine the
load client and the backends would not compete with the proxy for cores; on one machine the
closest thing is CPU affinity: the proxy's processes on `workers` cores that nothing else of
the benchmark uses, the client and the backends on the remaining ones. Every target, NGINX and
HAProxy included, is placed the same way. When there are not enough cores for that (say two
workers on two CPUs), nothing is pinned and the run says so: its latencies then include
waiting for a core shared with the client.

`plan` is pure; `pin` and `pin_self` are the thin adapters over sched_setaffinity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .cpu import PROC, process_tree

# The load client and the backends need a core between them.
LOAD_CORES_MIN = 1


@dataclass(frozen=True)
class Placement:
    proxy: tuple[int, ...]
    load: tuple[int, ...]

    def describe(self) -> str:
        return (
            f"proxy on CPU {_cpus(self.proxy)}, load client and backends on CPU {_cpus(self.load)}"
        )


def _cpus(cores: Sequence[int]) -> str:
    return ",".join(str(c) for c in cores)


def plan(cores: Sequence[int], workers: int) -> Placement | None:
    """Give the proxy the last `workers` of `cores` and everything else the rest, or None
    when that would leave the load fewer than LOAD_CORES_MIN cores."""
    ordered = sorted(set(cores))
    if workers < 1 or len(ordered) - workers < LOAD_CORES_MIN:
        return None
    return Placement(proxy=tuple(ordered[-workers:]), load=tuple(ordered[:-workers]))


def available_cores() -> tuple[int, ...]:
    """The cores this process may run on (its affinity mask), or () where that is unknown."""
    getter = getattr(os, "sched_getaffinity", None)
    return tuple(sorted(getter(0))) if getter is not None else ()


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in (PROC / str(pid) / "task").iterdir()]
    except OSError:
        return []


def _pin_threads(pid: int, cores: Sequence[int]) -> None:
    for tid in _threads(pid):
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:  # gone since it was listed
            pass


def pin(roots: Iterable[int], cores: Sequence[int]) -> None:
    """Bind every thread of every process under each of `roots` to `cores`."""
    for root in roots:
        for pid in process_tree(root):
            _pin_threads(pid, cores)


def pin_self(cores: Sequence[int]) -> None:
    """Bind this process's own threads (the load client runs in it), not its children."""
    _pin_threads(os.getpid(), cores)
