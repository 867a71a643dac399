"""The one reload path, for the single process and the supervisor alike.

A reload reads the file and every key file it names once, off the event loop
(``config.load_pinned``), validates, and only then hands the parsed configuration, its text
and the key files' contents to the process's ``apply`` step. What the step reports back
(problems: a worker that could not apply it and was restarted) reaches the caller of
``POST /reload`` and the log; the metrics count every reload, applied or refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..config import Config, ConfigError, load_pinned
from ..routing.table import TableDiff
from .observe import ControlEvents

log = logging.getLogger("stickyproxy")


@dataclass(frozen=True)
class Pinned:
    """A configuration as read once: its text, the parsed settings and the key files'
    contents, which is what workers are handed so that all of them apply the same."""

    text: str
    config: Config
    files: dict[str, str]


class ReloadRefused(Exception):
    """The apply step could not take the configuration (the process keeps the old one)."""


# The apply step: (pinned configuration, source) -> (what changed, problems).
ApplyStep = Callable[[Pinned, str], Awaitable[tuple[TableDiff, list[str]]]]


class Reloader:
    def __init__(self, path: str | None, control: ControlEvents, apply: ApplyStep):
        self.path = path
        self.control = control
        self.apply = apply
        self.lock = asyncio.Lock()

    async def reload(self, source: str) -> tuple[bool, list[str]]:
        """Read, validate and apply the configuration file. (applied, problems): when not
        applied, the problems say why and the running configuration stays; when applied,
        they name anything that applied it only in part."""
        async with self.lock:
            if not self.path:
                return False, ["no configuration file to reload"]
            try:
                text, new, files = await asyncio.get_running_loop().run_in_executor(
                    None, load_pinned, self.path)
            except ConfigError as e:
                self.control.reloaded(False)
                log.error("reload (%s) rejected; keeping the running configuration: %s",
                          source, "; ".join(e.errors))
                return False, e.errors
            try:
                diff, problems = await self.apply(Pinned(text, new, files), source)
            except ReloadRefused as e:
                self.control.reloaded(False)
                log.error("reload (%s) rejected: %s", source, e)
                return False, [str(e)]
            self.control.reloaded(True, ring_changed=diff.ring_changed)
            if problems:
                log.error("reload (%s): %s", source, "; ".join(problems))
            n = len(new.backends)
            log.info("reload (%s) applied: ring %s -> %s, %d backend%s%s", source,
                     diff.ring_before, diff.ring_after, n, "" if n == 1 else "s",
                     describe(diff))
            return True, problems


def describe(diff: TableDiff) -> str:
    parts = [f"{what} {', '.join(ids)}" for what, ids in
             (("added", diff.added), ("removed", diff.removed),
              ("readdressed", diff.readdressed), ("reweighted", diff.reweighted)) if ids]
    return "; " + "; ".join(parts) if parts else ""
