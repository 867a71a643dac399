"""TLS on both sides, with the standard library's ``ssl`` through the event loop.

What this module holds (the listener, upstream connections and health checks use it):

- settings: ``ListenTLS`` (``[listen.tls]``) and ``BackendTLS`` (a backend's TLS), frozen,
  parsed by pure functions that collect every error with its key path, as config.py does;
- ``CertStore``: the listener's one ``SSLContext`` (``.context``, given to
  ``create_server``) and, behind it, one context per certificate, rebuilt from the files by
  ``reload()``. The front context's ``sni_callback`` switches every new handshake to the
  current context for its server name, so a reload changes what new handshakes get and
  never touches a connection already open (it keeps the SSL object it was made with);
- ``HandshakeGate``: the cap on handshakes in progress, counted in the SSL objects the
  contexts make (``SSLContext.sslobject_class``), because with asyncio's TLS the protocol
  sees nothing of a handshake that fails;
- ``client_context``: the context for connections to backends, resuming sessions across a
  pool's connections (``SessionCache``); ``describe_verify_error``: a failed handshake as
  one short line for a 502's reason;
- ``client_identity``: the verified client certificate's subject CN or a SAN, for the
  identity header and the ``client-cert`` key source.

Invariants:
- Every context made here has the same settings except its certificate: OpenSSL switches
  only some of them with the context (``SSL_set_SSL_CTX``: certificate and, for later
  steps, verification store and ALPN), and takes the others (protocol versions, verify
  mode, options) from the front context when the connection is accepted.
- A failed load or reload never leaves a half-built context in use: contexts are built
  whole and swapped in one assignment.
- Certificate and key bytes come through ``read_file`` (config.FileCopies can pin them) and
  are handed to OpenSSL through an anonymous memory file, never a second read of the path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import ssl
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from .config import (
    ConfigError,
    k_bool,
    k_choice,
    k_duration,
    k_header_name,
    k_int,
    k_str,
    read_disk,
    spec,
    table_fields,
)
from .contract import HEADER_PREFIX

ReadFile = Callable[[str], bytes]

# RFC 8996 deprecates TLS 1.0 and 1.1; 1.2 (RFC 5246) is the floor, 1.3 (RFC 8446) optional.
MIN_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# ALPN ids (RFC 7301) the parser knows; only those in ALPN_SERVED may be advertised: a
# client that is offered "h2" speaks HTTP/2 at once (dataplane/h2client.py serves it).
ALPN_KNOWN: Final = ("http/1.1", "h2")
ALPN_SERVED: Final = ("http/1.1", "h2")
CLIENT_AUTH: Final = {
    "none": ssl.CERT_NONE,
    "request": ssl.CERT_OPTIONAL,
    "require": ssl.CERT_REQUIRED,
}
# Which part of a verified client certificate names the client (RFC 5280 §4.1.2.6, §4.2.1.6).
IDENTITY_KINDS: Final = ("cn", "dns", "uri", "email")
# The identity header's name after the [headers] prefix; under the prefix, client copies of
# it are stripped like every other X-Sticky-* header.
IDENTITY_HEADER_SUFFIX: Final = "Client-Cert"
# Longest identity forwarded in a header or used as a user key (a CN is at most 64, RFC 5280
# ub-common-name; SAN URIs can be longer).
MAX_IDENTITY: Final = 1024
# A handshake is one ClientHello and a few round trips; a client slower than this is gone or
# hostile (NGINX's ssl_handshake_timeout defaults to 60 s).
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
# Handshakes in progress per process: a reconnect storm of this many clients is served at
# once (a full handshake cost ~0.6 ms of CPU, a refused connection ~0.085 ms: docs/tls.md);
# beyond it new connections are closed at once instead of queuing behind unauthenticated work.
DEFAULT_MAX_HANDSHAKES: Final = 1024
# After close_notify, wait this long for the peer's before closing the socket (asyncio's
# default is 30 s, far longer than a polite peer needs).
SHUTDOWN_TIMEOUT: Final = 5.0
# A server name in [[listen.tls.sni]]: A-labels (RFC 5890), optionally "*." + name (RFC 6125
# §6.4.3: the wildcard is the whole left-most label and matches exactly one label).
_NAME_RE = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*"
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)


# ---------------------------------------------------------------------------------------
# settings


def k_min_version(v: Any) -> str:
    return k_choice(*MIN_VERSIONS)(v)


def k_alpn(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise ValueError(f'expected a non-empty list such as ["http/1.1"], got {v!r}')
    for x in v:
        if x not in ALPN_KNOWN:
            raise ValueError(f"unknown protocol {x!r} (known: {', '.join(ALPN_KNOWN)})")
        if x not in ALPN_SERVED:
            raise ValueError(f"{x!r} is not served yet (served: {', '.join(ALPN_SERVED)})")
    if len(set(v)) != len(v):
        raise ValueError(f"lists a protocol twice: {v!r}")
    return tuple(v)


def k_server_name(v: Any) -> str:
    v = k_str(v).lower().rstrip(".")
    if not _NAME_RE.match(v) or len(v) > 253:
        raise ValueError(f'not a DNS name or "*." wildcard in A-label form: {v!r}')
    return v


@dataclass(frozen=True)
class SniCert:
    """One ``[[listen.tls.sni]]`` entry: the server names it answers and its files."""

    names: tuple[str, ...]
    cert: str
    key: str


@dataclass(frozen=True)
class ListenTLS:
    cert: str = spec("", k_str, "certificate chain file (PEM, leaf first); required")
    key: str = spec("", k_str, "private key file (PEM, unencrypted) of cert; required")
    sni: tuple = dataclasses.field(
        default=(),
        metadata={"kind": None, "doc": "[[listen.tls.sni]] entries: names = [...], cert, key"},
    )
    min_version: str = spec("1.2", k_min_version, 'lowest TLS version accepted: "1.2" or "1.3"')
    alpn: tuple = spec(("http/1.1",), k_alpn, "protocols offered by ALPN (RFC 7301)")
    client_auth: str = spec(
        "none", k_choice(*CLIENT_AUTH), 'client certificates: "none", "request" or "require"'
    )
    client_ca: str = spec("", k_str, "CA bundle (PEM) client certificates are verified against")
    identity: str = spec(
        "cn",
        k_choice(*IDENTITY_KINDS),
        'what names a client: subject "cn", or the first SAN of type "dns", "uri" or "email"',
    )
    identity_header: str = spec(
        "",
        k_header_name,
        "header carrying the verified identity to backends "
        "('' = [headers] prefix + \"Client-Cert\")",
    )
    handshake_timeout: float = spec(
        DEFAULT_HANDSHAKE_TIMEOUT, k_duration(0.01), "a TLS handshake must finish within this"
    )
    max_handshakes: int = spec(
        DEFAULT_MAX_HANDSHAKES,
        k_int(0, 1_000_000),
        "handshakes in progress at once, per process (0 = no cap)",
    )

    def files(self) -> tuple[str, ...]:
        """Every file the listener's contexts are built from."""
        out = [self.cert, self.key] + [f for s in self.sni for f in (s.cert, s.key)]
        if self.client_ca:
            out.append(self.client_ca)
        return tuple(out)


