"""A cached, asynchronous resolver for backend host names.

Replaces the loop's default resolver (``getaddrinfo`` in a thread pool, asked again on every
new connection) on the paths that connect to backends. Seen before: a slow resolver while a
container was killed made connects to *healthy* backends time out, and they were marked down.

Invariants:
- An answer is kept for its TTL clamped to [min_ttl, max_ttl] (RFC 1035 §3.2.1).
- After that it is still served, for up to ``stale_for``, while one refresh per host runs
  in the background (serve-stale, RFC 8767 §4): a slow or dead server never delays a
  connect to a host that was resolved before.
- A host never resolved waits for one lookup, bounded by ``timeout``; concurrent callers
  for one host share that lookup, and lookups of different hosts are independent.
- /etc/hosts is read first (the usual ``hosts: files dns``); address literals are returned
  as they are; ``localhost`` is loopback (RFC 6761 §6.3) when the hosts file lacks it.
- A failure is ``ResolveError`` (an ``OSError``, as ``socket.gaierror`` is), remembered for
  min_ttl so a failing name is not asked again on every request. No background task ever
  leaves an exception unretrieved.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
from aiohttp.abc import AbstractResolver, ResolveResult

from .dns_source import LookupFailed, make_resolver, query
from .settings import ResolverSettings

log = logging.getLogger("stickyproxy.discovery")

HOSTS_FILE = "/etc/hosts"
# Largest hosts file read (it is read again when its signature changes).
MAX_HOSTS_BYTES = 1 << 20
# Most host names remembered: backends are few; a bound keeps a typo loop from growing it.
MAX_ENTRIES = 4096


class ResolveError(OSError):
    """A host name that has no address, or whose lookup failed or timed out."""


@dataclass
class _Entry:
    addresses: list[str]  # [] for a remembered failure
    error: str
    fresh_until: float
    stale_until: float


@dataclass
class ResolverStats:
    hits: int = 0  # answered from a fresh entry
    stale: int = 0  # answered from an expired entry while refreshing
    lookups: int = 0  # questions sent (per host, A and AAAA together)
    failures: int = 0  # lookups that failed (timeout, no address, server error)
    waits: int = 0  # callers that had to wait for a lookup
    hosts: dict[str, str] = field(default_factory=dict)  # host → last failure


def parse_hosts(text: str) -> dict[str, list[str]]:
    """/etc/hosts (hosts(5)) → lower-cased name → addresses, in file order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            addr = str(ipaddress.ip_address(fields[0].split("%", 1)[0]))
        except ValueError:
            continue
        for name in fields[1:]:
            lst = out.setdefault(name.lower().rstrip("."), [])
            if addr not in lst:
                lst.append(addr)
    return out


def order(addresses: list[str]) -> list[str]:
    """IPv4 before IPv6, each in the order received (a stable preference for connects)."""
    return [a for a in addresses if ":" not in a] + [a for a in addresses if ":" in a]


