"""stickyproxy.context: per-user context kept in the app instance's memory, fenced in Redis.

    store = ContextStore("redis://127.0.0.1:6379/0")
    async with store:
        async with store.edit("alice") as ctx:
            ctx["visits"] = ctx.get("visits", 0) + 1
        print((await store.get("alice"))["visits"])

See docs/context.md for the guarantees, costs and failure modes.
"""

from .breaker import BreakerState
from .cache import GuardedCache, OriginUnavailable
from .errors import (
    BufferFull,
    ConfigError,
    ConflictError,
    ContextError,
    MissingUserKey,
    RecordMismatch,
    SerializationError,
    StoreClosed,
    StoreUnavailable,
)
from .headers import StickyHeaders, StickyInfo
from .jobs import JobHandle, Jobs, JobsFull, UnknownJob, job_events_response, sse_stream
from .metrics import ContextMetrics
from .middleware_aiohttp import context_middleware, get_context, get_info, metrics_handler
from .middleware_asgi import StickyContextMiddleware, metrics_app, sticky_context
from .ratelimit import Decision, Limit, RateLimiter, RateLimitMiddleware, rate_limit_middleware
from .revocation import (
    MalformedToken,
    RevocationMiddleware,
    Revocations,
    TooManyRevocations,
    UnknownToken,
    revocation_middleware,
)
from .serializers import JsonSerializer, Serializer
from .store import ContextStore

__all__ = [
    "BreakerState",
    "BufferFull",
    "ConfigError",
    "ConflictError",
    "ContextError",
    "ContextMetrics",
    "ContextStore",
    "Decision",
    "GuardedCache",
    "JobHandle",
    "Jobs",
    "JobsFull",
    "JsonSerializer",
    "Limit",
    "MalformedToken",
    "MissingUserKey",
    "OriginUnavailable",
    "RateLimitMiddleware",
    "RateLimiter",
    "RecordMismatch",
    "RevocationMiddleware",
    "Revocations",
    "SerializationError",
    "Serializer",
    "StickyContextMiddleware",
    "StickyHeaders",
    "StickyInfo",
    "StoreClosed",
    "StoreUnavailable",
    "TooManyRevocations",
    "UnknownJob",
    "UnknownToken",
    "context_middleware",
    "get_context",
    "get_info",
    "job_events_response",
    "metrics_app",
    "metrics_handler",
    "rate_limit_middleware",
    "revocation_middleware",
    "sse_stream",
    "sticky_context",
]
