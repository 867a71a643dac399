"""The one reload path, for the single process and the supervisor alike.

A reload reads the file and every key file it names once, off the event loop
(``config.load_pinned``), validates, and only then hands the parsed configuration, its text
and the key files' contents to the process's ``apply`` step. What the step reports back
(problems: a worker that could not apply it and was restarted) reaches the caller of
``POST /reload`` and the log; the metrics count every reload, applied or refused.

With ``[discovery]`` the backends are not in the file: the discovery source's set
(``members``) is applied through the same path (``set_members``), and a file reload keeps
the members discovered last. Every applied change is logged with the share of the key space
whose owner it changed (routing/ring.py ``moved_share``, what ``stickyproxy plan`` reports).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config import Backend, Config, ConfigError, load_pinned
from ..routing.ring import moved_share
from ..routing.table import TableDiff
from .observe import ControlEvents

log = logging.getLogger("stickyproxy")

# How often ``run --watch-config`` looks at the configuration file and the key files it
# names (one stat each): a change is applied within this much of being written.
WATCH_INTERVAL = 1.0


@dataclass(frozen=True)
class Pinned:
    """A configuration as read once: its text, the parsed settings and the key files'
    contents, which is what workers are handed so that all of them apply the same."""

    text: str
    config: Config
    files: dict[str, str]
    members: tuple[Backend, ...] | None = None  # discovered backends, in place of the file's

    def with_members(self, members: tuple[Backend, ...]) -> Pinned:
        return Pinned(
            self.text, dataclasses.replace(self.config, backends=members), self.files, members
        )

    def message(self) -> dict[str, Any]:
        """What a worker is sent to apply the same configuration (workers.py)."""
        msg: dict[str, Any] = {"text": self.text, "path": self.config.source, "files": self.files}
        if self.members is not None:
            msg["backends"] = [dataclasses.asdict(b) for b in self.members]
        return msg


def from_message(
    msg: dict[str, Any],
    read: Callable[[str, str | None, dict[str, str]], Config],
) -> Config:
    """The configuration a worker applies from a ``Pinned.message``."""
    cfg = read(msg["text"], msg.get("path"), msg.get("files") or {})
    if "backends" in msg:
        cfg = dataclasses.replace(cfg, backends=tuple(Backend(**b) for b in msg["backends"]))
    return cfg


class ReloadRefused(Exception):
    """The apply step could not take the configuration (the process keeps the old one)."""


# The apply step: (pinned configuration, source) -> (what changed, problems).
ApplyStep = Callable[[Pinned, str], Awaitable[tuple[TableDiff, list[str]]]]


class Reloader:
    def __init__(
        self,
        path: str | None,
        control: ControlEvents,
        apply: ApplyStep,
        current: Pinned | None = None,
    ):
        self.path = path
        self.control = control
        self.apply = apply
        self.lock = asyncio.Lock()
        self.current = current
        self.members: tuple[Backend, ...] | None = None

    def _signatures(
        self,
        everything: bool = True,
    ) -> tuple[tuple[str, tuple[int, int, int, int] | None], ...]:
        """(path, (device, inode, size, mtime)) of the file and the key files it named, or
        (``everything`` false) of the TLS certificates, keys and CAs only; follows
        symlinks, so a Kubernetes ConfigMap's ``..data`` swap is a change."""
        paths = [self.path] if self.path and everything else []
        if self.current is not None:
            paths += sorted(self.current.files) if everything else tls_files(self.current.config)
        out: list[tuple[str, tuple[int, int, int, int] | None]] = []
        for path in paths:
            try:
                st = os.stat(path)
                out.append((path, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)))
            except OSError:
                out.append((path, None))
        return tuple(out)

    async def watch_files(
        self,
        interval: float = WATCH_INTERVAL,
        watching: asyncio.Event | None = None,
        *,
        everything: bool = True,
    ) -> None:
        """Reload whenever the configuration file or a key file it names changes (or,
        ``everything`` false, a TLS certificate, key or CA: renewed certificates are
        served without a SIGHUP). A change that does not validate is logged and counted
        like any refused reload, and the running configuration stays until the next change.
        ``watching`` is set once the files as they are now have been looked at."""
        last = await asyncio.to_thread(self._signatures, everything)
        if watching is not None:
            watching.set()
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(self._signatures, everything)
            if now != last:
                await self.reload("file change" if everything else "certificate change")
                # what the reload read is the new baseline, applied or not
                last = await asyncio.to_thread(self._signatures, everything)

    async def set_members(self, members: tuple[Backend, ...]) -> None:
        """Apply a discovered backend set (called by the discovery source, one at a time);
        ConfigError when it cannot be applied, so the source offers it again."""
        async with self.lock:
            if self.current is None:
                raise ConfigError(["discovery: no configuration to apply the members to"])
            self.members = members
            ok, problems = await self._apply(self.current.with_members(members), "discovery")
            if not ok:
                raise ConfigError(problems)

    async def reload(self, source: str) -> tuple[bool, list[str]]:
        """Read, validate and apply the configuration file. (applied, problems): when not
        applied, the problems say why and the running configuration stays; when applied,
        they name anything that applied it only in part."""
        async with self.lock:
            if not self.path:
                return False, ["no configuration file to reload"]
            try:
                text, new, files = await asyncio.get_running_loop().run_in_executor(
                    None, load_pinned, self.path
                )
            except ConfigError as e:
                self.control.reloaded(False)
                log.error(
                    "reload (%s) rejected; keeping the running configuration: %s",
                    source,
                    "; ".join(e.errors),
                )
                return False, e.errors
            pinned = Pinned(text, new, files)
            if new.discovery is not None and self.members is not None:
                pinned = pinned.with_members(self.members)
            return await self._apply(pinned, source)

    async def _apply(self, pinned: Pinned, source: str) -> tuple[bool, list[str]]:
        before = self.control.table.router.ring
        try:
            diff, problems = await self.apply(pinned, source)
        except ReloadRefused as e:
            self.control.reloaded(False)
            log.error("reload (%s) rejected: %s", source, e)
            return False, [str(e)]
        self.current = pinned
        self.control.reloaded(True, ring_changed=diff.ring_changed)
        if problems:
            log.error("reload (%s): %s", source, "; ".join(problems))
        moved = (
            sum(moved_share(before, self.control.table.router.ring).values())
            if diff.ring_changed
            else 0.0
        )
        n = len(pinned.config.backends)
        log.info(
            "reload (%s) applied: ring %s -> %s, %d backend%s, %.1f%% of users move%s",
            source,
            diff.ring_before,
            diff.ring_after,
            n,
            "" if n == 1 else "s",
            moved * 100,
            describe(diff),
        )
        return True, problems


def tls_files(config: Config) -> list[str]:
    """The certificate, key and CA files a configuration's TLS settings name."""
    out = list(config.listen.tls.files()) if config.listen.tls is not None else []
    for b in config.backends:
        if b.tls is not None:
            out += b.tls.files()
    return sorted(set(out))


def watch_mode(config: Config, watch_config: bool) -> bool | None:
    """What a process watches: everything (``run --watch-config``), only TLS files (True
    → False: certificates are always followed), or nothing (None)."""
    if watch_config:
        return True
    return False if tls_files(config) else None


def describe(diff: TableDiff) -> str:
    parts = [
        f"{what} {', '.join(ids)}"
        for what, ids in (
            ("added", diff.added),
            ("removed", diff.removed),
            ("readdressed", diff.readdressed),
            ("reweighted", diff.reweighted),
        )
        if ids
    ]
    return "; " + "; ".join(parts) if parts else ""