@dataclass(frozen=True)
class BackendTLS:
    verify: bool = spec(True, k_bool, "verify the backend's certificate and host name")
    ca_file: str = spec("", k_str, "CA bundle (PEM) to verify backends ('' = system store)")
    server_name: str = spec("", k_str, "SNI and expected certificate name ('' = the URL's host)")
    cert: str = spec("", k_str, "client certificate for mTLS to backends ('' = none)")
    key: str = spec("", k_str, "private key of cert")
    min_version: str = spec("1.2", k_min_version, "lowest TLS version spoken to backends")

    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca_file, self.cert, self.key) if f)


def identity_header(settings: ListenTLS, prefix: str = HEADER_PREFIX) -> str:
    """The header naming the verified client to backends."""
    return settings.identity_header or prefix + IDENTITY_HEADER_SUFFIX


def _join(base_dir: str, p: str) -> str:
    return os.path.join(base_dir, p) if p else p


def parse_listen_tls(
    raw: Any, errors: list[str], path: str = "listen.tls", base_dir: str = "."
) -> ListenTLS | None:
    """``[listen.tls]`` → settings (file paths joined to ``base_dir``), or None when the table
    is absent. Problems are appended to ``errors`` with their key paths; files are not read
    here (``CertStore`` reads them)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {type(raw).__name__}")
        return None
    n = len(errors)
    values = table_fields(ListenTLS, raw, path, errors, ("sni",))
    for k in ("cert", "key"):
        if not values.get(k):
            errors.append(f"{path}.{k}: required (a PEM file)")
    auth = values.get("client_auth", "none")
    if auth != "none" and not values.get("client_ca"):
        errors.append(f"{path}.client_ca: required when client_auth is {auth!r}")
    if auth == "none" and values.get("client_ca"):
        errors.append(
            f'{path}.client_ca: set, but client_auth is "none" (no certificate would be asked for)'
        )
    sni: list[SniCert] = []
    seen: dict[str, int] = {}
    raw_sni = raw.get("sni", [])
    if not isinstance(raw_sni, list):
        errors.append(f"{path}.sni: expected an array of tables ([[{path}.sni]])")
        raw_sni = []
    for i, item in enumerate(raw_sni):
        p = f"{path}.sni[{i}]"
        if not isinstance(item, dict):
            errors.append(f"{p}: expected a table with names, cert and key")
            continue
        for k in item:
            if k not in ("names", "cert", "key"):
                errors.append(f"{p}.{k}: unknown key (known: cert, key, names)")
        names_raw = item.get("names")
        names: list[str] = []
        if not isinstance(names_raw, list) or not names_raw:
            errors.append(
                f"{p}.names: expected a non-empty list of server names, got {names_raw!r}"
            )
        else:
            for j, nm in enumerate(names_raw):
                try:
                    name = k_server_name(nm)
                except ValueError as e:
                    errors.append(f"{p}.names[{j}]: {e}")
                    continue
                if name in seen:
                    errors.append(
                        f"{p}.names[{j}]: {name!r} already listed in {path}.sni[{seen[name]}]"
                    )
                    continue
                seen[name] = i
                names.append(name)
        files = {}
        for k in ("cert", "key"):
            v = item.get(k)
            if not isinstance(v, str) or not v:
                errors.append(f"{p}.{k}: required (a PEM file)")
            else:
                files[k] = _join(base_dir, v)
        if names and len(files) == 2:
            sni.append(SniCert(tuple(names), files["cert"], files["key"]))
    if len(errors) != n:
        return None
    for k in ("cert", "key", "client_ca"):
        if k in values:
            values[k] = _join(base_dir, values[k])
    return ListenTLS(sni=tuple(sni), **values)


def parse_backend_tls(raw: Any, errors: list[str], path: str, base_dir: str = ".") -> BackendTLS:
    """A backend's TLS table → settings; ``None`` (absent) gives the defaults."""
    if raw is None:
        return BackendTLS()
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {type(raw).__name__}")
        return BackendTLS()
    values = table_fields(BackendTLS, raw, path, errors)
    if bool(values.get("cert")) != bool(values.get("key")):
        errors.append(
            f"{path}.{'key' if values.get('cert') else 'cert'}: "
            f"cert and key go together (mTLS to the backend)"
        )
    if values.get("server_name"):
        try:
            values["server_name"] = k_server_name(values["server_name"])
            if values["server_name"].startswith("*."):
                raise ValueError("a wildcard cannot be sent as a server name")
        except ValueError as e:
            errors.append(f"{path}.server_name: {e}")
    if values.get("verify") is False and values.get("ca_file"):
        errors.append(f"{path}.ca_file: set, but verify is false (nothing would be verified)")
    for k in ("ca_file", "cert", "key"):
        if k in values:
            values[k] = _join(base_dir, values[k])
    try:
        return BackendTLS(**values)
    except TypeError:  # pragma: no cover - every value was converted above
        return BackendTLS()


