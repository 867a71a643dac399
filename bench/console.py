"""Progress lines, each stamped with the time since the benchmark started."""

from __future__ import annotations

import time

_started = time.monotonic()


def restart_clock() -> None:
    global _started
    _started = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - _started


def progress(message: str) -> None:
    minutes, seconds = divmod(int(elapsed()), 60)
    print(f"[{minutes:02d}:{seconds:02d}] {message}", flush=True)
