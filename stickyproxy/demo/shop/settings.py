"""Command-line settings of one shop instance."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
# The promise the example makes: 60 requests per user per minute.
DEFAULT_RATE_LIMIT = 60
DEFAULT_RATE_WINDOW = 60.0
# A job is this many steps of simulated work, each this long: about five seconds in all.
DEFAULT_JOB_STEPS = 20
DEFAULT_JOB_STEP_SECONDS = 0.25
# The node id names the instance in X-Served-By and in metric labels.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Settings:
    port: int
    node_id: str
    redis_url: str
    host: str = DEFAULT_HOST
    stateless: bool = False
    rate_limit: int = DEFAULT_RATE_LIMIT
    rate_window: float = DEFAULT_RATE_WINDOW
    job_steps: int = DEFAULT_JOB_STEPS
    job_step_seconds: float = DEFAULT_JOB_STEP_SECONDS

    def __post_init__(self) -> None:
        if not NODE_ID_RE.match(self.node_id):
            raise ValueError(f"node id must be 1-64 of A-Za-z0-9._- : {self.node_id!r}")
        if self.rate_limit < 0 or self.rate_window <= 0:
            raise ValueError("rate limit must be >= 0 (0 = off) and its window positive")
        if self.job_steps < 1 or self.job_step_seconds <= 0:
            raise ValueError("jobs need at least one step of positive length")

    @property
    def mode(self) -> str:
        return "stateless" if self.stateless else "sticky"


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m shop", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--node-id", required=True, help="this instance's name (X-Served-By)")
    p.add_argument("--redis", required=True, metavar="URL", help="e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--stateless", action="store_true",
                   help="keep all state in Redis on every request (the design being replaced)")
    p.add_argument("--rate-limit", type=int, default=DEFAULT_RATE_LIMIT,
                   help=f"requests per user per window, 0 = off (default {DEFAULT_RATE_LIMIT})")
    p.add_argument("--rate-window", type=float, default=DEFAULT_RATE_WINDOW,
                   help=f"rate-limit window in seconds (default {DEFAULT_RATE_WINDOW:g})")
    p.add_argument("--job-steps", type=int, default=DEFAULT_JOB_STEPS)
    p.add_argument("--job-step-seconds", type=float, default=DEFAULT_JOB_STEP_SECONDS)
    a = p.parse_args(argv)
    try:
        return Settings(port=a.port, host=a.host, node_id=a.node_id, redis_url=a.redis,
                        stateless=a.stateless, rate_limit=a.rate_limit, rate_window=a.rate_window,
                        job_steps=a.job_steps, job_step_seconds=a.job_step_seconds)
    except ValueError as e:
        p.error(str(e))
