"""Per-user rate limits at the owner: a token bucket per (user, named limit) in this instance's
memory, backed by a snapshot in the user's context that a new owner rehydrates from.

Invariants:
* A bucket never holds more than ``burst`` tokens, so any instance that misjudges a user's
  budget (a move, an evicted bucket, a lost snapshot) grants at most ``burst`` extra.
* With the user's context in play (``check(..., context=ctx)`` or a limiter built with a
  store), the snapshot in the context never implies more than ``burst * MATERIAL_SHARE``
  tokens beyond the true budget: whenever consumption makes the gap reach that, the bucket is
  written to the context (one fenced write). A new owner starts from the snapshot, so a move
  grants less than half a burst extra. A user who stays within the rate never causes a write.
* The local bucket is never more generous than the snapshot: every check takes the smaller of
  the two, so a user who moved away and came back is held to what the other owner recorded.
* No Redis command is issued to decide: a check reads memory (and the already loaded context).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from .errors import ConfigError, ConflictError, StoreUnavailable
from .headers import DEFAULT_HEADERS, StickyHeaders, user_key_problem
from .metrics import RateLimitMetrics
from .middleware_aiohttp import CONTEXT_KEY
from .middleware_asgi import SCOPE_CONTEXT_KEY

# The context key holding this library's bucket snapshots: {limit name: [tokens, unix time]}.
RATELIMIT_FIELD = "__stickyctx_ratelimit"
DEFAULT_LIMIT = "default"
# Buckets held in memory at once; beyond, the least recently used is forgotten (its user is
# then rehydrated from the snapshot, or granted at most one burst without one).
DEFAULT_MAX_BUCKETS = 100_000
# A snapshot is rewritten once it overstates the budget by this share of the burst: the bound
# on what a move can grant, traded against one write per half burst of consumption.
MATERIAL_SHARE = 0.5
# Largest rate or burst accepted: beyond, float arithmetic on tokens loses whole requests.
MAX_RATE = 1e9
MAX_BURST = 1_000_000_000
# Decimals kept in a snapshot (milli-tokens, milliseconds): small payload, no visible drift.
SNAPSHOT_DIGITS = 3

Clock = Callable[[], float]


@dataclass(frozen=True)
class Limit:
    """``rate`` tokens per second refill a bucket of ``burst`` tokens; a request costs one."""

    rate: float
    burst: int

    @classmethod
    def per(cls, count: int, seconds: float) -> Limit:
        """``count`` requests per ``seconds``, all of them usable at once."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds > 0:
            raise ConfigError(f"period: must be a positive number of seconds, got {seconds!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"burst: must be a positive integer, got {count!r}")
        return cls(rate=count / seconds, burst=count)


def limit_problems(name: str, limit: Any) -> list[str]:
    """Every reason ``limit`` is unusable, each prefixed with its key path ``limits[name]``."""
    where = f"limits[{name!r}]"
    if not isinstance(name, str) or not name:
        return [f"{where}: the limit's name must be a non-empty string"]
    if not isinstance(limit, Limit):
        return [f"{where}: must be a Limit, got {type(limit).__name__}"]
    problems = []
    rate = limit.rate
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not math.isfinite(rate)
        or not 0 < rate <= MAX_RATE
    ):
        problems.append(
            f"{where}.rate: must be a positive number of tokens per second (at most {MAX_RATE:g}), got {rate!r}"
        )
    burst = limit.burst
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        problems.append(
            f"{where}.burst: must be a positive integer (at most {MAX_BURST}), got {burst!r}"
        )
    return problems


# -- pure bucket arithmetic (no clock, no I/O) ---------------------------------------------


def refill(tokens: float, elapsed: float, limit: Limit) -> float:
    """Tokens after ``elapsed`` seconds; a clock that went backwards adds nothing."""
    return min(float(limit.burst), tokens + max(0.0, elapsed) * limit.rate)


def take(tokens: float, cost: int, limit: Limit) -> tuple[bool, float, float]:
    """(allowed, tokens after, seconds until ``cost`` tokens will be there if refused)."""
    if tokens >= cost:
        return True, tokens - cost, 0.0
    return False, tokens, (cost - tokens) / limit.rate


def parse_snapshot(raw: Any) -> tuple[float, float] | None:
    """(tokens, unix time) from a stored snapshot; None for anything malformed (ignored)."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        return None
    tokens, at = raw
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in (tokens, at)
    ):
        return None
    return max(0.0, float(tokens)), float(at)


def estimate(snapshot: tuple[float, float] | None, wall_now: float, limit: Limit) -> float:
    """The budget a snapshot implies now: a full bucket without one."""
    if snapshot is None:
        return float(limit.burst)
    tokens, at = snapshot
    return refill(min(tokens, float(limit.burst)), wall_now - at, limit)


def material(implied: float, tokens: float, limit: Limit) -> bool:
    """Whether the stored snapshot overstates the budget enough to be rewritten."""
    return implied - tokens >= limit.burst * MATERIAL_SHARE


def retry_after_seconds(wait: float) -> int:
    """``Retry-After`` value (RFC 9110 §10.2.3: whole delay-seconds), rounded up, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: str
    # Whole requests left after this one (allowed) or now (refused).
    remaining: int
    # Seconds until the request would be allowed; 0 when allowed.
    retry_after: float

    @property
    def retry_after_header(self) -> str:
        return str(retry_after_seconds(self.retry_after))


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens = tokens
        self.at = at


