"""The context library's Prometheus metrics (prefix ``stickyctx_``), defined once.

Each store registers its metrics in its own ``CollectorRegistry`` unless given one, so several
stores in one process never collide; pass ``prometheus_client.REGISTRY`` to use the default.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ACQUIRE_REASONS = ("first", "takeover", "revalidate", "lost")
DROP_REASONS = (
    "taken_over",
    "deleted",
    "record_lost",
    "own_later_acquire",
    "record_mismatch",
    "closed",
)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ContextMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.local_hits = Counter(
            "stickyctx_local_hits",
            "Context reads and edits served from local memory with no Redis call.",
            registry=r,
        )
        self.acquisitions = Counter(
            "stickyctx_acquisitions",
            "Users acquired from Redis, by reason: first (no previous owner), takeover (another "
            "instance owned it), revalidate (this instance re-checked or re-took a user it had held), "
            "lost (Redis no longer had the epoch this instance held).",
            ["reason"],
            registry=r,
        )
        self.writes = Counter("stickyctx_writes", "Context changes committed to Redis.", registry=r)
        self.conflicts = Counter(
            "stickyctx_conflicts",
            "Writes rejected by the epoch/owner fence (another owner took over).",
            registry=r,
        )
        self.takeovers_received = Counter(
            "stickyctx_takeovers_received",
            "Takeover messages that made this instance drop a user it held.",
            registry=r,
        )
        self.redis_errors = Counter(
            "stickyctx_redis_errors",
            "Redis calls that failed or timed out, by operation.",
            ["op"],
            registry=r,
        )
        self.breaker_rejections = Counter(
            "stickyctx_breaker_rejections",
            "Calls refused without touching the network because the breaker was open.",
            registry=r,
        )
        self.fenced_flushes = Counter(
            "stickyctx_fenced_flushes",
            "Buffered or write-behind changes dropped at flush by the fence (reason in dropped_changes_total).",
            registry=r,
        )
        self.dropped_changes = Counter(
            "stickyctx_dropped_changes",
            "Acknowledged buffered or write-behind changes that never reached Redis, by reason: "
            "taken_over, deleted, record_lost, record_mismatch, closed (store closed before Redis took them).",
            ["reason"],
            registry=r,
        )
        self.unverified_refusals = Counter(
            "stickyctx_unverified_refusals",
            "Uses refused because the local copy was unverified and Redis could not be reached to check it.",
            registry=r,
        )
        self.master_switches = Counter(
            "stickyctx_master_switches",
            "Sentinel announcements of a new master that this store acted on.",
            registry=r,
        )
        self.listener_reconnects = Counter(
            "stickyctx_listener_reconnects",
            "Times the takeover listener lost its connection.",
            registry=r,
        )
        self.entries = Gauge("stickyctx_entries", "Users held in local memory.", registry=r)
        self.entry_bytes = Gauge(
            "stickyctx_entry_bytes", "Bytes of context held in local memory.", registry=r
        )
        self.buffered_writes = Gauge(
            "stickyctx_buffered_writes", "Users whose latest change waits for Redis.", registry=r
        )
        self.breaker_state = Gauge(
            "stickyctx_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
            registry=r,
        )
        self.listener_up = Gauge(
            "stickyctx_listener_up", "1 while the takeover listener is subscribed.", registry=r
        )
        for reason in ACQUIRE_REASONS:
            self.acquisitions.labels(reason)
        for reason in DROP_REASONS:
            self.dropped_changes.labels(reason)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


RATELIMIT_OUTCOMES = ("allowed", "refused")
STATE_OPS = ("read", "write")


class RateLimitMetrics:
    """Metrics of one :class:`~stickyproxy.context.ratelimit.RateLimiter` (prefix ``stickyctx_ratelimit_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter(
            "stickyctx_ratelimit_decisions",
            "Rate-limit checks, by limit name and outcome (allowed, refused).",
            ["limit", "outcome"],
            registry=r,
        )
        self.persists = Counter(
            "stickyctx_ratelimit_persists",
            "Bucket snapshots put in the user's context because the budget fell materially below "
            "what the stored snapshot implies (each one fenced write, or part of the request's save).",
            registry=r,
        )
        self.state_errors = Counter(
            "stickyctx_ratelimit_state_errors",
            "Reads or writes of a bucket snapshot that failed (the decision was made from memory).",
            ["op"],
            registry=r,
        )
        self.buckets = Gauge(
            "stickyctx_ratelimit_buckets", "Buckets (user, limit) held in memory.", registry=r
        )
        for op in STATE_OPS:
            self.state_errors.labels(op)


class RevocationMetrics:
    """Metrics of one :class:`~stickyproxy.context.revocation.Revocations` (prefix ``stickyctx_revocation_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.checks = Counter(
            "stickyctx_revocation_checks",
            "Tokens checked, by outcome: ok, revoked, malformed, unavailable (context unreadable).",
            ["outcome"],
            registry=r,
        )
        self.revocations = Counter(
            "stickyctx_revocation_revocations",
            "Revocations written, by kind: token, all.",
            ["kind"],
            registry=r,
        )
        for outcome in ("ok", "revoked", "malformed", "unavailable"):
            self.checks.labels(outcome)
        for kind in ("token", "all"):
            self.revocations.labels(kind)


JOB_OUTCOMES = ("done", "failed", "cancelled")


class JobMetrics:
    """Metrics of one :class:`~stickyproxy.context.jobs.Jobs` (prefix ``stickyctx_jobs_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.started = Counter(
            "stickyctx_jobs_started", "Jobs started or resumed on this instance.", registry=r
        )
        self.finished = Counter(
            "stickyctx_jobs_finished",
            "Jobs ended on this instance, by outcome: done, failed, cancelled.",
            ["outcome"],
            registry=r,
        )
        self.unsaved = Counter(
            "stickyctx_jobs_unsaved",
            "Job outcomes that Redis did not take after every retry (a later owner reports the job running, then lost).",
            registry=r,
        )
        self.running = Gauge("stickyctx_jobs_running", "Jobs running on this instance.", registry=r)
        for outcome in JOB_OUTCOMES:
            self.finished.labels(outcome)


CACHE_LOOKUPS = ("hit", "miss", "coalesced", "stale", "unavailable")
ORIGIN_OUTCOMES = ("ok", "error", "timeout")


class CacheMetrics:
    """Metrics of one :class:`~stickyproxy.context.cache.GuardedCache` (prefix ``stickyctx_cache_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.lookups = Counter(
            "stickyctx_cache_lookups",
            "Cache lookups, by outcome: hit, miss (loaded from the origin), coalesced (waited for "
            "a load in flight), stale (origin failing, a stale entry served), unavailable (error raised).",
            ["outcome"],
            registry=r,
        )
        self.origin_loads = Counter(
            "stickyctx_cache_origin_loads",
            "Origin loads, by outcome: ok, error, timeout.",
            ["outcome"],
            registry=r,
        )
        self.invalidations = Counter(
            "stickyctx_cache_invalidations", "Entries dropped by invalidate().", registry=r
        )
        self.entries = Gauge("stickyctx_cache_entries", "Entries held.", registry=r)
        self.breaker_state = Gauge(
            "stickyctx_cache_breaker_state",
            "Origin circuit breaker: 0 closed, 1 open, 2 half-open.",
            registry=r,
        )
        for outcome in CACHE_LOOKUPS:
            self.lookups.labels(outcome)
        for outcome in ORIGIN_OUTCOMES:
            self.origin_loads.labels(outcome)
