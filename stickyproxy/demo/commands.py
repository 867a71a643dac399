"""The demo's commands from a terminal: single key presses in the live view (cbreak mode,
restored on exit), whole lines with ``--no-ui``. Nothing is read unless stdin is a TTY."""

from __future__ import annotations

import asyncio
import os
import sys
import termios
import tty
from collections.abc import Callable

# Longest line kept while waiting for its end.
MAX_LINE = 256


class CommandInput:
    def __init__(self, on_command: Callable[[str], None], *, keys: bool) -> None:
        self.on_command = on_command
        self.keys = keys
        self.fd: int | None = None
        self._saved: list | None = None
        self._pending = b""
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Start reading; False when stdin is not a terminal (no commands then)."""
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            return False
        if not os.isatty(fd):
            return False
        self.fd = fd
        if self.keys:
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)
        return True

    def _readable(self) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 1024)
        except OSError:
            data = b""
        if not data:
            self._detach()
            return
        if self.keys:
            for ch in data.decode("utf-8", "ignore"):
                if not ch.isspace():
                    self.on_command(ch.lower())
            return
        self._pending = (self._pending + data)[-MAX_LINE:]
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            text = line.decode("utf-8", "ignore").strip().lower()
            if text:
                self.on_command(text)

    def _detach(self) -> None:
        if self._loop is not None and self.fd is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None

    def stop(self) -> None:
        self._detach()
        if self._saved is not None and self.fd is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
