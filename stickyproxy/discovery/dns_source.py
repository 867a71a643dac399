"""The DNS source: SRV, A, AAAA or A+AAAA records of one name, asked with dnspython's
asynchronous resolver (sockets on the event loop; no thread pool, no ``getaddrinfo``).

Invariants:
- One round (the query, the address lookups of SRV targets or the PTR lookups of
  addresses) is bounded by ``timeout`` as a whole; a round that did not finish is a failure
  and changes nothing.
- NXDOMAIN and an empty answer are an *empty set* (the guard never applies it); a timeout,
  SERVFAIL, REFUSED or an unreachable server is a *failure* (nothing observed).
- The next round comes after the smallest TTL among the records used (RFC 1035 §3.2.1),
  clamped to [interval_min, interval_max]; after a failure, after interval_min.
- The queried name is absolute: no search domains (resolv.conf ``search``/``ndots``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from ..config import Backend
from .records import SrvRecord, address_backends, host_name, srv_backends
from .settings import DiscoverySettings, DnsSettings
from .source import Poll, Source

# Lookups of one round in flight at once (SRV targets, PTR names): bounds a huge answer.
MAX_PARALLEL_LOOKUPS = 16
# Largest UDP answer asked for (EDNS0, RFC 6891): the DNS Flag Day 2020 size, no fragments.
EDNS_PAYLOAD = 1232


class LookupFailed(Exception):
    """A query that tells nothing: timeout, SERVFAIL, REFUSED, no server reachable."""


def make_resolver(
    nameservers: Sequence[tuple[str, int]], timeout: float, resolv_conf: str = "/etc/resolv.conf"
) -> dns.asyncresolver.Resolver:
    """An async resolver asking ``nameservers`` (empty: those of /etc/resolv.conf, read
    here: call it off the event loop). LookupFailed when there are none."""
    if nameservers:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in nameservers]
    else:
        try:
            r = dns.asyncresolver.Resolver(filename=resolv_conf, configure=True)
        except dns.resolver.NoResolverConfiguration:
            raise LookupFailed(f"no nameserver in {resolv_conf}: set nameservers") from None
    # Each server gets its share of the bound before the next is tried.
    r.timeout = max(timeout / max(1, len(r.nameservers)), 0.01)
    r.lifetime = timeout
    r.use_edns(0, 0, EDNS_PAYLOAD)
    r.cache = None
    return r


async def query(
    resolver: dns.asyncresolver.Resolver,
    name: str | dns.name.Name,
    rdtype: str,
    timeout: float,
    search: bool = False,
) -> dns.resolver.Answer | None:
    """An answer, or None when the name or the type does not exist (NXDOMAIN, NODATA)."""
    try:
        return await resolver.resolve(name, rdtype, lifetime=timeout, search=search)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.Timeout:
        raise LookupFailed(f"{rdtype} {name}: no answer within {timeout:g}s") from None
    except dns.resolver.NoNameservers as e:
        raise LookupFailed(f"{rdtype} {name}: no server answered usefully ({e})") from None
    except dns.exception.DNSException as e:
        raise LookupFailed(f"{rdtype} {name}: {type(e).__name__}: {e}") from None


def addresses_in(response: dns.message.Message) -> dict[str, tuple[list[str], int]]:
    """A/AAAA records of a response's additional section: name → (addresses, ttl)."""
    out: dict[str, tuple[list[str], int]] = {}
    for rrset in response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            name = host_name(rrset.name.to_text())
            addrs, ttl = out.get(name, ([], int(rrset.ttl)))
            addrs.extend(r.address for r in rrset)
            out[name] = (addrs, min(ttl, int(rrset.ttl)))
    return out


