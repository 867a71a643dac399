"""Token revocation at the owner: revoked token ids (``jti``) and a user-wide cut-off
("every token issued before T", for logout-everywhere or a password change) kept in the
user's context, so a check is a read of memory and a revocation is one fenced write.

Invariants:
* A revocation lives as long as any token it covers: a ``jti`` entry until that token's
  ``exp``, a cut-off until ``before + max_token_lifetime``. ``max_token_lifetime`` may not
  exceed the store's ``idle_ttl``, and every revocation refreshes the record's TTL, so Redis
  never forgets a revocation while a token it covers is still valid.
* Entries past their end are pruned at every revocation write, so a user's list holds only
  live entries (at most ``MAX_REVOKED_TOKENS``).
* The check trusts the claims it is given: the proxy (or the app) has verified the token's
  signature, ``exp``, ``nbf``, ``iss`` and ``aud``; this module only decides revocation.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from .errors import ConfigError, ContextError, StoreUnavailable
from .headers import DEFAULT_HEADERS, StickyHeaders, user_key_problem
from .metrics import RevocationMetrics
from .middleware_aiohttp import CONTEXT_KEY
from .middleware_asgi import SCOPE_CONTEXT_KEY
from .settings import parse_duration

# The context key holding revocations: {"jti": {jti: exp}, "before": [cut-off, until]}.
REVOKED_FIELD = "__stickyctx_revoked"
# Revoked tokens kept per user: beyond, revoke the user's tokens with a cut-off instead.
MAX_REVOKED_TOKENS = 1_000
# Longest jti accepted (RFC 7519 §4.1.7 sets none; this bounds the context's size).
MAX_JTI_LENGTH = 256
# Longest bearer token decoded by the helpers (the proxy refuses larger ones before parsing).
MAX_TOKEN_BYTES = 8192
# Seconds a client is told to wait when revocations cannot be checked.
RETRY_AFTER = "1"

Clock = Callable[[], float]


class MalformedToken(ContextError, ValueError):
    """A token or its claims cannot be read (not a JWT, bad base64/JSON, a claim of the wrong type)."""


class UnknownToken(ContextError, KeyError):
    """A ``jti`` asked to be un-revoked is not in the user's revocation list."""

    def __init__(self, user: str, jti: str) -> None:
        super().__init__(f"token {jti!r} of user {user!r} is not revoked")
        self.user = user
        self.jti = jti

    def __str__(self) -> str:
        return str(self.args[0])


class TooManyRevocations(ContextError, ValueError):
    """The user already has ``MAX_REVOKED_TOKENS`` live revoked tokens."""


# -- pure logic (no clock, no I/O) ---------------------------------------------------------


@dataclass(frozen=True)
class TokenClaims:
    """The claims revocation looks at (RFC 7519 §4.1.4, §4.1.6, §4.1.7)."""

    jti: str | None
    iat: float | None
    exp: float | None


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedToken(f"claim {name!r} must be a NumericDate (RFC 7519 §2), got {value!r}")
    return float(value)


def token_claims(claims: Mapping[str, Any]) -> TokenClaims:
    """The revocation-relevant claims of a verified token; wrong types are :class:`MalformedToken`."""
    if not isinstance(claims, Mapping):
        raise MalformedToken(f"claims must be a JSON object, got {type(claims).__name__}")
    jti = claims.get("jti")
    if jti is not None:
        jti = check_jti(jti)
    return TokenClaims(jti=jti, iat=_numeric_date(claims, "iat"), exp=_numeric_date(claims, "exp"))


def check_jti(jti: Any) -> str:
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
        raise MalformedToken(
            f"jti must be a non-empty string of at most {MAX_JTI_LENGTH} characters, got {jti!r}"
        )
    return jti