# ---------------------------------------------------------------------------------------
# loading certificates and keys: every problem names its key path

# OpenSSL reasons a load can fail with, said plainly.
_LOAD_REASONS: Final = {
    "KEY_VALUES_MISMATCH": "the private key does not belong to the certificate",
    "EE_KEY_TOO_SMALL": "the certificate's key is too small for OpenSSL's security level",
    "CA_MD_TOO_WEAK": "the certificate is signed with a digest too weak for OpenSSL's security level",
    "NO_START_LINE": "no PEM data found",
    "BAD_DECRYPT": "the key is encrypted (not supported: give an unencrypted key file)",
}


class _Problem(Exception):
    """A load failure, with the key path it belongs to."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def _read(read_file: ReadFile, path: str, key: str) -> bytes:
    try:
        return read_file(path)
    except OSError as e:
        raise _Problem(key, f"cannot read {path!r}: {e.strerror or e}") from None


def _check_pem(data: bytes, key: str, path: str, what: str) -> None:
    text = data.decode("latin-1")
    if what == "key":
        if "-----BEGIN ENCRYPTED PRIVATE KEY-----" in text or "Proc-Type: 4,ENCRYPTED" in text:
            raise _Problem(
                key,
                f"{path!r}: the key is encrypted (not supported: give an "
                f"unencrypted key file, readable by the proxy only)",
            )
        if not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text):
            raise _Problem(key, f"{path!r}: no PEM private key found")
    else:
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise _Problem(key, f"{path!r}: no PEM certificate found")
        try:
            probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            probe.load_verify_locations(cadata=text)
        except (ssl.SSLError, ValueError) as e:
            raise _Problem(
                key, f"{path!r}: not a valid PEM certificate ({_ssl_reason(e)})"
            ) from None


def _ssl_reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    if isinstance(reason, str) and reason in _LOAD_REASONS:
        return _LOAD_REASONS[reason]
    if isinstance(reason, str):
        return reason.replace("_", " ").lower()
    return str(e) or type(e).__name__


@contextlib.contextmanager
def _as_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open holding ``data``: an anonymous memory file on Linux, else a
    private temporary file removed at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("stickyproxy-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as d:  # 0700
        p = os.path.join(d, "pem")
        with open(p, "wb") as f:
            f.write(data)
        yield p


def _no_password() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key: a hang.
    raise ValueError("the key is encrypted (not supported: give an unencrypted key file)")


def _load_chain(
    ctx: ssl.SSLContext,
    cert: bytes,
    key: bytes,
    cert_key: str,
    key_key: str,
    cert_path: str,
    key_path: str,
) -> None:
    _check_pem(cert, cert_key, cert_path, "cert")
    _check_pem(key, key_key, key_path, "key")
    with _as_path(cert) as cp, _as_path(key) as kp:
        try:
            ctx.load_cert_chain(cp, kp, password=_no_password)
        except ValueError as e:
            raise _Problem(key_key, f"{key_path!r}: {e}") from None
        except ssl.SSLError as e:
            # the certificate parsed above, so what OpenSSL refuses now is the key or the pair
            why = (
                _ssl_reason(e)
                if isinstance(e.reason, str)
                else "not a private key OpenSSL can read (damaged PEM, or an unsupported type)"
            )
            raise _Problem(key_key, f"{key_path!r}: {why}") from None


def _load_ca(ctx: ssl.SSLContext, data: bytes, key: str, path: str) -> None:
    _check_pem(data, key, path, "cert")
    ctx.load_verify_locations(cadata=data.decode("latin-1"))


# ---------------------------------------------------------------------------------------
# the listener


def _base_server_context(s: ListenTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # the stdlib's secure cipher list
    ctx.minimum_version = MIN_VERSIONS[s.min_version]
    # CRIME (no compression); no renegotiation at all (a client-initiated renegotiation
    # costs the server a handshake per request, RFC 5746 only makes it safe, not cheap).
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(list(s.alpn))
    ctx.verify_mode = CLIENT_AUTH[s.client_auth]
    _set_tickets(ctx, s)
    return ctx


def _set_tickets(ctx: ssl.SSLContext, s: ListenTLS) -> None:
    """A resumed session keeps the client certificate verified when it was made, and
    OpenSSL keeps ticket keys for the front context's life: a ticket issued before the
    client CA changed would carry its old verdict past a reload. So a listener that
    verifies clients issues no tickets (TLS 1.3 resumes only by ticket, RFC 8446 §4.6.1);
    TLS 1.2 session ids stay, checked by ``CertStore._check_resumed``."""
    if s.client_auth == "none":
        ctx.options &= ~ssl.OP_NO_TICKET
        ctx.num_tickets = 2  # OpenSSL's default
    else:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0


@dataclass(frozen=True)
class _Built:
    """One complete generation of the listener's contexts."""

    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]  # by the suffix after "*."
    digest: str  # of every file's bytes, to tell a change
    trust: str  # of what verifies clients (client_auth, CA bytes)


