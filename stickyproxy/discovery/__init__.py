"""Backend discovery: DNS (SRV, A, AAAA) and file sources behind a membership guard, and a
cached asynchronous resolver for backend host names. docs/discovery.md is the reference.

Wiring (all on the event loop that runs the proxy's control plane)::

    settings = parse_discovery(raw["discovery"])          # ConfigError naming key paths
    source = make_source(settings, current=cfg.backends)  # DnsSource or FileSource
    task = asyncio.create_task(source.watch(on_change))   # on_change(backends) → reload
    ...
    source.stop(); await task
"""

from __future__ import annotations

from ..config import Backend
from .dns_source import DnsSource
from .file_source import FileSource, parse_backends
from .guard import APPLY, REFUSE, UNCHANGED, WAIT, Decision, MembershipGuard
from .resolver import HostResolver, ResolveError, ResolverStats
from .settings import (
    DiscoverySettings,
    DnsSettings,
    FileSettings,
    ResolverSettings,
    parse_discovery,
    parse_resolver,
)
from .source import DiscoveryStats, OnChange, Poll, Source


def make_source(settings: DiscoverySettings, current: tuple[Backend, ...] = ()) -> Source:
    """The source ``settings`` names; ``current`` is the set the proxy routes by now."""
    if settings.dns is not None:
        return DnsSource(settings, current)
    return FileSource(settings, current)


__all__ = [
    "APPLY",
    "REFUSE",
    "UNCHANGED",
    "WAIT",
    "Decision",
    "MembershipGuard",
    "DiscoverySettings",
    "DnsSettings",
    "FileSettings",
    "ResolverSettings",
    "parse_discovery",
    "parse_resolver",
    "DiscoveryStats",
    "OnChange",
    "Poll",
    "Source",
    "DnsSource",
    "FileSource",
    "parse_backends",
    "HostResolver",
    "ResolveError",
    "ResolverStats",
    "make_source",
]
