"""CPU time of a process tree, from /proc: utime and stime of a process and its descendants."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# Fields of /proc/PID/stat after the ")" that closes the command name (0-based):
# state is 0, ppid 1, utime 11, stime 12.
PPID_FIELD, UTIME_FIELD, STIME_FIELD = 1, 11, 12


@dataclass(frozen=True)
class CpuTimes:
    user_s: float
    system_s: float

    @property
    def total_s(self) -> float:
        return self.user_s + self.system_s

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user_s - other.user_s, self.system_s - other.system_s)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[PPID_FIELD]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and every process descending from it, as they are now."""
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def available() -> bool:
    return (PROC / "self" / "stat").exists()


def tree_times(root: int) -> CpuTimes:
    """CPU time used so far by `root` and its live descendants (all threads of each)."""
    user = system = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[UTIME_FIELD])
            system += int(fields[STIME_FIELD])
    return CpuTimes(user / CLOCK_TICKS, system / CLOCK_TICKS)


class CpuMeter:
    """CPU used by a process tree between `start()` and `stop()`; zero when /proc is absent."""

    def __init__(self, root: int | None):
        self.root = root if available() else None
        self._before = CpuTimes(0.0, 0.0)

    def start(self) -> None:
        if self.root is not None:
            self._before = tree_times(self.root)

    def stop(self) -> CpuTimes:
        if self.root is None:
            return CpuTimes(0.0, 0.0)
        return tree_times(self.root) - self._before


def per_request_us(used: CpuTimes, requests: int) -> dict[str, float | None]:
    if requests <= 0 or used.total_s <= 0:
        return {"cpu_us": None, "user_us": None, "system_us": None}
    scale = 1e6 / requests
    return {
        "cpu_us": used.total_s * scale,
        "user_us": used.user_s * scale,
        "system_us": used.system_s * scale,
    }