def unverified_claims(authorization: str) -> Mapping[str, Any] | None:
    """The payload of an ``Authorization: Bearer <JWT>`` value (RFC 6750 §2.1), *without*
    verifying it: only for apps behind the proxy's verifying JWT key source. None when the
    value is not a bearer token; :class:`MalformedToken` when it is one that cannot be read."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise MalformedToken(f"bearer token longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedToken("bearer token is not a JWS compact serialization (RFC 7515 §7.1)")
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise MalformedToken("bearer token payload is not base64url-encoded JSON") from exc
    if not isinstance(claims, dict):
        raise MalformedToken("bearer token payload is not a JSON object")
    return claims


@dataclass(frozen=True)
class Revoked:
    """One user's revocations: ``jtis`` maps each revoked id to its token's ``exp``;
    tokens issued before ``before`` are revoked until ``until``."""

    jtis: Mapping[str, float]
    before: float | None = None
    until: float | None = None

    @classmethod
    def parse(cls, raw: Any) -> Revoked:
        """From the context; malformed parts are dropped (never a reason to admit or crash)."""
        if not isinstance(raw, Mapping):
            return EMPTY
        jtis = raw.get("jti")
        clean = {}
        if isinstance(jtis, Mapping):
            for jti, exp in jtis.items():
                if (
                    isinstance(jti, str)
                    and isinstance(exp, (int, float))
                    and not isinstance(exp, bool)
                ):
                    clean[jti] = float(exp)
        before = until = None
        cut = raw.get("before")
        if (
            isinstance(cut, list)
            and len(cut) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cut)
        ):
            before, until = float(cut[0]), float(cut[1])
        return cls(clean, before, until)

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {"jti": dict(self.jtis)}
        if self.before is not None and self.until is not None:
            out["before"] = [self.before, self.until]
        return out

    def pruned(self, now: float) -> Revoked:
        """Without entries whose tokens have all expired."""
        jtis = {j: exp for j, exp in self.jtis.items() if exp > now}
        if self.until is not None and self.until <= now:
            return Revoked(jtis)
        return Revoked(jtis, self.before, self.until)

    def verdict(self, token: TokenClaims, now: float) -> str | None:
        """Why ``token`` is revoked, or None. A token without ``iat`` cannot prove it was
        issued after a cut-off, so a live cut-off revokes it."""
        if token.jti is not None:
            exp = self.jtis.get(token.jti)
            if exp is not None and exp > now:
                return "token revoked"
        if self.before is not None and self.until is not None and self.until > now:
            if token.iat is None or token.iat < self.before:
                return "token issued before the user's tokens were revoked"
        return None


EMPTY = Revoked({})


# -- the API -------------------------------------------------------------------------------


class Revocations:
    """Revoked tokens per user, in the user's context. See docs/context.md.

    ``max_token_lifetime`` is the longest ``exp - iat`` the issuer grants: how long a cut-off
    must be kept. It may not exceed the store's ``idle_ttl`` (Redis would forget the user, and
    the revocation, while a covered token is still valid).

    Async methods go through the store (``revoke``/``revoke_all``/``restore``: one fenced write
    each; ``check``: a read of memory in steady state); never call them for a user whose
    context is being edited (inside a handler under the context middleware). The ``*_in``
    methods and :meth:`verdict` work on a context the caller holds and saves.
    """

    def __init__(
        self,
        store: Any,
        *,
        max_token_lifetime: float | str,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.time,
    ) -> None:
        lifetime = parse_duration(max_token_lifetime, name="max_token_lifetime")
        idle_ttl = store.settings.idle_ttl
        if lifetime > idle_ttl:
            raise ConfigError(
                f"max_token_lifetime: {lifetime:g}s exceeds the store's idle_ttl ({idle_ttl:g}s); "
                "an idle user's record, and its revocations, would expire before the tokens"
            )
        self.store = store
        self.max_token_lifetime = lifetime
        self.metrics = RevocationMetrics(
            registry if registry is not None else store.metrics.registry
        )
        self._clock = clock

    # -- on a context the caller holds --------------------------------------------------

    def verdict(self, context: Mapping[str, Any], claims: Mapping[str, Any]) -> str | None:
        """Why the token with these (verified) claims is revoked, or None. Constant time:
        only the token's own entry and the cut-off are read, however many are revoked."""
        token = token_claims(claims)
        raw = context.get(REVOKED_FIELD)
        if not isinstance(raw, Mapping):
            return None
        jtis = raw.get("jti")
        relevant = {"before": raw.get("before")}
        if token.jti is not None and isinstance(jtis, Mapping) and token.jti in jtis:
            relevant["jti"] = {token.jti: jtis[token.jti]}
        return Revoked.parse(relevant).verdict(token, self._clock())

    def revoke_in(self, context: MutableMapping[str, Any], jti: str, exp: float) -> bool:
        """Revoke token ``jti`` (whose ``exp`` is given) in ``context``. False if it has
        expired already (nothing to keep)."""
        jti = check_jti(jti)
        now = self._clock()
        exp_at = _numeric_date({"exp": exp}, "exp")
        assert exp_at is not None
        if exp_at > now + self.max_token_lifetime:
            raise MalformedToken(
                f"exp {exp!r} is beyond max_token_lifetime ({self.max_token_lifetime:g}s) from now; "
                "raise max_token_lifetime if the issuer grants tokens that long"
            )
        revoked = Revoked.parse(context.get(REVOKED_FIELD)).pruned(now)
        if exp_at <= now:
            return False
        if jti not in revoked.jtis and len(revoked.jtis) >= MAX_REVOKED_TOKENS:
            raise TooManyRevocations(
                f"{MAX_REVOKED_TOKENS} live revoked tokens already; revoke all of the user's tokens instead"
            )
        context[REVOKED_FIELD] = Revoked(
            {**revoked.jtis, jti: exp_at}, revoked.before, revoked.until
        ).dump()
        self.metrics.revocations.labels("token").inc()
        return True

    def revoke_all_in(
        self, context: MutableMapping[str, Any], before: float | None = None
    ) -> float:
        """Revoke every token issued before ``before`` (default: now). Returns the cut-off.
        ``iat`` is usually whole seconds, so a token issued in the same second as the cut-off
        is revoked too unless ``before`` is given explicitly."""
        now = self._clock()
        cut = now if before is None else _numeric_date({"before": before}, "before")
        assert cut is not None
        if cut > now:
            raise ValueError(f"before must not be in the future (got {before!r}, now {now:.3f})")
        revoked = Revoked.parse(context.get(REVOKED_FIELD)).pruned(now)
        if revoked.before is not None and revoked.before >= cut:
            return revoked.before
        until = cut + self.max_token_lifetime
        # Single revocations covered by the cut-off are redundant only if issued before it,
        # which their stored exp alone cannot tell: they are kept.
        context[REVOKED_FIELD] = Revoked(revoked.jtis, cut, until).dump()
        self.metrics.revocations.labels("all").inc()
        return cut

    def restore_in(self, user: str, context: MutableMapping[str, Any], jti: str) -> None:
        """Un-revoke ``jti``; :class:`UnknownToken` if it is not revoked."""
        jti = check_jti(jti)
        revoked = Revoked.parse(context.get(REVOKED_FIELD)).pruned(self._clock())
        if jti not in revoked.jtis:
            raise UnknownToken(user, jti)
        jtis = dict(revoked.jtis)
        del jtis[jti]
        context[REVOKED_FIELD] = Revoked(jtis, revoked.before, revoked.until).dump()

    # -- through the store ---------------------------------------------------------------

    async def check(self, user: str, claims: Mapping[str, Any]) -> str | None:
        """:meth:`verdict` on ``user``'s context (from memory in steady state).
        Raises :class:`StoreUnavailable` when the context cannot be read."""
        return self.verdict(await self.store.get(user), claims)

    async def revoke(self, user: str, jti: str, exp: float) -> bool:
        """:meth:`revoke_in`, saved: one fenced write, acknowledged once in Redis."""
        return bool(await self.store.update(user, lambda ctx: self.revoke_in(ctx, jti, exp)))

    async def revoke_token(self, user: str, claims: Mapping[str, Any]) -> bool:
        """Revoke the token whose verified claims are given (it needs ``jti`` and ``exp``)."""
        token = token_claims(claims)
        if token.jti is None:
            raise MalformedToken("token has no jti claim: revoke it with revoke_all")
        if token.exp is None:
            raise MalformedToken("token has no exp claim: its revocation would have no end")
        return await self.revoke(user, token.jti, token.exp)

    async def revoke_all(self, user: str, before: float | None = None) -> float:
        """:meth:`revoke_all_in`, saved: one fenced write."""
        return float(await self.store.update(user, lambda ctx: self.revoke_all_in(ctx, before)))

    async def restore(self, user: str, jti: str) -> None:
        """:meth:`restore_in`, saved: one fenced write."""
        await self.store.update(user, lambda ctx: self.restore_in(user, ctx, jti))