def select_context(
    server_name: str | None, exact: dict[str, Any], wildcard: dict[str, Any], default: Any
) -> Any:
    """The entry for an SNI server name (RFC 6066 §3): exact name first, then a wildcard
    for the name's parent (one label, RFC 6125 §6.4.3), else ``default``. Pure."""
    if not server_name:
        return default
    name = server_name.lower().rstrip(".")
    hit = exact.get(name)
    if hit is not None:
        return hit
    dot = name.find(".")
    if dot > 0:
        hit = wildcard.get(name[dot + 1 :])
        if hit is not None:
            return hit
    return default


def _build(s: ListenTLS, read_file: ReadFile, path: str) -> _Built:
    """Every context of a listener, from the files' current bytes. Raises ConfigError with
    every problem found."""
    errors: list[str] = []
    h = hashlib.sha256()
    cache: dict[str, bytes] = {}

    def read(p: str, key: str) -> bytes:
        if p not in cache:
            cache[p] = _read(read_file, p, key)
        data = cache[p]
        h.update(p.encode() + b"\0" + hashlib.sha256(data).digest())
        return data

    ca: bytes | None = None
    if s.client_ca:
        try:
            ca = read(s.client_ca, f"{path}.client_ca")
            _check_pem(ca, f"{path}.client_ca", s.client_ca, "cert")
        except _Problem as e:
            errors.append(str(e))

    def one(cert: str, key: str, where: str) -> ssl.SSLContext | None:
        ctx = _base_server_context(s)
        try:
            c = read(cert, f"{where}.cert")
            k = read(key, f"{where}.key")
            _load_chain(ctx, c, k, f"{where}.cert", f"{where}.key", cert, key)
            if ca is not None:
                _load_ca(ctx, ca, f"{path}.client_ca", s.client_ca)
        except _Problem as e:
            errors.append(str(e))
            return None
        return ctx

    default = one(s.cert, s.key, path)
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    for i, entry in enumerate(s.sni):
        ctx = one(entry.cert, entry.key, f"{path}.sni[{i}]")
        if ctx is None:
            continue
        for name in entry.names:
            if name.startswith("*."):
                wildcard[name[2:]] = ctx
            else:
                exact[name] = ctx
    if errors or default is None:
        raise ConfigError(errors)
    trust = hashlib.sha256(s.client_auth.encode() + b"\0" + (ca or b"")).hexdigest()
    return _Built(default, exact, wildcard, h.hexdigest(), trust)


@dataclass(frozen=True)
class FileState:
    """What a cheap look at a file sees: a change in any of these means "re-read it"."""

    dev: int
    ino: int
    size: int
    mtime_ns: int


