"""Latency at a fixed rate: p99 through each proxy minus p99 straight to a backend.

The rate is a fraction (one half) of stickyproxy's saturation throughput measured by wrk in
the same run at the same worker count; every target, and the backend on its own, gets that
same rate from the open-loop client in bench/httpclient.py, in interleaved rounds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import stats
from .httpclient import Outcome, Request, open_loop, run_loop

RATE_FRACTION = 0.5
CONNECTIONS = 64
# Requests due in a run's first moments open the connections; they are sent, not counted.
SETTLE_S = 0.5
DIRECT = "direct"
SEED = 1


@dataclass(frozen=True)
class Endpoint:
    label: str
    port: int


def _requests(users: int) -> Callable[[int], Request]:
    rng = random.Random(SEED)
    pool = [Request("GET", "/", f"user-{n}") for n in range(1, users + 1)]
    return lambda _i: pool[rng.randint(1, users) - 1]


def _figures(all_outcomes: Sequence[Outcome], rate: float, duration: float) -> dict[str, Any]:
    start = all_outcomes[0].due if all_outcomes else 0.0
    outcomes = [o for o in all_outcomes if o.due >= start + SETTLE_S]
    answered = [o for o in outcomes if o.ok]
    span = (max(o.done for o in outcomes) - min(o.due for o in outcomes)) if outcomes else 0.0
    return {
        "rate": rate,
        "duration_s": duration,
        "requests": len(outcomes),
        "achieved_rps": len(answered) / span if span else 0.0,
        "errors": len(outcomes) - len(answered),
        "latency_ms": stats.latency_ms(o.latency for o in answered),
        "timer_lag_ms": stats.latency_ms(o.issued - o.due for o in outcomes),
        "connection_wait_ms": stats.latency_ms(o.sent - o.issued for o in answered),
    }


def measure(endpoint: Endpoint, rate: float, duration: float, users: int) -> dict[str, Any]:
    outcomes = run_loop(
        open_loop(
            endpoint.port,
            rate,
            duration + SETTLE_S,
            _requests(users),
            connections=CONNECTIONS,
            served_by=False,
        )
    )
    return _figures(outcomes, rate, duration)


def run(
    endpoints: Sequence[Endpoint],
    rate: float,
    duration: float,
    rounds: int,
    users: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Interleaved rounds over `endpoints` (the first is the direct baseline) at `rate`."""
    runs: dict[str, list[dict[str, Any]]] = {e.label: [] for e in endpoints}
    for round_no in range(1, rounds + 1):
        for endpoint in endpoints:
            figures = measure(endpoint, rate, duration, users)
            runs[endpoint.label].append({"round": round_no, **figures})
            lat = figures["latency_ms"]
            progress(
                f"half-load round {round_no}/{rounds} {endpoint.label} at {rate:,.0f} req/s "
                f"... p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms"
                + (f", {figures['errors']} errors" if figures["errors"] else "")
            )
    return {
        "rate": rate,
        "duration_s": duration,
        "rounds": rounds,
        "targets": summarize(runs, endpoints[0].label),
    }


def summarize(runs: dict[str, list[dict[str, Any]]], baseline: str) -> list[dict[str, Any]]:
    base_runs = runs[baseline]
    out = []
    for label, target_runs in runs.items():
        added = [
            r["latency_ms"]["p99"] - b["latency_ms"]["p99"] for r, b in zip(target_runs, base_runs)
        ]
        out.append(
            {
                "label": label,
                "runs": target_runs,
                "p50_ms": stats.median(r["latency_ms"]["p50"] for r in target_runs),
                "p99_ms": stats.median(r["latency_ms"]["p99"] for r in target_runs),
                "p999_ms": stats.median(r["latency_ms"]["p999"] for r in target_runs),
                "added_p99_ms": None if label == baseline else stats.median(added),
                "added_p99_rounds_ms": None if label == baseline else added,
                "errors": sum(r["errors"] for r in target_runs),
                "achieved_rps": stats.median(r["achieved_rps"] for r in target_runs),
            }
        )
    return out