# -- framework helpers ---------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ClaimsOf = Callable[[Any], Mapping[str, Any] | None]


# (status, body, extra headers) of a refused request.
Refusal = tuple[int, str, dict[str, str]]


def _unauthorized(summary: str, detail: str | None = None) -> Refusal:
    # RFC 6750 §3: error="invalid_token" for a revoked or malformed access token; the
    # description is a fixed phrase (its grammar excludes '"' and '\\'), details go in the body.
    challenge = f'Bearer error="invalid_token", error_description="{summary}"'
    return 401, (detail or summary) + "\n", {"WWW-Authenticate": challenge}


async def _decide(
    revocations: Revocations,
    user: str,
    claims: Mapping[str, Any] | None,
    context: Mapping[str, Any] | None,
    fail_open: bool,
) -> Refusal | None:
    m = revocations.metrics.checks
    if claims is None:
        return None
    try:
        if context is not None:
            reason = revocations.verdict(context, claims)
        else:
            reason = await revocations.check(user, claims)
    except MalformedToken as exc:
        m.labels("malformed").inc()
        return _unauthorized("malformed token", f"malformed token: {exc}")
    except StoreUnavailable:
        m.labels("unavailable").inc()
        if fail_open:
            return None
        return 503, "token revocations cannot be checked now\n", {"Retry-After": RETRY_AFTER}
    if reason is not None:
        m.labels("revoked").inc()
        return _unauthorized("token revoked", reason)
    m.labels("ok").inc()
    return None


