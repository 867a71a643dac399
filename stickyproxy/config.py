"""TOML configuration → validated, immutable settings objects.

Every default is declared once, on the dataclass field that holds it. Loading never stops at
the first problem: every error found is collected with the key path it belongs to
(``backends[2].url: not an http URL: 'ftp://x'``) and raised together as ``ConfigError``.
Pure: ``parse`` takes a mapping; only ``load`` reads a file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from .contract import HEADER_PREFIX, header_names
from .routing import hotkeys as _hotkeys
from .routing.spill import percent as balance_percent
from .units import parse_duration, parse_size

# A backend id is used as a ring node name, a metric label and a header value.
BACKEND_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A header name is an RFC 9110 §5.6.2 token.
TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Upper bound on a backend's weight: weight multiplies its ring points (vnodes × weight).
MAX_WEIGHT = 100
# Upper bound on vnodes: the ring holds vnodes × Σweights points and is rebuilt on reload.
MAX_VNODES = 4096
# Longest user key accepted from a request; longer keys are refused (keys.py).
DEFAULT_MAX_KEY_LENGTH = 256
KEY_SOURCES = ("header", "cookie", "query", "path", "jwt", "client-cert")
NO_KEY_POLICIES = ("round-robin", "reject", "client-ip")


class ConfigError(Exception):
    """One or more problems with a configuration; ``errors`` lists them all."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.errors))

    def render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        n = len(self.errors)
        lines = [f"{head}{n} error{'s' if n != 1 else ''}"]
        lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Field kinds: each turns a raw TOML value into a settings value or raises ValueError.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def k_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__} {v!r}")
    return v