class HostResolver:
    def __init__(
        self,
        settings: ResolverSettings | None = None,
        *,
        hosts_file: str = HOSTS_FILE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or ResolverSettings()
        self.hosts_file = hosts_file
        self.clock = clock
        self.stats = ResolverStats()
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._hosts: dict[str, list[str]] = {}
        self._hosts_sig: tuple[int, int, int, int] | None = None

    # -- public -----------------------------------------------------------------------

    def cached(self, host: str) -> list[str] | None:
        """Addresses known for ``host`` now (fresh or stale), without waiting; None if none
        (then ``await resolve(host)``). A stale answer starts its refresh, as in ``resolve``."""
        literal = _literal(host)
        if literal is not None:
            return [literal]
        key = host.lower().rstrip(".")
        e = self._entries.get(key)
        now = self.clock()
        if e is None or not e.addresses or now >= e.stale_until:
            return None
        if now >= e.fresh_until:
            self.stats.stale += 1
            if key not in self._inflight:
                self._start(key)
        else:
            self.stats.hits += 1
        return list(e.addresses)

    async def resolve(self, host: str) -> list[str]:
        """``host``'s addresses (IPv4 first); ResolveError when it has none. Waits only when
        nothing usable is known, and then at most ``timeout``."""
        literal = _literal(host)
        if literal is not None:
            return [literal]
        key = host.lower().rstrip(".")
        now = self.clock()
        e = self._entries.get(key)
        if e is not None:
            if now < e.fresh_until:
                if not e.addresses:
                    raise ResolveError(e.error)
                self.stats.hits += 1
                return list(e.addresses)
            if e.addresses and now < e.stale_until:
                self.stats.stale += 1
                if key not in self._inflight:
                    self._start(key)
                return list(e.addresses)
        self.stats.waits += 1
        task = self._inflight.get(key) or self._start(key)
        entry = await asyncio.shield(task)
        if not entry.addresses:
            raise ResolveError(entry.error)
        return list(entry.addresses)

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()

    def aiohttp(self) -> AbstractResolver:
        """This resolver for an aiohttp connector (``TCPConnector(resolver=...)``)."""
        return _AiohttpResolver(self)

    # -- lookups ----------------------------------------------------------------------

    def _start(self, key: str) -> asyncio.Task[_Entry]:
        task = asyncio.get_running_loop().create_task(self._lookup(key))
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._done(key, t))
        return task

    def _done(self, key: str, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled():
            return
        if task.exception() is not None:  # retrieved: never "exception was never retrieved"
            log.error("resolver: lookup of %s failed unexpectedly: %r", key, task.exception())

    async def _lookup(self, key: str) -> _Entry:
        s = self.settings
        now = self.clock()
        old = self._entries.get(key)
        addresses: list[str] = []
        ttl = s.max_ttl
        error = ""
        hosts = await self._hosts_names()
        if key in hosts:
            addresses, ttl = order(hosts[key]), s.min_ttl  # an edit is seen within min_ttl
        elif key == "localhost" or key.endswith(".localhost"):
            addresses, ttl = ["127.0.0.1", "::1"], s.max_ttl
        else:
            self.stats.lookups += 1
            try:
                addresses, ttl = await self._ask(key)
                if not addresses:
                    error = f"{key}: no address (NXDOMAIN or no A/AAAA records)"
            except LookupFailed as e:
                error = f"{key}: {e}"
            except TimeoutError:
                error = f"{key}: no answer within {s.timeout:g}s"
        now = self.clock()
        if error:
            self.stats.failures += 1
            if key in self.stats.hosts or len(self.stats.hosts) < MAX_ENTRIES:
                self.stats.hosts[key] = error
            if old is not None and old.addresses and now < old.stale_until:
                # Keep serving what was known; ask again after min_ttl.
                old.fresh_until = now + s.min_ttl
                log.warning("resolver: %s; still using %s", error, ",".join(old.addresses))
                return old
            entry = _Entry([], error, now + s.min_ttl, now + s.min_ttl)
        else:
            self.stats.hosts.pop(key, None)
            ttl = min(max(ttl, s.min_ttl), s.max_ttl)
            entry = _Entry(addresses, "", now + ttl, now + ttl + s.stale_for)
        if len(self._entries) >= MAX_ENTRIES and key not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        return entry

    async def _ask(self, key: str) -> tuple[list[str], float]:
        s = self.settings
        if self._resolver is None:
            self._resolver = await asyncio.to_thread(make_resolver, s.nameservers, s.timeout)
        # A relative name is completed with resolv.conf's search list and ndots, as
        # getaddrinfo does (with explicit nameservers there is no list: the root).
        async with asyncio.timeout(s.timeout):
            a4, a6 = await asyncio.gather(
                query(self._resolver, key, "A", s.timeout, search=True),
                query(self._resolver, key, "AAAA", s.timeout, search=True),
                return_exceptions=True,
            )
        addrs: list[str] = []
        ttls: list[float] = []
        failed: list[BaseException] = []
        for a in (a4, a6):
            if isinstance(a, BaseException):
                failed.append(a)
            elif a is not None and a.rrset is not None:
                addrs.extend(r.address for r in a.rrset)
                ttls.append(float(a.rrset.ttl))
        if not addrs and failed:
            f = failed[0]
            if isinstance(f, (LookupFailed, TimeoutError)):
                raise f
            raise LookupFailed(f"{type(f).__name__}: {f}")
        return order(addrs), (min(ttls) if ttls else s.min_ttl)

    async def _hosts_names(self) -> dict[str, list[str]]:
        try:
            st = await asyncio.to_thread(os.stat, self.hosts_file)
        except OSError:
            self._hosts, self._hosts_sig = {}, None
            return self._hosts
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if sig != self._hosts_sig and st.st_size <= MAX_HOSTS_BYTES:
            try:
                text = await asyncio.to_thread(_read_text, self.hosts_file)
            except OSError:
                return self._hosts
            self._hosts, self._hosts_sig = parse_hosts(text), sig
        return self._hosts


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(MAX_HOSTS_BYTES)


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


class _AiohttpResolver(AbstractResolver):
    def __init__(self, resolver: HostResolver) -> None:
        self.resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        out: list[ResolveResult] = []
        for addr in await self.resolver.resolve(host):
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            if family not in (socket.AF_UNSPEC, fam):
                continue
            out.append(
                ResolveResult(
                    hostname=host,
                    host=addr,
                    port=port,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        if not out:
            raise ResolveError(f"{host}: no address of the family asked for")
        return out

    async def close(self) -> None:
        return None
