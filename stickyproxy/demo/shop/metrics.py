"""The shop's own metrics (prefix ``shop_``), in the registry the context store also uses, so
one ``/metrics`` serves both."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ShopMetrics:
    def __init__(self, registry: CollectorRegistry, *, node: str, mode: str) -> None:
        self.registry = registry
        self.requests = Counter(
            "shop_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "shop_rate_limited", "Requests refused by the per-user rate limit.", registry=registry
        )
        self.jobs_started = Counter(
            "shop_jobs_started", "Jobs started on this instance.", registry=registry
        )
        self.jobs_running = Gauge(
            "shop_jobs_running", "Jobs running on this instance.", registry=registry
        )
        self.rate_limit_users = Gauge(
            "shop_rate_limit_users",
            "Users whose rate-limit window is held in local memory.",
            registry=registry,
        )
        info = Gauge(
            "shop_info",
            "1, labelled with this instance's node id and mode.",
            ["node", "mode"],
            registry=registry,
        )
        info.labels(node, mode).set(1)
