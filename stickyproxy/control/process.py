"""One process's parts, wired once: the backend table, health, event sinks and (where the
process serves traffic) the data plane.

Roles: ``single`` (the whole proxy in one process), ``worker`` (serves traffic; passive
health only, active checks are the supervisor's) and ``supervisor`` (decides health,
serves the admin API; no data plane). Every part receives what it depends on when it is
made; nothing is bound afterwards.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Literal

from ..config import Config, ReadFile, read_disk
from ..discovery.resolver import HostResolver
from ..routing.table import BackendTable, TableDiff
from .health import Health
from .observe import ControlEvents, Observer

if TYPE_CHECKING:
    from ..dataplane import Proxy

Role = Literal["single", "worker", "supervisor"]


def freeze_heap() -> None:
    """Move every object that exists now (modules, configuration, the ring) out of the
    garbage collector's reach. A full collection otherwise walks all of them: ~9 ms idle
    here and several times that on a busy machine, a pause every request in flight waits
    out. Objects made per request are still collected as usual."""
    gc.collect()
    gc.freeze()


class Process:
    __slots__ = ("role", "table", "control", "health", "observer", "proxy")

    def __init__(
        self,
        table: BackendTable,
        control: ControlEvents,
        health: Health,
        observer: Observer | None,
        proxy: Proxy | None,
        role: Role,
    ):
        self.role = role
        self.table = table
        self.control = control
        self.health = health
        self.observer = observer
        self.proxy = proxy

    @property
    def config(self) -> Config:
        return self.table.config

    def apply(self, config: Config, read_file: ReadFile = read_disk) -> TableDiff:
        """Swap in a validated configuration everywhere in this process (certificate and
        key files read with ``read_file``: the reload's pinned copies)."""
        diff = self.table.apply(config)
        if self.proxy is not None:
            self.proxy.apply(read_file)
        self.health.reconfigure()
        freeze_heap()
        return diff

    def inflight(self) -> dict[str, int]:
        return {} if self.proxy is None else self.proxy.inflight()

    def tunnels(self) -> dict[str, int]:
        return {} if self.proxy is None else self.proxy.tunnels()


def build_process(config: Config, role: Role, *, read_file: ReadFile = read_disk) -> Process:
    """``read_file``: how certificate and key files are read (a worker is given the
    supervisor's copies)."""
    table = BackendTable(config)
    control = ControlEvents(table)
    # one cache of backend addresses for connections and health checks alike
    resolver = HostResolver(config.resolver)
    control.resolver = resolver.stats
    health = Health(table, control, active=role != "worker", resolver=resolver)
    if role == "supervisor":
        return Process(table, control, health, None, None, role)
    from ..dataplane import Proxy

    observer = Observer(control, health)
    proxy = Proxy(table, events=observer, resolver=resolver, read_file=read_file)
    return Process(table, control, health, observer, proxy, role)
