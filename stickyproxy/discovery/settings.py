"""The ``[discovery]`` and ``[resolver]`` tables → validated, immutable settings (pure).

Reuses the field kinds of ``stickyproxy.config``: every error names its key path
(``discovery.dns.port: required when type is "A"``) and all of them are reported at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ..config import (
    BACKEND_PROTOCOLS,
    ConfigError,
    k_choice,
    k_duration,
    k_float,
    k_port,
    k_str,
    spec,
    table_fields,
)

RECORD_TYPES = ("SRV", "A", "AAAA", "A+AAAA")
ID_MODES = ("host", "host-port")
WEIGHT_MODES = ("srv", "equal")
# The only upstream scheme the data plane speaks (config._parse_backend_url).
SCHEMES = ("http",)
# RFC 1035 §2.3.4: a name is at most 253 characters (255 octets on the wire), a label 63.
MAX_NAME = 253
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
# Upper bound on the nameservers one source may list (each is tried in turn within a query's timeout).
MAX_NAMESERVERS = 8


def k_dns_name(v: Any) -> str:
    v = k_str(v).strip()
    name = v[:-1] if v.endswith(".") else v
    if not name or len(name) > MAX_NAME or not all(_LABEL.match(x) for x in name.split(".")):
        raise ValueError(f"not a DNS name: {v!r}")
    return name.lower()


def k_suffix(v: Any) -> str:
    v = k_str(v).strip().lower()
    if not v:
        return ""
    body = v.strip(".")
    if not body or not all(_LABEL.match(x) for x in body.split(".")):
        raise ValueError(f'not a domain suffix such as ".app.ns.svc.cluster.local": {v!r}')
    return "." + body


def parse_nameserver(v: str) -> tuple[str, int]:
    """``"10.0.0.10"``, ``"127.0.0.1:8600"``, ``"::1"``, ``"[::1]:5353"`` → (address, port)."""
    text = v.strip()
    port = 53
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?$", text)
    if m:
        host, p = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, p = text.split(":")
    else:
        host, p = text, None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address with an optional port: {v!r}") from None
    if p is not None:
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise ValueError(f"not a port in {v!r}")
        port = int(p)
    return host, port


def k_nameservers(v: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(v, list):
        raise ValueError(f'expected a list such as ["10.0.0.10", "127.0.0.1:8600"], got {v!r}')
    if len(v) > MAX_NAMESERVERS:
        raise ValueError(f"at most {MAX_NAMESERVERS} nameservers, got {len(v)}")
    return tuple(parse_nameserver(k_str(x)) for x in v)


@dataclass(frozen=True)
class DnsSettings:
    name: str = spec("", k_dns_name, "the name queried, always as a fully qualified name")
    type: str = spec("SRV", k_choice(*RECORD_TYPES), "record type queried")
    port: int = spec(
        0, k_port, "backend port for A/AAAA answers (required there; SRV carries its own)"
    )
    scheme: str = spec("http", k_choice(*SCHEMES), "scheme of the backend URLs made")
    protocol: str = spec(
        "http/1.1",
        k_choice(*BACKEND_PROTOCOLS),
        "what the proxy speaks to the members (backends' protocol; docs/http2.md)",
    )
    interval_min: float = spec(
        5.0, k_duration(0.1), "shortest time between two queries, whatever the TTL"
    )
    interval_max: float = spec(
        60.0, k_duration(0.1), "longest time between two queries, whatever the TTL"
    )
    timeout: float = spec(
        2.0, k_duration(0.01), "bound on one round of queries (all servers and retries)"
    )
    nameservers: tuple = spec(
        (), k_nameservers, 'servers asked, "addr" or "addr:port" ([] = /etc/resolv.conf)'
    )
    strip_suffix: str = spec("", k_suffix, "domain suffix removed from host names to form ids")
    id: str = spec(
        "host", k_choice(*ID_MODES), "id of a member: its host name, or host name and port"
    )
    weights: str = spec("srv", k_choice(*WEIGHT_MODES), "weights from SRV records, or all equal")


@dataclass(frozen=True)
class FileSettings:
    path: str = spec("", k_str, "JSON or TOML file listing the backends")
    interval: float = spec(1.0, k_duration(0.05), "time between two looks at the file")


@dataclass(frozen=True)
class DiscoverySettings:
    settle: float = spec(
        10.0, k_duration(0.0), "a changed set must be seen unchanged this long before it is applied"
    )
    max_drop_share: float = spec(
        0.5, k_float(0.0, 1.0), "largest share of members one step may remove (0..1)"
    )
    dns: DnsSettings | None = None
    file: FileSettings | None = None

    @property
    def source(self) -> str:
        return "dns" if self.dns is not None else "file"


@dataclass(frozen=True)
class ResolverSettings:
    """How backend host names are resolved for connections and health checks."""

    nameservers: tuple = spec(
        (), k_nameservers, 'servers asked, "addr" or "addr:port" ([] = /etc/resolv.conf)'
    )
    timeout: float = spec(1.0, k_duration(0.01), "bound on one host's lookup")
    min_ttl: float = spec(1.0, k_duration(0.0), "an answer is kept at least this long")
    max_ttl: float = spec(
        300.0, k_duration(0.0), "an answer is kept at most this long before it is asked again"
    )
    stale_for: float = spec(
        3600.0,
        k_duration(0.0),
        "how long an expired answer is still served while the server does not answer",
    )


def _table(cls: type, raw: Any, path: str, errors: list[str], nested: tuple[str, ...] = ()) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {type(raw).__name__}")
        raw = {}
    return cls(**table_fields(cls, raw, path, errors, nested))


def _dns(raw: Any, path: str, errors: list[str]) -> DnsSettings:
    s: DnsSettings = _table(DnsSettings, raw, path, errors)
    given = raw if isinstance(raw, dict) else {}
    if "name" not in given:
        errors.append(
            f'{path}.name: missing (the name to query, e.g. "_http._tcp.app.ns.svc.cluster.local")'
        )
    if s.type == "SRV":
        if "port" in given:
            errors.append(
                f'{path}.port: not used with type "SRV" (each SRV record carries its port)'
            )
    else:
        if "port" in given and given["port"] == 0:
            errors.append(f"{path}.port: must be between 1 and 65535, got 0")
        elif "port" not in given:
            errors.append(
                f"{path}.port: required when type is {s.type!r} (A/AAAA records carry no port)"
            )
        if "id" in given and s.id != "host":
            errors.append(
                f'{path}.id: "host-port" applies to SRV only (A/AAAA members share one port)'
            )
        if "weights" in given and s.weights == "srv":
            errors.append(
                f'{path}.weights: "srv" needs type "SRV" (A/AAAA records carry no weight)'
            )
    if s.type != "SRV":
        s = dataclasses.replace(s, weights="equal")
    if s.interval_min > s.interval_max:
        errors.append(f"{path}.interval_min: must not exceed {path}.interval_max")
    if s.timeout > s.interval_max:
        errors.append(f"{path}.timeout: must not exceed {path}.interval_max")
    return s


def _file(raw: Any, path: str, errors: list[str]) -> FileSettings:
    s: FileSettings = _table(FileSettings, raw, path, errors)
    given = raw if isinstance(raw, dict) else {}
    if "path" not in given:
        errors.append(f"{path}.path: missing (the JSON or TOML file listing the backends)")
    elif not s.path.strip():
        errors.append(f"{path}.path: must not be empty")
    return s


def parse_discovery(
    raw: Any,
    path: str = "discovery",
    errors: list[str] | None = None,
) -> DiscoverySettings:
    """Validate a ``[discovery]`` table. Exactly one source: ``[discovery.dns]`` or
    ``[discovery.file]``. With ``errors`` given, problems are appended to it (and the
    returned settings are only meaningful when none were); otherwise ConfigError is raised."""
    own: list[str] = [] if errors is None else errors
    start = len(own)
    s: DiscoverySettings = _table(DiscoverySettings, raw, path, own, nested=("dns", "file"))
    given = raw if isinstance(raw, dict) else {}
    dns = _dns(given["dns"], f"{path}.dns", own) if "dns" in given else None
    file = _file(given["file"], f"{path}.file", own) if "file" in given else None
    if (dns is None) == (file is None):
        own.append(f"{path}: set exactly one source, [{path}.dns] or [{path}.file]")
    s = dataclasses.replace(s, dns=dns, file=file)
    if errors is None and len(own) > start:
        raise ConfigError(own)
    return s


def parse_resolver(
    raw: Any,
    path: str = "resolver",
    errors: list[str] | None = None,
) -> ResolverSettings:
    """Validate a ``[resolver]`` table (absent: pass ``{}``); as ``parse_discovery``."""
    own: list[str] = [] if errors is None else errors
    start = len(own)
    s: ResolverSettings = _table(ResolverSettings, raw, path, own)
    if s.min_ttl > s.max_ttl:
        own.append(f"{path}.min_ttl: must not exceed {path}.max_ttl")
    if errors is None and len(own) > start:
        raise ConfigError(own)
    return s


# Keys whose default is not a value of the field (filled from elsewhere or required).
_REQUIRED = {("discovery.dns", "name"), ("discovery.file", "path")}
_SHOWN = {("discovery.dns", "port"): "(SRV: not used; A/AAAA: required)"}


def _show(v: Any, kind: Any) -> str:
    from ..units import format_duration

    if getattr(kind, "__qualname__", "").startswith("k_duration"):
        return f'`"{format_duration(v)}"`'
    if isinstance(v, tuple):
        return "`[]`" if not v else f"`{list(v)!r}`"
    if isinstance(v, str):
        return f'`"{v}"`'
    return f"`{v!r}`"


def reference_tables() -> dict[str, str]:
    """Markdown table of each table's keys, from the fields that hold the defaults
    (docs/discovery.md contains each one verbatim; a test keeps them equal)."""
    out: dict[str, str] = {}
    for table, cls in (
        ("discovery", DiscoverySettings),
        ("discovery.dns", DnsSettings),
        ("discovery.file", FileSettings),
        ("resolver", ResolverSettings),
    ):
        rows = ["| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = f.metadata.get("kind")
            if kind is None:
                continue
            shown = (
                "(required)"
                if (table, f.name) in _REQUIRED
                else _SHOWN.get((table, f.name)) or _show(f.default, kind)
            )
            doc = f.metadata.get("doc", "")
            choices = getattr(kind, "choices", None)
            if choices:
                doc += "; one of " + ", ".join(f'`"{c}"`' for c in choices)
            rows.append(f"| `{f.name}` | {shown} | {doc} |")
        out[table] = "\n".join(rows)
    return out