def k_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def k_int(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if not _is_int(v):
            raise ValueError(f"expected an integer, got {type(v).__name__} {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v

    return conv


def k_float(lo: float, hi: float) -> Callable[[Any], float]:
    def conv(v: Any) -> float:
        if not (_is_int(v) or isinstance(v, float)):
            raise ValueError(f"expected a number, got {type(v).__name__} {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}, got {v}")
        return float(v)

    return conv


def k_duration(lo: float = 0.0) -> Callable[[Any], float]:
    def conv(v: Any) -> float:
        if not isinstance(v, str):
            raise ValueError(f'expected a duration string such as "2s" or "500ms", got {v!r}')
        secs = parse_duration(v)
        if secs < lo:
            raise ValueError(f"must be at least {lo:g}s, got {v!r}")
        return secs

    return conv


def k_balance_factor(v: Any) -> float:
    """0 (off) or a ratio to the mean in-flight load from 1 to 10 (routing/spill.py)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number (0 = off, or 1.0 to 10), got {v!r}")
    if v == 0:
        return 0.0
    balance_percent(v)
    return float(v)


def k_size(v: Any) -> int:
    if not (_is_int(v) or isinstance(v, str)):
        raise ValueError(f'expected a size such as 65536 or "64KiB", got {v!r}')
    return parse_size(v)


def k_choice(*choices: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    conv.choices = choices  # type: ignore[attr-defined]  # shown by reference_markdown
    return conv


def k_host(v: Any) -> str:
    v = k_str(v)
    if not v or any(c.isspace() for c in v) or "/" in v:
        raise ValueError(f"not a host name or address: {v!r}")
    return v


def k_port(v: Any) -> int:
    return k_int(0, 65535)(v)


def k_header_name(v: Any) -> str:
    v = k_str(v)
    if not TOKEN_RE.match(v):
        raise ValueError(f"not a valid header name: {v!r}")
    return v


def k_header_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list of header names, got {v!r}")
    return tuple(k_header_name(x) for x in v)


def k_networks(v: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(v, list):
        raise ValueError(f"expected a list of addresses or CIDR ranges, got {v!r}")
    out = []
    for item in v:
        try:
            out.append(ipaddress.ip_network(k_str(item), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR range: {item!r}") from None
    return tuple(out)


def k_status_range(v: Any) -> tuple[int, int]:
    v = k_str(v)
    m = re.match(r"^\s*(\d{3})\s*(?:-\s*(\d{3}))?\s*$", v)
    if not m:
        raise ValueError(f'expected a status or range such as "200-399", got {v!r}')
    lo = int(m.group(1))
    hi = int(m.group(2) or lo)
    if not 100 <= lo <= hi <= 599:
        raise ValueError(f"not a valid status range: {v!r}")
    return (lo, hi)


def spec(default: Any, kind: Callable[[Any], Any], doc: str = "") -> Any:
    """A settings field: its default (already converted), its kind, a one-line doc."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("defaults must be immutable")
    return field(default=default, metadata={"kind": kind, "doc": doc})


# ---------------------------------------------------------------------------------------
# Settings. Defaults are the values on these fields and nowhere else.


@dataclass(frozen=True)
class Listen:
    host: str = spec("127.0.0.1", k_host, "address the proxy listens on")
    port: int = spec(8080, k_port, "port the proxy listens on")
    trusted_proxies: tuple = spec(
        (), k_networks, "peers whose X-Forwarded-For is kept and extended"
    )
    proxy_protocol: bool = spec(
        False,
        k_bool,
        "connections from trusted_proxies start with a PROXY protocol "
        "v1/v2 header naming the client (docs/fleet.md)",
    )
    h2c: bool = spec(
        False,
        k_bool,
        "accept HTTP/2 by prior knowledge (RFC 9113 §3.3) on a plain listener "
        "(docs/http2.md); over TLS, HTTP/2 is offered by listen.tls.alpn",
    )
    tls: Any = field(
        default=None,
        metadata={
            "kind": None,
            "doc": "[listen.tls]: terminate TLS here (docs/tls.md); absent = plain HTTP",
        },
    )


@dataclass(frozen=True)
class Admin:
    enabled: bool = spec(True, k_bool, "serve the admin API and /metrics")
    host: str = spec("127.0.0.1", k_host, "admin listener address (loopback by default)")
    port: int = spec(9090, k_port, "admin listener port")
    token: str = spec("", k_str, "bearer token required by mutating endpoints ('' = none)")
    token_env: str = spec("", k_str, "environment variable holding the token, instead of inline")


@dataclass(frozen=True)
class KeySource:
    kind: str
    name: str = ""  # header, cookie or query parameter name
    pattern: re.Pattern[str] | None = None
    settings: Any = None  # a jwtkeys.JwtSettings for "jwt" sources
    jwt: Any = None  # its jwtkeys.JwtVerifier, made by ``resolve``

    def describe(self) -> str:
        if self.kind == "path":
            return f"path ~ {self.pattern.pattern if self.pattern else ''}"
        if self.kind == "jwt" and self.settings is not None:
            s = self.settings
            return f"jwt {s.claim} from {self.name} ({', '.join(s.algorithms)})"
        return f"{self.kind} {self.name}"


DEFAULT_KEYS = (KeySource("header", "X-User-Id"),)


@dataclass(frozen=True)
class Routing:
    keys: tuple = field(
        default=DEFAULT_KEYS,
        metadata={
            "kind": None,
            "doc": "ordered key sources; the first one yielding a non-empty key wins",
        },
    )
    no_key: str = spec(
        "round-robin", k_choice(*NO_KEY_POLICIES), "what to do with a request that carries no key"
    )
    vnodes: int = spec(160, k_int(1, MAX_VNODES), "ring points per unit of weight")
    max_key_length: int = spec(
        DEFAULT_MAX_KEY_LENGTH, k_int(1, 4096), "longest user key accepted (bytes)"
    )
    balance_factor: float = spec(
        0.0,
        k_balance_factor,
        "bounded load, 0 = off: a backend above this many times "
        "the mean in-flight load (1.25 = 125 %) spills a key's new "
        "requests to the next backend on its preference list; trades "
        "stickiness for balance (docs/routing-quality.md)",
    )


@dataclass(frozen=True)
class Headers:
    prefix: str = spec(
        HEADER_PREFIX, k_header_name, "prefix of the headers the proxy sets for backends"
    )
    forwarded: bool = spec(True, k_bool, "add X-Forwarded-For/-Proto/-Host")
    allow_underscores: bool = spec(
        False,
        k_bool,
        "forward request headers whose names contain '_' (CGI and "
        "WSGI servers read X_User_Id as X-User-Id: off by default)",
    )
    strip: tuple = spec(
        (),
        k_header_names,
        "request headers never forwarded (e.g. identity headers a client could forge)",
    )

    @property
    def key(self) -> str:
        return header_names(self.prefix)[0]

    @property
    def backend(self) -> str:
        return header_names(self.prefix)[1]

    @property
    def route(self) -> str:
        return header_names(self.prefix)[2]

    @property
    def ring(self) -> str:
        return header_names(self.prefix)[3]


# What the proxy speaks to a backend: HTTP/1.1, or HTTP/2 (docs/http2.md) by prior
# knowledge on an http:// URL (RFC 9113 §3.3) or by ALPN "h2" on an https:// one (§3.2).
BACKEND_PROTOCOLS: Final = ("http/1.1", "h2")
# health.kind: an HTTP GET of health.path, or the gRPC health-checking protocol.
HEALTH_KINDS: Final = ("http", "grpc")


@dataclass(frozen=True)
class Backend:
    id: str
    url: str
    weight: int = 1
    host: str = ""
    port: int = 80
    tls: Any = None  # tls.BackendTLS for an https:// URL, None for http://
    protocol: str = "http/1.1"  # one of BACKEND_PROTOCOLS

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Health:
    enabled: bool = spec(True, k_bool, "run active health checks")
    path: str = spec("/", k_str, "path of the HTTP GET health check")
    interval: float = spec(2.0, k_duration(0.01), "time between checks of one backend")
    timeout: float = spec(1.0, k_duration(0.001), "a check slower than this fails")
    expect: tuple = spec((200, 399), k_status_range, "statuses that count as healthy")
    rise: int = spec(2, k_int(1, 100), "consecutive successes that make a down backend up")
    fall: int = spec(3, k_int(1, 100), "consecutive failures that make an up backend down")
    jitter: float = spec(0.1, k_float(0.0, 1.0), "random spread of the interval (fraction)")
    failback_delay: float = spec(
        0.0, k_duration(), "keep users on their fallback this long after recovery"
    )
    failback_ramp: float = spec(
        0.0,
        k_duration(),
        "after failback_delay, return a recovered (or newly added) "
        "backend's users gradually over this long, 0 = all at once "
        "(docs/routing-quality.md)",
    )
    panic_threshold: int = spec(
        50, k_int(0, 100), "below this % of usable backends, route by the plain ring"
    )
    kind: str = spec(
        "http",
        k_choice(*HEALTH_KINDS),
        'what a check asks: "http" GETs path (over HTTP/2 for protocol = "h2" backends); '
        '"grpc" calls grpc.health.v1.Health/Check (every backend protocol = "h2"; '
        "expect and path unused; docs/http2.md)",
    )
    grpc_service: str = spec(
        "", k_str, 'the service named in the gRPC health check ("" = the server as a whole)'
    )


@dataclass(frozen=True)
class Passive:
    enabled: bool = spec(True, k_bool, "eject backends on consecutive failures")
    consecutive_failures: int = spec(5, k_int(1, 1000), "failures in a row that eject")
    on_5xx: bool = spec(False, k_bool, "count 5xx responses as failures")
    connect_down: float = spec(
        2.0, k_duration(), "skip a backend this long after a refused connect"
    )
    base_ejection: float = spec(30.0, k_duration(0.001), "first ejection time")
    max_ejection: float = spec(300.0, k_duration(0.001), "cap on ejection time")
    max_ejected_percent: int = spec(50, k_int(0, 100), "never eject more than this % at once")


@dataclass(frozen=True)
class Timeouts:
    connect: float = spec(1.0, k_duration(0.001), "upstream TCP connect")
    response: float = spec(30.0, k_duration(0.001), "request sent → response headers")
    client_header: float = spec(
        10.0, k_duration(0.001), "a client must send a whole request head within this"
    )
    client_idle: float = spec(60.0, k_duration(0.001), "idle client keep-alive connection")
    upstream_idle: float = spec(60.0, k_duration(0.001), "idle pooled upstream connection")
    body_idle: float = spec(30.0, k_duration(0.001), "no body bytes in either direction")
    websocket_idle: float = spec(3600.0, k_duration(0.001), "idle WebSocket tunnel")
    shutdown: float = spec(30.0, k_duration(), "SIGTERM: time to finish in-flight requests")
    drain: float = spec(30.0, k_duration(), "a drained backend's tunnels are closed after this")
    queue: float = spec(
        5.0, k_duration(0.001), "a request waiting for a backend slot gets 503 after this"
    )


@dataclass(frozen=True)
class Retries:
    attempts: int = spec(2, k_int(0, 16), "extra backends tried after the first")
    budget_percent: int = spec(20, k_int(0, 100), "retries at most this % of active requests")
    budget_min: int = spec(3, k_int(0, 100000), "retries always allowed regardless of budget")


@dataclass(frozen=True)
class Limits:
    max_request_line: int = spec(8192, k_size, "longest request line (414 beyond)")
    max_header_bytes: int = spec(65536, k_size, "largest request head (431 beyond)")
    max_headers: int = spec(100, k_int(1, 10000), "most header fields in a request (431)")
    max_body: int = spec(1 << 30, k_size, "largest request body, 0 = unlimited (413 beyond)")
    max_client_connections: int = spec(
        10000, k_int(1, 1_000_000), "open client connections (503 beyond)"
    )
    max_pipeline: int = spec(32, k_int(1, 1024), "queued pipelined requests per connection")
    pool_max_idle: int = spec(64, k_int(0, 100000), "idle upstream connections per backend")
    pool_max_requests: int = spec(10000, k_int(1, 1 << 31), "requests per upstream connection")
    max_inflight_per_backend: int = spec(0, k_int(0, 1_000_000), "0 = unlimited")
    queue_per_backend: int = spec(
        0, k_int(0, 1_000_000), "requests waiting for a backend slot (503 beyond)"
    )
    min_body_rate: int = spec(0, k_size, "bytes/s a request body must keep up, 0 = off")


@dataclass(frozen=True)
class Logging:
    level: str = spec("info", k_choice("debug", "info", "warning", "error"), "log level")
    format: str = spec("text", k_choice("text", "json"), "format of the process log")
    access: str = spec("off", k_choice("off", "text", "json"), "access log")
    access_key: str = spec(
        "hash", k_choice("hash", "raw", "none"), "how the user key appears in the access log"
    )


@dataclass(frozen=True)
class HotKeys:
    enabled: bool = spec(True, k_bool, "count the hottest user keys (GET /hotkeys)")
    max_keys: int = spec(
        _hotkeys.DEFAULT_MAX_KEYS,
        k_int(_hotkeys.MIN_MAX_KEYS, _hotkeys.MAX_MAX_KEYS),
        "keys tracked per process; any key above 2/max_keys of the requests is always among them",
    )
    sample_every: int = spec(
        _hotkeys.DEFAULT_SAMPLE_EVERY,
        k_int(1, _hotkeys.MAX_SAMPLE_EVERY),
        "count one request in this many (each weighs this many)",
    )
    window: float = spec(
        _hotkeys.DEFAULT_WINDOW,
        k_duration(1.0),
        "counts start over every window; /hotkeys shows the last one to "
        'two windows; keys are hashed unless logging.access_key = "raw"',
    )


@dataclass(frozen=True)
class Config:
    listen: Listen
    admin: Admin
    routing: Routing
    headers: Headers
    backends: tuple[Backend, ...]
    health: Health
    passive: Passive
    timeouts: Timeouts
    retries: Retries
    limits: Limits
    logging: Logging
    hotkeys: HotKeys = HotKeys()
    source: str | None = None
    # [discovery] (discovery/settings.py DiscoverySettings) when backends are discovered,
    # and [resolver] (ResolverSettings): docs/discovery.md is their reference
    discovery: Any = None
    resolver: Any = None

    def backend(self, backend_id: str) -> Backend:
        for b in self.backends:
            if b.id == backend_id:
                return b
        raise KeyError(backend_id)


SECTIONS: dict[str, type] = {
    "listen": Listen,
    "admin": Admin,
    "routing": Routing,
    "headers": Headers,
    "health": Health,
    "passive": Passive,
    "timeouts": Timeouts,
    "retries": Retries,
    "limits": Limits,
    "logging": Logging,
    "hotkeys": HotKeys,
}


# ---------------------------------------------------------------------------------------


def table_fields(
    cls: type, raw: dict[str, Any], path: str, errors: list[str], other: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The values of ``raw`` for the ``spec`` fields of ``cls``, each converted by its kind;
    a problem, or a key that is neither a field nor one of ``other`` (keys the caller
    parses itself), is appended to ``errors`` with its key path. Shared by every section
    (and by tls.py and discovery/settings.py for theirs)."""
    known = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("kind")}
    for k in raw:
        if k not in known and k not in other:
            names = ", ".join(sorted(set(known) | set(other)))
            errors.append(f"{path}.{k}: unknown key (known: {names})")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name in raw:
            try:
                values[name] = f.metadata["kind"](raw[name])
            except ValueError as e:
                errors.append(f"{path}.{name}: {e}")
    return values


# Keys of a section that its own parser handles (not ``spec`` fields).
_NESTED: dict[str, tuple[str, ...]] = {"routing": ("keys",), "listen": ("tls",)}


def _section(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {type(raw).__name__}")
        raw = {}
    return cls(**table_fields(cls, raw, path, errors, _NESTED.get(path, ())))


# How jwtkeys.load_verifier starts the error for an environment secret it cannot read.

JWT_KEYS = {
    "from",
    "header",
    "claim",
    "algorithms",
    "secret_env",
    "public_key_file",
    "jwks_file",
    "issuer",
    "audience",
    "leeway",
    "require_exp",
    "on_invalid",
}


def _jwt_source(item: dict, p: str, errors: list[str], base_dir: str) -> KeySource | None:
    from .routing.jwtkeys import JwtSettings, settings_problem

    n = len(errors)
    for k in item:
        if k not in JWT_KEYS:
            errors.append(
                f"{p}.{k}: unknown key for a jwt source (known: {', '.join(sorted(JWT_KEYS))})"
            )
    values: dict[str, Any] = {}
    convs: dict[str, Callable[[Any], Any]] = {
        "header": k_header_name,
        "claim": k_str,
        "secret_env": k_str,
        "public_key_file": k_str,
        "jwks_file": k_str,
        "issuer": k_str,
        "audience": k_str,
        "leeway": k_duration(),
        "require_exp": k_bool,
        "on_invalid": k_choice("reject", "anonymous"),
    }
    for k, conv in convs.items():
        if k in item:
            try:
                values[k] = conv(item[k])
            except ValueError as e:
                errors.append(f"{p}.{k}: {e}")
    algs = item.get("algorithms")
    if not isinstance(algs, list) or not algs or not all(isinstance(a, str) for a in algs):
        errors.append(f'{p}.algorithms: pin the accepted algorithms, e.g. ["RS256"]')
    else:
        values["algorithms"] = tuple(algs)
    for k in ("public_key_file", "jwks_file"):
        if values.get(k):
            values[k] = os.path.join(base_dir, values[k])
    if len(errors) != n:
        return None
    settings = JwtSettings(**values)
    problem = settings_problem(settings)
    if problem is not None:
        errors.append(f"{p}.{problem}")
        return None
    return KeySource("jwt", name=settings.header, settings=settings)


def _key_sources(raw: Any, errors: list[str], base_dir: str = ".") -> tuple[KeySource, ...]:
    path = "routing.keys"
    if not isinstance(raw, list):
        errors.append(f"{path}: expected an array of key sources, got {raw!r}")
        return DEFAULT_KEYS
    if not raw:
        errors.append(f"{path}: needs at least one key source")
    out = []
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        if not isinstance(item, dict):
            errors.append(
                f'{p}: expected a table such as {{ from = "header", name = "X-User-Id" }}'
            )
            continue
        kind = item.get("from")
        if kind not in KEY_SOURCES:
            errors.append(
                f"{p}.from: must be one of {', '.join(map(repr, KEY_SOURCES))}, got {kind!r}"
            )
            continue
        if kind == "jwt":
            src = _jwt_source(item, p, errors, base_dir)
            if src is not None:
                out.append(src)
            continue
        if kind == "client-cert":
            for k in item:
                if k != "from":
                    errors.append(
                        f"{p}.{k}: unknown key for a client-cert source (it takes "
                        f"listen.tls.identity)"
                    )
            out.append(KeySource("client-cert"))
            continue
        allowed = {"from", "pattern"} if kind == "path" else {"from", "name"}
        for k in item:
            if k not in allowed:
                errors.append(
                    f"{p}.{k}: unknown key for a {kind} source (known: {', '.join(sorted(allowed))})"
                )
        if kind == "path":
            pat = item.get("pattern")
            if not isinstance(pat, str) or not pat:
                errors.append(f"{p}.pattern: a path source needs a regular expression")
                continue
            try:
                rx = re.compile(pat)
            except re.error as e:
                errors.append(f"{p}.pattern: not a valid regular expression: {e}")
                continue
            if "key" not in rx.groupindex:
                errors.append(f"{p}.pattern: needs a named group (?P<key>...)")
                continue
            out.append(KeySource("path", pattern=rx))
        else:
            name = item.get("name")
            try:
                name = k_header_name(name) if kind == "header" else k_str(name)
                if not name:
                    raise ValueError("must not be empty")
            except ValueError as e:
                errors.append(f"{p}.name: {e}")
                continue
            out.append(KeySource(kind, name=name))
    return tuple(out) or DEFAULT_KEYS


def _backends(raw: Any, errors: list[str], base_dir: str = ".") -> tuple[Backend, ...]:
    if raw is None:
        errors.append("backends: at least one [[backends]] entry is required")
        return ()
    if not isinstance(raw, list):
        errors.append("backends: expected an array of tables ([[backends]])")
        return ()
    if not raw:
        errors.append("backends: at least one [[backends]] entry is required")
    out: list[Backend] = []
    seen_ids: dict[str, int] = {}
    seen_addrs: dict[str, int] = {}
    for i, item in enumerate(raw):
        p = f"backends[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{p}: expected a table")
            continue
        for k in item:
            if k not in ("id", "url", "weight", "tls", "protocol"):
                errors.append(f"{p}.{k}: unknown key (known: id, protocol, tls, url, weight)")
        ok = True
        bid = item.get("id")
        if bid is None:
            errors.append(f"{p}.id: missing")
            ok = False
        elif not isinstance(bid, str) or not BACKEND_ID_RE.match(bid):
            errors.append(f"{p}.id: must be 1-64 letters, digits, '.', '_' or '-', got {bid!r}")
            ok = False
        elif bid in seen_ids:
            errors.append(f"{p}.id: duplicate of backends[{seen_ids[bid]}].id {bid!r}")
            ok = False
        else:
            seen_ids[bid] = i
        url = item.get("url")
        host, port, scheme = "", 80, "http"
        if url is None:
            errors.append(f"{p}.url: missing")
            ok = False
        else:
            try:
                host, port, scheme = _parse_backend_url(url)
                addr = f"{host.lower()}:{port}"
                if addr in seen_addrs:
                    errors.append(f"{p}.url: duplicate of backends[{seen_addrs[addr]}].url {url!r}")
                    ok = False
                else:
                    seen_addrs[addr] = i
            except ValueError as e:
                errors.append(f"{p}.url: {e}")
                ok = False
        weight = item.get("weight", 1)
        try:
            weight = k_int(1, MAX_WEIGHT)(weight)
        except ValueError as e:
            errors.append(f"{p}.weight: {e}")
            ok = False
        tls = None
        if scheme == "https":
            from .tls import parse_backend_tls

            tls = parse_backend_tls(item.get("tls"), errors, f"{p}.tls", base_dir)
        elif "tls" in item and ok:
            errors.append(f"{p}.tls: set, but the url is http:// (use https:// for TLS)")
            ok = False
        protocol = item.get("protocol", "http/1.1")
        if protocol not in BACKEND_PROTOCOLS:
            errors.append(
                f"{p}.protocol: must be one of "
                + ", ".join(f'"{x}"' for x in BACKEND_PROTOCOLS)
                + f", got {protocol!r}"
            )
            ok = False
        if ok and bid is not None and url is not None:
            out.append(
                Backend(
                    id=bid, url=url, weight=weight, host=host, port=port, tls=tls, protocol=protocol
                )
            )
    return tuple(out)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parse_backend_url(url: Any) -> tuple[str, int, str]:
    if not isinstance(url, str):
        raise ValueError(f"expected a string, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"not a valid URL: {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"not an http:// or https:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"has no host: {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"must be scheme://host[:port] without a path, query or fragment: {url!r}")
    if parts.username or parts.password:
        raise ValueError(f"must not carry credentials: {url!r}")
    return parts.hostname, port or (443 if parts.scheme == "https" else 80), parts.scheme


ADMIN_TOKEN_REQUIRED = (
    "admin.token: required when admin.host is not a loopback address "
    "(%r): the admin API can drain backends and reload"
)


def parse(raw: dict[str, Any], source: str | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem. Pure: no
    file or environment variable is read (``resolve`` does that), so a jwt source has its
    settings but no verifier yet and ``admin.token_env`` is not looked up."""
    errors: list[str] = []
    known = set(SECTIONS) | {"backends", "discovery", "resolver"}
    for k in raw:
        if k not in known:
            errors.append(f"{k}: unknown section (known: {', '.join(sorted(known))})")
    sections = {name: _section(cls, raw.get(name), name, errors) for name, cls in SECTIONS.items()}
    base_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    listen_raw = raw.get("listen")
    if isinstance(listen_raw, dict) and "tls" in listen_raw:
        from .tls import parse_listen_tls

        sections["listen"] = dataclasses.replace(
            sections["listen"],
            tls=parse_listen_tls(listen_raw["tls"], errors, "listen.tls", base_dir),
        )
    routing_raw = raw.get("routing")
    if isinstance(routing_raw, dict) and "keys" in routing_raw:
        sections["routing"] = dataclasses.replace(
            sections["routing"], keys=_key_sources(routing_raw["keys"], errors, base_dir)
        )
    from .discovery.settings import parse_discovery, parse_resolver

    resolver = parse_resolver(raw.get("resolver", {}), "resolver", errors)
    discovery = None
    if "discovery" in raw:
        discovery = parse_discovery(raw["discovery"], "discovery", errors)
        if raw.get("backends") is not None:
            # the discovered set replaces the static one whole; seeding discovery with a
            # static list would let a stale list hold the drop guard refusing forever
            errors.append("backends: give [[backends]] or [discovery], not both")
        backends: tuple[Backend, ...] = ()
    else:
        backends = _backends(raw.get("backends"), errors, base_dir)
    if sections["health"].kind == "grpc":
        # the gRPC health check is an HTTP/2 call: an HTTP/1.1 backend cannot answer it
        for i, b in enumerate(backends):
            if b.protocol != "h2":
                errors.append(
                    f'health.kind: "grpc" needs backends[{i}] ({b.id}) to have protocol = "h2"'
                )
        if discovery is not None and discovery.dns is not None:
            if discovery.dns.protocol != "h2":
                errors.append('health.kind: "grpc" needs discovery.dns.protocol = "h2"')
    lt = sections["listen"].tls
    lis = sections["listen"]
    if lis.proxy_protocol and not lis.trusted_proxies:
        errors.append(
            "listen.proxy_protocol: needs listen.trusted_proxies (the load balancers "
            "whose headers are believed)"
        )
    if lis.proxy_protocol and lt is not None:
        errors.append(
            "listen.proxy_protocol: not supported with [listen.tls] yet (the header "
            "comes before the TLS handshake)"
        )
    for i, src in enumerate(sections["routing"].keys):
        if src.kind == "client-cert" and (lt is None or lt.client_auth == "none"):
            errors.append(
                f'routing.keys[{i}].from: "client-cert" needs [listen.tls] with '
                f'client_auth = "request" or "require"'
            )

    admin = sections["admin"]
    if admin.token and admin.token_env:
        errors.append("admin.token_env: set either admin.token or admin.token_env, not both")
    health, timeouts = sections["health"], sections["timeouts"]
    if health.timeout > health.interval:
        errors.append("health.timeout: must not exceed health.interval")
    passive = sections["passive"]
    if passive.base_ejection > passive.max_ejection:
        errors.append("passive.base_ejection: must not exceed passive.max_ejection")
    limits = sections["limits"]
    if limits.max_request_line > limits.max_header_bytes:
        errors.append("limits.max_request_line: must not exceed limits.max_header_bytes")
    adm = sections["admin"]
    if adm.enabled and not adm.token and not adm.token_env and not _is_loopback(adm.host):
        errors.append(ADMIN_TOKEN_REQUIRED % adm.host)
    if (
        sections["admin"].enabled
        and (sections["admin"].host, sections["admin"].port)
        == (sections["listen"].host, sections["listen"].port)
        and sections["listen"].port
    ):
        errors.append("admin.port: the admin listener cannot share the proxy's address")
    del timeouts
    if errors:
        raise ConfigError(errors, source)
    return Config(
        backends=backends, source=source, discovery=discovery, resolver=resolver, **sections
    )


def resolve(
    cfg: Config,
    *,
    secrets: bool = True,
    read_file: ReadFile | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read what a validated configuration names outside itself: JWT key files (with
    ``read_file``, default from disk, so that processes applying one configuration can be
    given the same bytes: ``FileCopies``) and, when ``secrets``, the ``*_env`` secrets
    (``admin.token_env``, a jwt source's ``secret_env``) from ``environ`` (default the
    process environment). ConfigError names the key path of each problem.

    ``secrets=False`` (``check``, ``route``, ``plan``: they need no secret) leaves the admin
    token empty and gives a jwt source with an environment secret no key: it would refuse
    every token, but only ``run`` verifies tokens, and ``run`` resolves secrets."""
    from .routing.jwtkeys import JwtVerifier, load_verifier

    env = os.environ if environ is None else environ
    errors: list[str] = []
    keys = []
    for i, src in enumerate(cfg.routing.keys):
        if src.kind == "jwt" and src.settings is not None:
            s = src.settings
            if s.secret_env and not secrets:
                src = dataclasses.replace(src, jwt=JwtVerifier(s, {}))
            else:
                try:
                    src = dataclasses.replace(
                        src, jwt=load_verifier(s, read_file or read_disk, env)
                    )
                except ValueError as e:
                    errors.append(f"routing.keys[{i}].{e}")
        keys.append(src)
    errors += tls_problems(cfg, read_file or read_disk)
    admin = cfg.admin
    if admin.token_env and secrets:
        token = env.get(admin.token_env, "")
        if not token:
            errors.append(
                f"admin.token_env: environment variable {admin.token_env!r} is unset or empty"
            )
            if admin.enabled and not _is_loopback(admin.host):
                errors.append(ADMIN_TOKEN_REQUIRED % admin.host)
        admin = dataclasses.replace(admin, token=token)
    if errors:
        raise ConfigError(errors, cfg.source)
    return dataclasses.replace(
        cfg, admin=admin, routing=dataclasses.replace(cfg.routing, keys=tuple(keys))
    )


# STICKYPROXY_<SECTION>__<KEY>[__<KEY>...] overrides one setting (12-factor); the double
# underscore keeps the build's own STICKYPROXY_COMPILE-style variables out of it.
ENV_PREFIX = "STICKYPROXY_"
ENV_SEPARATOR = "__"


def environment_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """{variable: key path} for each variable that overrides a setting."""
    out = {}
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and ENV_SEPARATOR in name:
            parts = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split(ENV_SEPARATOR))
            if all(parts):
                out[name] = parts
    return out


def env_value(text: str) -> Any:
    """A variable's value as a TOML value (``8080``, ``true``, ``"2s"``, ``["a", "b"]``),
    or as the plain string when it is not one (``reject``, ``2s``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def overlay(raw: dict[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """``raw`` with the environment's overrides laid over it; and problems, naming the
    variable. ``[[backends]]`` is a list and cannot be overridden (use [discovery])."""
    problems = []
    for var, path in environment_overrides(environ).items():
        if path[0] == "backends":
            problems.append(f"{var}: [[backends]] cannot be set from the environment")
            continue
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{var}: {'.'.join(path)} is not inside a table")
                break
            node = child
        else:
            node[path[-1]] = env_value(environ[var])
    return raw, problems


def tls_problems(cfg: Config, read_file: ReadFile) -> list[str]:
    """Every certificate, key and CA the configuration names, loaded once to check it (and,
    read through ``read_file``, pinned for workers like JWT key files); problems by key path.
    The data plane builds its own contexts from the same bytes."""
    from .tls import CertStore, client_context

    errors: list[str] = []
    if cfg.listen.tls is not None:
        try:
            CertStore(cfg.listen.tls, read_file)
        except ConfigError as e:
            errors += e.errors
    seen = set()
    for i, b in enumerate(cfg.backends):
        if b.tls is not None and b.tls not in seen:
            seen.add(b.tls)
            try:
                client_context(b.tls, read_file, f"backends[{i}].tls")
            except ConfigError as e:
                errors += e.errors
    return errors


def loads(
    text: str,
    source: str | None = None,
    *,
    secrets: bool = True,
    read_file: ReadFile | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Parse, validate and resolve a configuration's text, with the environment's
    ``STICKYPROXY_<SECTION>__<KEY>`` overrides (``environ``, default the process's)."""
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"TOML syntax error: {e}"], source) from None
    raw, problems = overlay(raw, env)
    if problems:
        raise ConfigError(problems, source)
    try:
        cfg = parse(raw, source)
    except ConfigError as e:
        raise ConfigError(_name_variables(e.errors, env), source) from None
    return resolve(cfg, secrets=secrets, read_file=read_file)


def _name_variables(errors: list[str], environ: Mapping[str, str]) -> list[str]:
    """Errors about a key the environment set say so: the file is not where to look."""
    by_path = {".".join(path): var for var, path in environment_overrides(environ).items()}
    out = []
    for err in errors:
        key = err.split(":", 1)[0]
        var = by_path.get(key)
        out.append(f"{err} (set by {var})" if var else err)
    return out


def read_text(path: str | os.PathLike[str]) -> str:
    """A configuration file's text; ConfigError (naming the file) when it cannot be had."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8: {e}"], path) from None


def load(
    path: str | os.PathLike[str], *, secrets: bool = True, read_file: ReadFile | None = None
) -> Config:
    path = os.fspath(path)
    return loads(read_text(path), path, secrets=secrets, read_file=read_file)


ReadFile = Callable[[str], bytes]


def read_disk(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class FileCopies:
    """The files one configuration load read, kept so that other processes apply the same
    bytes (a key file replaced between two reads would give workers different verifiers).

    ``FileCopies()`` reads from disk and keeps what it read (``files``); ``FileCopies(files)``
    serves only those copies, and a file it was not given is an OSError."""

    def __init__(self, files: dict[str, str] | None = None):
        self.pinned = files is not None
        self.files: dict[str, str] = dict(files or {})

    def read(self, path: str) -> bytes:
        if self.pinned:
            try:
                return self.files[path].encode("latin-1")
            except KeyError:
                raise FileNotFoundError(
                    2, "not among the files sent with the configuration", path
                ) from None
        data = read_disk(path)
        self.files[path] = data.decode("latin-1")  # JSON-safe, byte for byte
        return data


def load_pinned(path: str) -> tuple[str, Config, dict[str, str]]:
    """(text, config, files it read) for a process that hands the same configuration to
    others (the supervisor to its workers). Blocking: run it off the event loop."""
    text = read_text(path)
    copies = FileCopies()
    return text, loads(text, path, read_file=copies.read), copies.files


def secret_variables(cfg: Config) -> list[tuple[str, str]]:
    """(key path, environment variable) for each secret ``run`` reads from the environment."""
    out = []
    if cfg.admin.token_env:
        out.append(("admin.token_env", cfg.admin.token_env))
    for i, src in enumerate(cfg.routing.keys):
        if src.kind == "jwt" and src.settings is not None and src.settings.secret_env:
            out.append((f"routing.keys[{i}].secret_env", src.settings.secret_env))
    return out


def _show_default(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return f'"{v[0]}-{v[1]}"'
    if isinstance(v, tuple):
        return "[]" if not v else repr(list(v))
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v)


def reference_markdown() -> str:
    """The configuration reference, generated from the fields that hold the defaults."""
    from .units import format_duration

    out = [
        "<!-- generated by `python -m stickyproxy.config`; do not edit by hand -->",
        "# Configuration reference",
        "",
    ]
    for name, cls in SECTIONS.items():
        out += [f"## [{name}]", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = f.metadata.get("kind")
            default = f.default
            if name == "routing" and f.name == "keys":
                shown = '[{ from = "header", name = "X-User-Id" }]'
            elif kind is not None and getattr(kind, "__qualname__", "").startswith("k_duration"):
                shown = f'"{format_duration(default)}"'  # type: ignore[arg-type]
            else:
                shown = _show_default(default)
            doc = f.metadata.get("doc", "")
            choices = getattr(kind, "choices", None)
            if choices:
                doc += "; one of " + ", ".join(f"`{_show_default(c)}`" for c in choices)
            out.append(f"| `{f.name}` | `{shown}` | {doc} |")
        out.append("")
        if name == "routing":
            out += _key_sources_reference()
    out += [
        "## [[backends]]",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
        "| `id` | (required) | name on the ring, in metrics and headers: 1-64 of `A-Za-z0-9._-` |",
        "| `url` | (required) | `http://host[:port]` or `https://host[:port]`, no path |",
        f"| `weight` | `1` | integer 1-{MAX_WEIGHT}; scales the backend's share of users |",
        '| `protocol` | `"http/1.1"` | what the proxy speaks to it: `"http/1.1"`, or `"h2"` '
        "(HTTP/2: by prior knowledge on http://, by ALPN on https://; needed for gRPC; "
        "docs/http2.md) |",
        "| `tls` | (none) | [backends.tls] for an https:// backend: docs/tls.md |",
        "",
    ]
    out += [
        "## [discovery] and [resolver]",
        "",
        "Backends discovered from DNS or a file, and how backend host names are resolved: "
        "[discovery.md](discovery.md).",
        "",
        "## From the environment",
        "",
        f"Any setting can be set by a variable `{ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>`, "
        "upper or lower case, nested tables joined the same way, laid over the file "
        "before it is validated: `STICKYPROXY_LISTEN__PORT=8080`, "
        "`STICKYPROXY_ROUTING__NO_KEY=reject`, "
        "`STICKYPROXY_DISCOVERY__DNS__NAME=_http._tcp.app.svc`. The value is read as a "
        'TOML value when it is one (`8080`, `true`, `["a"]`, `"2s"`) and as a string '
        "otherwise (`reject`, `2s`). An error about such a key names the variable. "
        "`[[backends]]` cannot be set this way (use `[discovery]`); secrets stay in the "
        "variables that `*_env` keys name. Workers are started with the supervisor's "
        "environment, so they read the same overrides.",
        "",
    ]
    return "\n".join(out)


# What each kind of key source takes (routing.keys entries), for the reference.
KEY_SOURCE_FIELDS = {
    "header": "`name`: the request header holding the key (repeated with different values: 400)",
    "cookie": "`name`: the cookie holding the key",
    "query": "`name`: the query parameter holding the key (repeated with different values: 400)",
    "path": "`pattern`: a regular expression over the path with a `(?P<key>...)` group",
    "jwt": "the key is a claim of a verified token; the fields below",
    "client-cert": "the identity of the verified client certificate (`listen.tls.identity`); "
    "needs `listen.tls.client_auth`",
}
JWT_FIELD_DOCS = {
    "header": "header carrying `Bearer <token>`",
    "claim": "claim that holds the user key",
    "algorithms": "the accepted algorithms, pinned; `none` is never accepted, "
    "HMAC and public-key algorithms are not mixed",
    "secret_env": "environment variable holding the HMAC secret (HS*); read by `run` only",
    "public_key_file": "PEM public key (RS*, ES*, PS*, EdDSA), relative to the config file",
    "jwks_file": "JWKS file, keys chosen by `kid`, relative to the config file",
    "issuer": "required `iss`, if set",
    "audience": "required `aud`, if set",
    "leeway": "clock skew allowed on `exp`/`nbf`",
    "require_exp": "refuse tokens without `exp`",
    "on_invalid": 'an invalid token: `"reject"` (401) or `"anonymous"` (try the next source)',
}


def _key_sources_reference() -> list[str]:
    from .routing.jwtkeys import JwtSettings
    from .units import format_duration

    out = [
        "### routing.keys entries",
        "",
        "Each entry is a table with `from` set to one of "
        + ", ".join(f'`"{k}"`' for k in KEY_SOURCES)
        + ".",
        "",
        "| `from` | takes |",
        "|---|---|",
    ]
    out += [f'| `"{k}"` | {v} |' for k, v in KEY_SOURCE_FIELDS.items()]
    out += [
        "",
        "A `jwt` source (exactly one of `secret_env`, `public_key_file`, `jwks_file`):",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for f in dataclasses.fields(JwtSettings):
        default = f.default
        if f.name == "algorithms":
            shown = "(required)"
        elif f.name == "leeway":
            shown = f'`"{format_duration(default)}"`'  # type: ignore[arg-type]
        else:
            shown = f"`{_show_default(default)}`"
        out.append(f"| `{f.name}` | {shown} | {JWT_FIELD_DOCS[f.name]} |")
    out.append("")
    return out


if __name__ == "__main__":
    print(reference_markdown())
