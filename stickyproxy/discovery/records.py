"""DNS answers → backends with stable ids (pure, no I/O).

Invariants:
- An id is a host name (an SRV target, RFC 2782, or the PTR name of an address, RFC 1035
  §3.5), lower-cased (RFC 4343: names compare case-insensitively) without the root dot and
  without ``strip_suffix``; never an address. Proxies fed the same answers form the same ids.
- Only the records of the lowest SRV priority become members (RFC 2782: higher values are
  backups, "MUST" be tried only when the lower ones are unreachable; here that means when DNS
  stops announcing them, subject to the drop guard).
- Output is sorted by id, so equal answers give equal tuples whatever the record order.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..config import BACKEND_ID_RE, MAX_WEIGHT, Backend
from .settings import DnsSettings


@dataclass(frozen=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # as received; normalised by ``host_name``


def host_name(name: str) -> str:
    """A DNS name as an id is made from it: lower case, no root dot."""
    name = name.strip().lower()
    return name[:-1] if name.endswith(".") else name


def host_id(name: str, strip_suffix: str = "", port: int | None = None) -> str:
    """The id of a member named ``name``; ValueError when it cannot be a backend id."""
    name = host_name(name)
    if strip_suffix and name.endswith(strip_suffix) and len(name) > len(strip_suffix):
        name = name[: -len(strip_suffix)]
    bid = f"{name}-{port}" if port is not None else name
    if not BACKEND_ID_RE.match(bid):
        raise ValueError(
            f"{bid!r} cannot be a backend id (1-64 letters, digits, '.', '_', '-'; "
            f"set strip_suffix to shorten host names)"
        )
    return bid


def url_of(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def pick_address(addresses: Iterable[str]) -> str | None:
    """One address per member, the same in every proxy: IPv4 first, then the lowest."""
    parsed = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda a: (a.version, a))
    return str(parsed[0]) if parsed else None


def normalise_weights(weights: Sequence[int]) -> list[int]:
    """SRV weights (0..65535) → ring weights (1..MAX_WEIGHT), keeping their proportions.

    Divided by their greatest common divisor, so equal weights are all 1 whatever their value:
    CoreDNS announces 100/n for n endpoints (33 each for 3, 25 each for 4), and a ring weight
    that changed with n would move every key when one member is added. A weight of 0 ("a very
    small chance", RFC 2782) counts as 1 before dividing. Above MAX_WEIGHT, scaled down
    proportionally (never below 1).
    """
    ws = [max(1, w) for w in weights]
    if not ws:
        return []
    g = 0
    for w in ws:
        g = math.gcd(g, w)
    ws = [w // g for w in ws]
    top = max(ws)
    if top > MAX_WEIGHT:
        ws = [max(1, round(w * MAX_WEIGHT / top)) for w in ws]
    return ws


def srv_backends(
    records: Sequence[SrvRecord], addresses: Mapping[str, Sequence[str]], s: DnsSettings
) -> tuple[tuple[Backend, ...], list[str]]:
    """Members from SRV records; ``addresses`` maps a target (``host_name``) to its
    addresses. Returns the backends and the problems with records that were left out."""
    problems: list[str] = []
    # RFC 2782: a target of "." means the service is decidedly not available here.
    usable = [r for r in records if host_name(r.target) not in ("", ".")]
    if not usable:
        return (), problems
    lowest = min(r.priority for r in usable)
    chosen: dict[str, tuple[SrvRecord, str]] = {}
    for r in sorted(usable, key=lambda r: (r.priority, host_name(r.target), r.port, -r.weight)):
        if r.priority != lowest:
            continue
        name = host_name(r.target)
        try:
            bid = host_id(name, s.strip_suffix, r.port if s.id == "host-port" else None)
        except ValueError as e:
            problems.append(f"SRV target {name}: {e}")
            continue
        if bid in chosen:
            problems.append(
                f"SRV target {name} port {r.port}: same id {bid!r} as port "
                f'{chosen[bid][0].port}, left out (id = "host-port" keeps both)'
            )
            continue
        addr = pick_address(addresses.get(name, ()))
        if addr is None:
            problems.append(f"SRV target {name}: no address")
            continue
        chosen[bid] = (r, addr)
    ids = sorted(chosen)
    if s.weights == "srv":
        weights = normalise_weights([chosen[i][0].weight for i in ids])
    else:
        weights = [1] * len(ids)
    out = tuple(
        Backend(
            id=i,
            url=url_of(s.scheme, chosen[i][1], chosen[i][0].port),
            weight=w,
            host=chosen[i][1],
            port=chosen[i][0].port,
            protocol=s.protocol,
        )
        for i, w in zip(ids, weights)
    )
    return out, problems


def address_backends(
    names: Mapping[str, str | None],
    s: DnsSettings,
) -> tuple[tuple[Backend, ...], list[str]]:
    """Members from A/AAAA answers: ``names`` maps each address to its PTR name (None: it
    has none). An address without a name is left out: its id could only be the address,
    which changes when the member restarts elsewhere. Several addresses with one name (a
    dual-stack host) are one member, at ``pick_address``'s choice."""
    problems: list[str] = []
    by_id: dict[str, list[str]] = {}
    for addr in sorted(names):
        name = names[addr]
        if not name:
            problems.append(f"address {addr}: no PTR name, left out (ids are never addresses)")
            continue
        try:
            bid = host_id(name, s.strip_suffix)
        except ValueError as e:
            problems.append(f"address {addr} ({host_name(name)}): {e}")
            continue
        by_id.setdefault(bid, []).append(addr)
    out = []
    for bid in sorted(by_id):
        chosen = pick_address(by_id[bid])
        assert chosen is not None
        out.append(
            Backend(
                id=bid,
                url=url_of(s.scheme, chosen, s.port),
                weight=1,
                host=chosen,
                port=s.port,
                protocol=s.protocol,
            )
        )
    return tuple(out), problems
