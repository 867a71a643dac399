"""Cleans up after a demo that died without doing so itself (a crash, SIGKILL, a segfault).

    python -m stickyproxy.demo.watchdog WORKDIR      (started by the demo, never by hand)

The demo starts this process in a session of its own (so Ctrl-C or a signal to the demo's
process group does not reach it) and keeps the write end of a pipe to its stdin. It writes
``pgid N`` for each child process group it starts, and ``bye`` once it has stopped them and
removed its temporary directory itself. When stdin closes without ``bye``, the demo is gone:
this process SIGKILLs every group it was told of (the children have usually died already of
their parent-death signal; a group also holds anything they started) and removes WORKDIR.

Standard library only, and nothing else of the package: it must start fast and keep working
whatever state the demo's imports were in.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

# Attempts at removing the directory while killed processes still release it.
RMTREE_ATTEMPTS = 5
RMTREE_PAUSE = 0.1


class Watch:
    """What the demo has said so far: the groups to kill, and whether it said goodbye."""

    def __init__(self) -> None:
        self.groups: list[int] = []
        self.done = False

    def feed(self, line: str) -> None:
        word, _, arg = line.strip().partition(" ")
        if word == "pgid" and arg.isdigit() and int(arg) > 1:
            self.groups.append(int(arg))
        elif word == "bye":
            self.done = True


def clean_up(groups: list[int], workdir: str) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for _ in range(RMTREE_ATTEMPTS):
        shutil.rmtree(workdir, ignore_errors=True)
        if not os.path.exists(workdir):
            return
        time.sleep(RMTREE_PAUSE)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m stickyproxy.demo.watchdog WORKDIR", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    watch = Watch()
    for line in sys.stdin:
        watch.feed(line)
        if watch.done:
            return 0
    clean_up(watch.groups, argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