def _bearer_claims(authorization: str | None) -> Mapping[str, Any] | None:
    return unverified_claims(authorization) if authorization else None


def revocation_middleware(
    revocations: Revocations,
    *,
    claims: ClaimsOf | None = None,
    headers: StickyHeaders = DEFAULT_HEADERS,
    fail_open: bool = False,
) -> Middleware:
    """aiohttp middleware: 401 (``WWW-Authenticate: Bearer error="invalid_token"``) for a
    revoked or malformed token of the request's user (``X-Sticky-Key``). ``claims(request)``
    gives the verified claims (or None: nothing to check); by default the bearer token's
    payload is read unverified, which is right only behind the proxy's verifying JWT key
    source. After :func:`context_middleware` it checks the request's loaded context; alone it
    reads the store. Context unreadable (Redis down past the stale-read window): 503, or the
    request passes with ``fail_open``."""

    def default_claims(request: web.Request) -> Mapping[str, Any] | None:
        return _bearer_claims(request.headers.get("Authorization"))

    claims_of = claims or default_claims

    @web.middleware
    async def revocation_check(request: web.Request, handler: Handler) -> web.StreamResponse:
        user = request.headers.get(headers.key) or None
        if user is None or user_key_problem(user) is not None:
            return await handler(request)
        refusal: Refusal | None
        try:
            found = claims_of(request)
        except MalformedToken as exc:
            revocations.metrics.checks.labels("malformed").inc()
            refusal = _unauthorized("malformed token", f"malformed token: {exc}")
        else:
            refusal = await _decide(revocations, user, found, request.get(CONTEXT_KEY), fail_open)
        if refusal is not None:
            status, text, extra = refusal
            return web.Response(status=status, text=text, headers=extra)
        return await handler(request)

    return revocation_check


class RevocationMiddleware:
    """ASGI middleware doing what :func:`revocation_middleware` does; ``claims(scope)`` gives
    the verified claims. Inside :class:`StickyContextMiddleware` it checks the loaded context."""

    def __init__(
        self,
        app: Any,
        revocations: Revocations,
        *,
        claims: ClaimsOf | None = None,
        headers: StickyHeaders = DEFAULT_HEADERS,
        fail_open: bool = False,
    ) -> None:
        self.app = app
        self.revocations = revocations
        self.claims = claims
        self.fail_open = fail_open
        self._key = headers.key.lower().encode("latin-1")

    @staticmethod
    def _header(scope: Any, name: bytes) -> str | None:
        for k, v in scope.get("headers", ()):
            if bytes(k).lower() == name:
                return bytes(v).decode("latin-1")
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        user = self._header(scope, self._key) if scope["type"] == "http" else None
        if not user or user_key_problem(user) is not None:
            await self.app(scope, receive, send)
            return
        refusal: Refusal | None
        try:
            found = (
                self.claims(scope)
                if self.claims
                else _bearer_claims(self._header(scope, b"authorization"))
            )
        except MalformedToken as exc:
            self.revocations.metrics.checks.labels("malformed").inc()
            refusal = _unauthorized("malformed token", f"malformed token: {exc}")
        else:
            refusal = await _decide(
                self.revocations, user, found, scope.get(SCOPE_CONTEXT_KEY), self.fail_open
            )
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, text, extra = refusal
        body = text.encode()
        head = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        head += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body, "more_body": False})