class RateLimiter:
    """Token buckets per (user, limit name) at the owner. See docs/context.md.

    ``check(user, name, context=ctx)`` decides from memory and the user's loaded context (in
    a handler under the context middleware: ``get_context(request)``); a snapshot it puts in
    ``ctx`` is saved with the request. ``await hit(user, name)`` does the same through
    ``store`` (a local read in steady state, one fenced write when the snapshot is rewritten);
    never call it while the same user's context is being edited (the user's lock is held).
    Without context or store the limits are local only: a move grants at most one burst.
    """

    def __init__(
        self,
        limits: Mapping[str, Limit],
        *,
        store: Any = None,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        problems: list[str] = []
        if not isinstance(limits, Mapping) or not limits:
            problems.append("limits: must name at least one Limit")
        else:
            for name, limit in limits.items():
                problems.extend(limit_problems(name, limit))
        if isinstance(max_buckets, bool) or not isinstance(max_buckets, int) or max_buckets < 1:
            problems.append(f"max_buckets: must be a positive integer, got {max_buckets!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        self.limits = dict(limits)
        self.store = store
        self.max_buckets = max_buckets
        if registry is None and store is not None:
            registry = store.metrics.registry
        self.metrics = RateLimitMetrics(registry)
        self._clock = clock
        self._wall = wall
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        for name in self.limits:
            for outcome in ("allowed", "refused"):
                self.metrics.decisions.labels(name, outcome)

    def __len__(self) -> int:
        return len(self._buckets)

    def _limit(self, name: str) -> Limit:
        limit = self.limits.get(name)
        if limit is None:
            raise KeyError(
                f"no rate limit named {name!r} (known: {', '.join(sorted(self.limits))})"
            )
        return limit

    @staticmethod
    def _cost(cost: int, limit: Limit) -> int:
        if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= limit.burst:
            raise ValueError(
                f"cost must be an integer from 1 to the limit's burst ({limit.burst}), got {cost!r}"
            )
        return cost

    def _decide(
        self, user: str, name: str, cost: int, snapshots: Mapping[str, Any] | None
    ) -> tuple[Decision, list[float] | None]:
        """The decision, and the snapshot to store if the stored one became too generous."""
        limit = self._limit(name)
        cost = self._cost(cost, limit)
        now, wall_now = self._clock(), self._wall()
        key = (user, name)
        bucket = self._buckets.get(key)
        implied = None
        if snapshots is not None:
            implied = estimate(parse_snapshot(snapshots.get(name)), wall_now, limit)
        if bucket is None:
            tokens = implied if implied is not None else float(limit.burst)
            bucket = self._buckets[key] = _Bucket(tokens, now)
            self._prune()
        else:
            self._buckets.move_to_end(key)
            tokens = refill(bucket.tokens, now - bucket.at, limit)
            if implied is not None:
                tokens = min(tokens, implied)
        allowed, tokens, wait = take(tokens, cost, limit)
        bucket.tokens, bucket.at = tokens, now
        self.metrics.decisions.labels(name, "allowed" if allowed else "refused").inc()
        decision = Decision(allowed, name, int(tokens), wait)
        if implied is not None and material(implied, tokens, limit):
            return decision, [round(tokens, SNAPSHOT_DIGITS), round(wall_now, SNAPSHOT_DIGITS)]
        return decision, None

    def _prune(self) -> None:
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        self.metrics.buckets.set(len(self._buckets))

    def check(
        self,
        user: str,
        name: str = DEFAULT_LIMIT,
        cost: int = 1,
        *,
        context: MutableMapping[str, Any] | None = None,
    ) -> Decision:
        """Decide from memory. With ``context`` (the user's mutable context, saved by the
        caller), the snapshot is read from it and, when it became too generous, rewritten."""
        snapshots = None
        if context is not None:
            raw = context.get(RATELIMIT_FIELD)
            snapshots = raw if isinstance(raw, dict) else {}
        decision, snapshot = self._decide(user, name, cost, snapshots)
        if snapshot is not None and context is not None:
            stored = context.get(RATELIMIT_FIELD)
            context[RATELIMIT_FIELD] = {
                **(stored if isinstance(stored, dict) else {}),
                name: snapshot,
            }
            self.metrics.persists.inc()
        return decision

    async def hit(self, user: str, name: str = DEFAULT_LIMIT, cost: int = 1) -> Decision:
        """Decide through ``store``: reads the user's context (from memory in steady state) and
        writes the snapshot back when it became too generous (one fenced write). If the store
        cannot be read or written the decision is made from memory alone (a move during the
        outage grants at most one burst)."""
        if self.store is None:
            return self.check(user, name, cost)
        snapshots: Mapping[str, Any] | None
        try:
            raw = (await self.store.get(user)).get(RATELIMIT_FIELD)
            snapshots = raw if isinstance(raw, dict) else {}
        except StoreUnavailable:
            self.metrics.state_errors.labels("read").inc()
            snapshots = None
        decision, snapshot = self._decide(user, name, cost, snapshots)
        if snapshot is not None:

            def put(context: dict[str, Any]) -> None:
                stored = context.get(RATELIMIT_FIELD)
                context[RATELIMIT_FIELD] = {
                    **(stored if isinstance(stored, dict) else {}),
                    name: snapshot,
                }

            try:
                await self.store.update(user, put)
                self.metrics.persists.inc()
            except (StoreUnavailable, ConflictError):
                self.metrics.state_errors.labels("write").inc()
        return decision

    def forget(self, user: str) -> None:
        """Drop ``user``'s buckets from memory (the snapshot in the context stays)."""
        for key in [k for k in self._buckets if k[0] == user]:
            del self._buckets[key]
        self.metrics.buckets.set(len(self._buckets))


# -- framework helpers ---------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Decisions already made for a request, by limit name (a rerun is not charged again).
DECIDED_KEY: web.RequestKey[dict[str, Decision]] = web.RequestKey("sticky_ratelimit", dict)
SCOPE_DECIDED_KEY = "sticky_ratelimit"


def _refusal_text(decision: Decision) -> str:
    return f"rate limit {decision.limit!r} exceeded; retry in {decision.retry_after_header}s\n"


def rate_limit_middleware(
    limiter: RateLimiter,
    name: str = DEFAULT_LIMIT,
    *,
    cost: int = 1,
    headers: StickyHeaders = DEFAULT_HEADERS,
    skip: Callable[[web.Request], bool] | None = None,
) -> Middleware:
    """aiohttp middleware: 429 with ``Retry-After`` (RFC 6585 §4) once the request's user has
    spent the limit ``name``. Listed after :func:`context_middleware` it decides with the
    request's context (the snapshot is saved with the request); listed before it, or alone,
    it uses the limiter's store, or memory only. Requests without a user key pass."""
    limiter._cost(cost, limiter._limit(name))

    @web.middleware
    async def rate_limited(request: web.Request, handler: Handler) -> web.StreamResponse:
        user = request.headers.get(headers.key) or None
        if (
            user is None
            or user_key_problem(user) is not None
            or (skip is not None and skip(request))
        ):
            return await handler(request)
        # The context middleware re-runs the handler (and so this) after a conflict: the
        # request was decided, and charged, on its first run.
        decided = request.get(DECIDED_KEY)
        if decided is None:
            decided = request[DECIDED_KEY] = {}
        decision = decided.get(name)
        if decision is None:
            context = request.get(CONTEXT_KEY)
            if context is not None:
                decision = limiter.check(user, name, cost, context=context)
            else:
                decision = await limiter.hit(user, name, cost)
            decided[name] = decision
        if not decision.allowed:
            return web.Response(
                status=429,
                text=_refusal_text(decision),
                headers={"Retry-After": decision.retry_after_header},
            )
        return await handler(request)

    return rate_limited


class RateLimitMiddleware:
    """ASGI middleware: 429 with ``Retry-After`` once the user has spent the limit ``name``.
    Wrap it inside :class:`StickyContextMiddleware` to decide with the request's context
    (``StickyContextMiddleware(RateLimitMiddleware(app, limiter), store)``); outside it the
    limiter's store, or memory only, is used. Non-HTTP scopes and keyless requests pass."""

    def __init__(
        self,
        app: Any,
        limiter: RateLimiter,
        name: str = DEFAULT_LIMIT,
        *,
        cost: int = 1,
        headers: StickyHeaders = DEFAULT_HEADERS,
    ) -> None:
        limiter._cost(cost, limiter._limit(name))
        self.app = app
        self.limiter = limiter
        self.name = name
        self.cost = cost
        self._key = headers.key.lower().encode("latin-1")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = next(
            (
                bytes(v).decode("latin-1")
                for k, v in scope.get("headers", ())
                if bytes(k).lower() == self._key
            ),
            None,
        )
        if not user or user_key_problem(user) is not None:
            await self.app(scope, receive, send)
            return
        decided = scope.setdefault(SCOPE_DECIDED_KEY, {})
        decision = decided.get(self.name)
        if decision is None:  # not decided on an earlier run of this request (see above)
            context = scope.get(SCOPE_CONTEXT_KEY)
            if context is not None:
                decision = self.limiter.check(user, self.name, self.cost, context=context)
            else:
                decision = await self.limiter.hit(user, self.name, self.cost)
            decided[self.name] = decision
        if decision.allowed:
            await self.app(scope, receive, send)
            return
        body = _refusal_text(decision).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", decision.retry_after_header.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