class DnsSource(Source):
    kind = "dns"

    def __init__(
        self,
        settings: DiscoverySettings,
        current: tuple[Backend, ...] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings, current, clock=clock)
        assert settings.dns is not None
        self.dns: DnsSettings = settings.dns
        self._resolver: dns.asyncresolver.Resolver | None = None
        self.qname = dns.name.from_text(self.dns.name)  # absolute: no search domains

    @property
    def min_delay(self) -> float:
        return self.dns.interval_min

    def describe(self) -> str:
        return f"dns {self.dns.type} {self.dns.name}"

    def _delay(self, ttl: float) -> float:
        return min(max(ttl, self.dns.interval_min), self.dns.interval_max)

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        assert self._resolver is not None
        return self._resolver

    async def poll(self) -> Poll:
        try:
            if self._resolver is None:
                self._resolver = await asyncio.to_thread(
                    make_resolver, self.dns.nameservers, self.dns.timeout
                )
            async with asyncio.timeout(self.dns.timeout):
                if self.dns.type == "SRV":
                    backends, problems, ttl = await self._srv()
                else:
                    backends, problems, ttl = await self._addresses()
        except LookupFailed as e:
            return Poll(None, self.dns.interval_min, error=str(e))
        except TimeoutError:
            return Poll(
                None,
                self.dns.interval_min,
                error=f"no complete answer within {self.dns.timeout:g}s",
            )
        return Poll(backends, self._delay(ttl), tuple(problems))

    async def _srv(self) -> tuple[tuple[Backend, ...], list[str], float]:
        t = self.dns.timeout
        answer = await query(self.resolver, self.qname, "SRV", t)
        if answer is None or answer.rrset is None:
            return (), [], float(self.dns.interval_min)
        ttl = float(answer.rrset.ttl)
        records = [
            SrvRecord(r.priority, r.weight, r.port, r.target.to_text()) for r in answer.rrset
        ]
        known = addresses_in(answer.response)
        addresses: dict[str, list[str]] = {}
        missing = []
        for r in records:
            name = host_name(r.target)
            if name in known:
                addrs, attl = known[name]
                addresses[name] = addrs
                ttl = min(ttl, float(attl))
            elif name not in ("", "."):
                missing.append(name)
        sem = asyncio.Semaphore(MAX_PARALLEL_LOOKUPS)

        async def look(name: str) -> tuple[str, list[str], float]:
            async with sem:
                a4, a6 = await asyncio.gather(
                    query(self.resolver, name + ".", "A", t),
                    query(self.resolver, name + ".", "AAAA", t),
                )
            addrs: list[str] = []
            ttls = [ttl]
            for a in (a4, a6):
                if a is not None and a.rrset is not None:
                    addrs.extend(r.address for r in a.rrset)
                    ttls.append(float(a.rrset.ttl))
            return name, addrs, min(ttls)

        for name, found, found_ttl in await asyncio.gather(
            *(look(n) for n in sorted(set(missing)))
        ):
            addresses[name] = found
            ttl = min(ttl, found_ttl)
        backends, problems = srv_backends(records, addresses, self.dns)
        return backends, problems, ttl

    async def _addresses(self) -> tuple[tuple[Backend, ...], list[str], float]:
        t = self.dns.timeout
        types = ["A", "AAAA"] if self.dns.type == "A+AAAA" else [self.dns.type]
        answers = await asyncio.gather(*(query(self.resolver, self.qname, rt, t) for rt in types))
        addrs: list[str] = []
        ttls: list[float] = []
        for a in answers:
            if a is not None and a.rrset is not None:
                addrs.extend(r.address for r in a.rrset)
                ttls.append(float(a.rrset.ttl))
        if not addrs:
            return (), [], float(self.dns.interval_min)
        sem = asyncio.Semaphore(MAX_PARALLEL_LOOKUPS)

        async def ptr(addr: str) -> tuple[str, str | None, float | None]:
            async with sem:
                a = await query(self.resolver, dns.reversename.from_address(addr), "PTR", t)
            if a is None or a.rrset is None or not len(a.rrset):
                return addr, None, None
            return addr, sorted(r.target.to_text() for r in a.rrset)[0], float(a.rrset.ttl)

        names: dict[str, str | None] = {}
        for addr, name, pttl in await asyncio.gather(*(ptr(x) for x in sorted(set(addrs)))):
            names[addr] = name
            if pttl is not None:
                ttls.append(pttl)
        backends, problems = address_backends(names, self.dns)
        return backends, problems, min(ttls)