def file_state(path: str) -> FileState | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatch:
    """Tells whether any of a set of files may have changed since ``mark()``: one ``stat``
    per file (device, inode, size, mtime), so a periodic task can call it every second.
    A rename over the file (how certbot and Kubernetes secrets replace files) changes the
    inode; a change it cannot see (same size within the mtime granularity) is caught by
    the content digest ``CertStore.reload`` compares."""

    def __init__(self, paths: tuple[str, ...]):
        self.paths = tuple(dict.fromkeys(paths))
        self.seen: tuple[FileState | None, ...] = ()
        self.mark()

    def mark(self) -> None:
        self.seen = tuple(file_state(p) for p in self.paths)

    def changed(self) -> bool:
        return tuple(file_state(p) for p in self.paths) != self.seen


@dataclass(frozen=True)
class ReloadResult:
    changed: bool  # new handshakes now get new certificates or settings
    errors: tuple[str, ...]  # why not, when the files could not be loaded (old kept)


class CertStore:
    """The listener's TLS: ``context`` is the one ``SSLContext`` given to ``create_server``
    for the listener's whole life; what it hands each new handshake is replaced by
    ``reload()`` / ``apply()``. Connections already open keep their session and certificate.

    Raises ConfigError (every problem, each naming its key path) when the files cannot be
    loaded at construction."""

    def __init__(
        self,
        settings: ListenTLS,
        read_file: ReadFile = read_disk,
        path: str = "listen.tls",
        gate: HandshakeGate | None = None,
    ):
        self.settings = settings
        self.path = path
        self.read_file = read_file
        self.built = _build(settings, read_file, path)
        self.watch = FileWatch(settings.files())
        self.reloads = 0
        # when what verifies clients last changed (whole seconds, as OpenSSL stamps sessions;
        # 0: never, every session the front context holds was made under the current rules)
        self.trust_changed = 0
        self.gate = (
            gate
            if gate is not None
            else HandshakeGate(settings.max_handshakes, settings.handshake_timeout)
        )
        self.gate.check = self._check_resumed
        # the front context (the first default one): its own settings apply to every
        # connection it accepts (see the invariants above); after a reload its certificate
        # is never used, as the callback always switches to the current generation
        front = self.built.default
        front.sni_callback = self._on_sni
        self.gate.install(front)
        self.context = front

    def _on_sni(self, ssl_object: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Called by OpenSSL for every ClientHello, with or without the SNI extension. Must
        # not raise: an exception here is an internal_error alert and a logged traceback.
        b = self.built
        ssl_object.context = select_context(server_name, b.exact, b.wildcard, b.default)
        ssl_object.sni_name = server_name

    def _check_resumed(self, obj: ssl.SSLObject) -> str | None:
        """Why a finished handshake must be refused, or None: a resumed session whose client
        verification predates the last change of ``client_auth`` or ``client_ca``."""
        if self.settings.client_auth == "none" or not obj.session_reused:
            return None
        if obj.version() == "TLSv1.3":
            return "resumed a TLS 1.3 ticket issued before client certificates were verified"
        sess = obj.session
        if sess is None or sess.time <= self.trust_changed:
            return "resumed a session from before the client CA changed"
        return None

    def files_changed(self) -> bool:
        """Cheap: whether a file the contexts came from looks different (one stat each)."""
        return self.watch.changed()

    def reload(self, read_file: ReadFile | None = None) -> ReloadResult:
        """Re-read every file; swap in new contexts when any byte changed. On any problem the
        contexts in use stay and the problems are returned (each names its key path)."""
        return self.apply(self.settings, read_file)

    def apply(self, settings: ListenTLS, read_file: ReadFile | None = None) -> ReloadResult:
        """Use new ``[listen.tls]`` settings (and the files' current bytes) for new handshakes.
        ``handshake_timeout`` is a listener parameter: it takes effect when the listener is
        made again (``needs_new_listener``)."""
        rf = read_file or self.read_file
        self.watch.mark()  # before reading: a change during the read is seen next time
        try:
            built = _build(settings, rf, self.path)
        except ConfigError as e:
            return ReloadResult(False, tuple(e.errors))
        same = built.digest == self.built.digest and settings == self.settings
        if same:
            return ReloadResult(False, ())
        front = self.context
        # settings OpenSSL copies from the front context when it accepts a connection
        front.minimum_version = MIN_VERSIONS[settings.min_version]
        front.verify_mode = CLIENT_AUTH[settings.client_auth]
        front.set_alpn_protocols(list(settings.alpn))
        _set_tickets(front, settings)
        if built.trust != self.built.trust:
            self.trust_changed = int(time.time())
        self.gate.limit = settings.max_handshakes
        self.gate.timeout = settings.handshake_timeout
        self.built = built
        if settings.files() != self.settings.files():
            self.watch = FileWatch(settings.files())
        self.settings = settings
        self.reloads += 1
        return ReloadResult(True, ())


def needs_new_listener(old: ListenTLS | None, new: ListenTLS | None) -> bool:
    """Whether a configuration change needs the listener made again (``create_server``
    parameters): TLS switched on or off, or a new handshake timeout. Everything else is
    applied in place by ``CertStore.apply``. Pure."""
    if (old is None) != (new is None):
        return True
    return old is not None and new is not None and old.handshake_timeout != new.handshake_timeout


def server_context(settings: ListenTLS, read_file: ReadFile = read_disk) -> ssl.SSLContext:
    """A listener context with SNI selection (no reload: use ``CertStore`` for that)."""
    return CertStore(settings, read_file).context


# ---------------------------------------------------------------------------------------
# the handshake cap


class HandshakeRefused(ssl.SSLError):
    """A connection closed before its handshake because too many were in progress."""


class HandshakeGate:
    """Caps TLS handshakes in progress at ``limit`` (0: no cap) and counts them.

    asyncio's TLS (CPython's and uvloop's ``SSLProtocol``) calls the protocol factory at
    accept and ``connection_made`` only after a successful handshake; a handshake that
    fails, times out or is abandoned is never reported to the protocol. So the count lives
    in the SSL object the context makes for each connection (``sslobject_class``): the
    event loop calls its ``do_handshake`` once at accept (before any byte is read) and again
    after each read until it returns (done) or raises an error other than want-read/write
    (failed). A connection admitted past ``limit`` fails that first call with
    ``HandshakeRefused``: the loop closes it before reading the ClientHello, so a refused
    client costs no cryptography. A handshake that neither finishes nor fails (the peer
    went away, the loop's handshake timeout aborted it) is released when its SSL object is
    freed, and at the latest ``timeout`` after it began (the loop has aborted it by then).
    """

    def __init__(self, limit: int, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.timeout = timeout
        self.clock = clock
        self._count = 0
        self.admitted = 0  # handshakes begun (counter)
        self.completed = 0  # handshakes that finished (counter)
        self.refused = 0  # connections closed because the cap was reached (counter)
        self.stale = 0  # handshakes refused by ``check`` once finished (counter)
        # called with each server-side SSL object whose handshake finished; a reason
        # returned fails the handshake (CertStore refuses stale resumed sessions)
        self.check: Callable[[ssl.SSLObject], str | None] | None = None
        self._open: deque[list[Any]] = deque()  # [began, done] in admission order
        self.sslobject_class = self._make_class()

    def _make_class(self) -> type[ssl.SSLObject]:
        gate = self

        class GatedSSLObject(ssl.SSLObject):
            _gate_token: list[Any] | None = None
            _gate_refused = False

            def do_handshake(self) -> None:
                token = self._gate_token
                if token is None:
                    if self._gate_refused or not self.server_side:
                        if self._gate_refused:
                            raise HandshakeRefused("too many TLS handshakes in progress")
                        return super().do_handshake()
                    token = gate._admit()
                    if token is None:
                        self._gate_refused = True
                        raise HandshakeRefused("too many TLS handshakes in progress")
                    self._gate_token = token
                elif token[1]:
                    return super().do_handshake()
                try:
                    super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    raise
                except BaseException:
                    gate._finish(token, False)
                    raise
                why = gate.check(self) if gate.check is not None else None
                if why:
                    gate.stale += 1
                    gate._finish(token, False)
                    raise ssl.SSLError(why)
                gate._finish(token, True)

            def __del__(self) -> None:
                token = self._gate_token
                if token is not None and not token[1]:
                    gate._finish(token, False)

        return GatedSSLObject

    def install(self, ctx: ssl.SSLContext) -> None:
        ctx.sslobject_class = self.sslobject_class

    @property
    def in_progress(self) -> int:
        """Handshakes begun and not yet finished, failed, freed or past the timeout."""
        self._expire(self.clock())
        return self._count

    def _expire(self, now: float) -> None:
        q = self._open
        horizon = now - self.timeout - 1.0
        while q and (q[0][1] or q[0][0] < horizon):
            token = q.popleft()
            if not token[1]:
                token[1] = True
                self._count -= 1

    def _admit(self) -> list[Any] | None:
        now = self.clock()
        self._expire(now)
        if self.limit and self._count >= self.limit:
            self.refused += 1
            return None
        token = [now, False]
        self._open.append(token)
        self._count += 1
        self.admitted += 1
        return token

    def _finish(self, token: list[Any], ok: bool) -> None:
        if token[1]:
            return
        token[1] = True
        self._count -= 1
        if ok:
            self.completed += 1


# ---------------------------------------------------------------------------------------
# backends


class SessionCache:
    """Client-side TLS session resumption for one context, per server name: a new
    connection to a backend offers the session (TLS 1.2 id or ticket, TLS 1.3 ticket,
    RFC 8446 §2.2) of an earlier connection to the same name, so the pool's new
    connections skip the backend's signature and the proxy's certificate verification.

    OpenSSL keeps no client-side cache and asyncio passes no session, so the SSL objects
    the context makes (``sslobject_class``) do it: before the first handshake step each one
    takes the newest session known for its name; the sessions are collected from the most
    recent connection when the next one starts, and from each connection when it is freed
    (a TLS 1.3 ticket arrives after the handshake). Memory: one session per server name."""

    def __init__(self) -> None:
        self.sessions: dict[str, ssl.SSLSession] = {}
        self.recent: dict[str, weakref.ref[ssl.SSLObject]] = {}
        self.offered = 0  # handshakes that offered a session (counter)
        self.resumed = 0  # ... that the backend accepted (counter)
        self.sslobject_class = self._make_class()

    def _keep(self, host: str, obj: ssl.SSLObject) -> None:
        try:
            sess = obj.session
        except (ValueError, AttributeError):
            return
        if sess is not None and (sess.has_ticket or sess.id):
            self.sessions[host] = sess

    def take(self, host: str) -> ssl.SSLSession | None:
        ref = self.recent.get(host)
        obj = ref() if ref is not None else None
        if obj is not None:
            self._keep(host, obj)
        sess = self.sessions.get(host)
        if sess is not None and time.time() > sess.time + sess.timeout:
            del self.sessions[host]
            return None
        return sess

    def _make_class(self) -> type[ssl.SSLObject]:
        cache = self

        class ResumingSSLObject(ssl.SSLObject):
            _cache_started = False

            def do_handshake(self) -> None:
                host = self.server_hostname
                if not self._cache_started and not self.server_side and host:
                    self._cache_started = True
                    sess = cache.take(host)
                    if sess is not None:
                        try:
                            self.session = sess
                            cache.offered += 1
                        except ValueError:  # made by another context: full handshake
                            pass
                    cache.recent[host] = weakref.ref(self)
                try:
                    super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    raise
                except ssl.SSLError:
                    if host:  # do not offer a session the peer may have refused again
                        cache.sessions.pop(host, None)
                        cache.recent.pop(host, None)
                    raise
                if self.session_reused:
                    cache.resumed += 1

            def __del__(self) -> None:
                host = self.server_hostname
                if self._cache_started and host:
                    cache._keep(host, self)

        return ResumingSSLObject


def context_key(settings: BackendTLS, alpn: str, read_file: ReadFile = read_disk) -> tuple:
    """What a backend's client context is built from: its settings, the ALPN protocol and
    the bytes of its files. Contexts cached under it are rebuilt when a file is renewed in
    place (the same path, new bytes) and the configuration reloaded. A file that cannot be
    read gives a key no context has: ``client_context`` then says why, by key path."""
    digests: list[bytes | None] = []
    for f in settings.files():
        try:
            digests.append(hashlib.sha256(read_file(f)).digest())
        except OSError:
            digests.append(None)
    return (settings, alpn, tuple(digests))


def client_context(
    settings: BackendTLS,
    read_file: ReadFile = read_disk,
    path: str = "backends.tls",
    alpn: str = "http/1.1",
) -> ssl.SSLContext:
    """The context for TLS connections to a backend: certificate and host name verified
    (RFC 6125) against ``ca_file`` or the system store unless ``verify`` is false; a client
    certificate when ``cert``/``key`` are set; sessions resumed across connections
    (``SessionCache``, reachable as ``session_cache(ctx)``). Raises ConfigError naming the
    key path. ``loop.create_connection(..., ssl=ctx, server_hostname=server_hostname(...))``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cache = SessionCache()
    ctx.sslobject_class = cache.sslobject_class
    setattr(ctx, "stickyproxy_sessions", cache)  # noqa: B010
    ctx.minimum_version = MIN_VERSIONS[settings.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # ``alpn``: the one protocol offered, the backend's ``protocol`` ("h2" or "http/1.1")
    ctx.set_alpn_protocols([alpn])
    errors: list[str] = []
    if settings.verify:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if settings.ca_file:
            try:
                data = _read(read_file, settings.ca_file, f"{path}.ca_file")
                _load_ca(ctx, data, f"{path}.ca_file", settings.ca_file)
            except _Problem as e:
                errors.append(str(e))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.cert:
        try:
            c = _read(read_file, settings.cert, f"{path}.cert")
            k = _read(read_file, settings.key, f"{path}.key")
            _load_chain(ctx, c, k, f"{path}.cert", f"{path}.key", settings.cert, settings.key)
        except _Problem as e:
            errors.append(str(e))
    if errors:
        raise ConfigError(errors)
    return ctx


def session_cache(ctx: ssl.SSLContext) -> SessionCache | None:
    """The session cache of a context made by ``client_context`` (for its counters)."""
    cache = getattr(ctx, "stickyproxy_sessions", None)
    return cache if isinstance(cache, SessionCache) else None


def server_hostname(settings: BackendTLS, url_host: str) -> str:
    """The name sent by SNI and checked against the backend's certificate: the override,
    else the URL's host (an IP address is checked against the certificate's IP SANs and,
    per RFC 6066 §3, not sent by SNI: OpenSSL and asyncio do both)."""
    return settings.server_name or url_host.strip("[]")


# OpenSSL verification results (X509_V_ERR_*) said plainly; the rest use OpenSSL's text.
_VERIFY_CODES: Final = {
    10: "certificate has expired",
    9: "certificate is not yet valid",
    18: "self-signed certificate, not trusted",
    19: "self-signed certificate in the chain, not trusted",
    20: "certificate not trusted (issuer unknown)",
    21: "certificate not trusted (issuer unknown)",
    23: "certificate has been revoked",
    26: "certificate not valid for this purpose",
}
_ALERT_REASONS: Final = {
    "NO_H2_ALPN": "the backend did not choose HTTP/2 (h2) by ALPN",
    "WRONG_VERSION_NUMBER": "not a TLS server (plain HTTP?)",
    "RECORD_LAYER_FAILURE": "not a TLS server (plain HTTP?)",
    "PACKET_LENGTH_TOO_LONG": "not a TLS server (plain HTTP?)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common",
    "NO_PROTOCOLS_AVAILABLE": "no TLS version in common",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "handshake refused by the peer (no cipher in common?)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our client certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer refused our client certificate",
    "TLSV1_ALERT_INTERNAL_ERROR": "the peer failed the handshake (internal error)",
    "HTTP_REQUEST": "plain HTTP sent to a TLS port",
}


def describe_verify_error(exc: BaseException) -> str:
    """One short line saying why a TLS handshake failed, for a 502's reason and a log line:
    "TLS: certificate has expired", "TLS: certificate is not valid for 'db.internal'".
    A wrapper (aiohttp's ClientSSLError, an exception raised ``from`` one) is looked
    through to the ssl error it carries."""
    for _ in range(4):
        # aiohttp's certificate error is itself a CertificateError, without the details
        inner = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None)
        if inner is None and not isinstance(exc, ssl.SSLError):
            inner = exc.__cause__
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", 0)
        msg = str(getattr(exc, "verify_message", "") or "")
        if code == 62 or msg.lower().startswith("hostname mismatch"):
            m = re.search(r"'([^']*)'", msg)
            return (
                f"TLS: certificate is not valid for {m.group(1)!r}"
                if m
                else "TLS: certificate is not valid for this host name"
            )
        if code == 64 or msg.lower().startswith("ip address mismatch"):
            m = re.search(r"'([^']*)'", msg)
            return (
                f"TLS: certificate is not valid for {m.group(1)!r}"
                if m
                else "TLS: certificate is not valid for this address"
            )
        if code in _VERIFY_CODES:
            return f"TLS: {_VERIFY_CODES[code]}"
        return f"TLS: certificate refused ({msg or 'verification failed'})"
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if isinstance(reason, str):
            return f"TLS: {_ALERT_REASONS.get(reason, reason.replace('_', ' ').lower())}"
        return "TLS: handshake failed"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "TLS: connection closed during the handshake"
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return "TLS: handshake timed out"
    return f"TLS: {type(exc).__name__}"


# ---------------------------------------------------------------------------------------
# client identity


def identity_from_cert(cert: dict[str, Any] | None, kind: str = "cn") -> str | None:
    """The identity a verified peer certificate names, from ``getpeercert()``'s dict: the
    subject's (last, most specific) common name for ``"cn"``, or the first SAN of type
    ``"dns"``, ``"uri"`` or ``"email"``. None when the certificate has none, or when the
    value could not be put in a header as is (control or non-ASCII characters, longer than
    MAX_IDENTITY): an identity is never altered to fit. Pure."""
    if not cert:
        return None
    value: str | None = None
    if kind == "cn":
        for rdn in cert.get("subject", ()):
            for attr, v in rdn:
                if attr == "commonName":
                    value = v
    else:
        want = {"dns": "DNS", "uri": "URI", "email": "email"}[kind]
        for typ, v in cert.get("subjectAltName", ()):
            if typ == want:
                value = v
                break
    if not value or len(value) > MAX_IDENTITY:
        return None
    if any(not 0x20 < ord(c) < 0x7F and c != " " for c in value) or value != value.strip():
        return None
    return value


def sni_name(ssl_object: Any) -> str | None:
    """The server name a client sent by SNI on a connection the listener accepted (an
    A-label, RFC 6066 §3), or None. The standard library shows it only to the callback,
    which keeps it on the SSL object."""
    return getattr(ssl_object, "sni_name", None)


def client_identity(ssl_object: Any, kind: str = "cn") -> str | None:
    """The verified client's identity on a TLS connection (``transport.get_extra_info(
    "ssl_object")``), or None without a verified client certificate. ``getpeercert()``
    returns the certificate only when it was verified (CERT_OPTIONAL verifies one that is
    sent and fails the handshake when it does not verify)."""
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, AttributeError):  # handshake not done
        return None
    return identity_from_cert(cert, kind)
