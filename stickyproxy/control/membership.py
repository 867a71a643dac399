"""Backends from discovery: the source runs where reloads are decided (the single process,
or the supervisor: workers are sent the result and never ask DNS for members themselves, so
they cannot disagree) and every set it settles on goes through the one reload path."""

from __future__ import annotations

import asyncio
import logging

from ..discovery import DiscoveryStats, make_source
from .reload import Reloader

log = logging.getLogger("stickyproxy")


class Membership:
    def __init__(self, reloader: Reloader):
        assert reloader.current is not None
        config = reloader.current.config
        self.reloader = reloader
        self.source = make_source(config.discovery, current=config.backends)
        self.task: asyncio.Task | None = None

    @property
    def stats(self) -> DiscoveryStats:
        return self.source.stats

    def start(self) -> None:
        log.info("discovering backends: %s", self.source.describe())
        self.task = asyncio.get_running_loop().create_task(
            self.source.watch(self.reloader.set_members)
        )

    async def stop(self) -> None:
        if self.task is None:
            return
        self.source.stop()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.task = None
