"""Command-line settings of one shop instance."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from stickyproxy.context.settings import DEFAULT_IDLE_TTL

DEFAULT_HOST = "127.0.0.1"
# The promise the example makes: 60 requests per user per minute.
DEFAULT_RATE_LIMIT = 60
DEFAULT_RATE_WINDOW = 60.0
# A job is this many steps of simulated work, each this long: about five seconds in all.
DEFAULT_JOB_STEPS = 20
DEFAULT_JOB_STEP_SECONDS = 0.25
# Tokens the shop issues at /login live an hour; revocations are kept that long (it may not
# exceed the context store's idle TTL, or Redis would forget a revocation before its token).
DEFAULT_TOKEN_LIFETIME = 3600.0
# HS256 key shared by every instance (a token issued by one is checked by all). A demo value:
# set --token-secret or SHOP_TOKEN_SECRET to your own in anything but a demo.
DEMO_TOKEN_SECRET = "stickyproxy-demo-shop-token-secret-not-for-production"
TOKEN_SECRET_ENV = "SHOP_TOKEN_SECRET"
# RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (32 bytes).
MIN_TOKEN_SECRET_BYTES = 32
# The built-in pricing origin answers after this long: a database a few milliseconds away.
DEFAULT_PRICE_DELAY = 0.05
# A price stays fresh in the cache this long (both modes).
DEFAULT_PRICE_TTL = 30.0
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
    token_secret: str = DEMO_TOKEN_SECRET
    token_lifetime: float = DEFAULT_TOKEN_LIFETIME
    price_origin: str | None = None
    price_delay: float = DEFAULT_PRICE_DELAY
    price_ttl: float = DEFAULT_PRICE_TTL

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every bad setting, each naming its option."""
        out = []
        if not NODE_ID_RE.match(self.node_id):
            out.append(f"--node-id: must be 1-64 of A-Za-z0-9._- , got {self.node_id!r}")
        if self.rate_limit < 0 or self.rate_window <= 0:
            out.append("--rate-limit: must be >= 0 (0 = off) and --rate-window positive")
        if self.job_steps < 1 or self.job_step_seconds <= 0:
            out.append(
                "--job-steps/--job-step-seconds: jobs need at least one step of positive length"
            )
        if len(self.token_secret.encode()) < MIN_TOKEN_SECRET_BYTES:
            out.append(
                f"--token-secret: at least {MIN_TOKEN_SECRET_BYTES} bytes for HS256 (RFC 7518 §3.2)"
            )
        if not 0 < self.token_lifetime <= DEFAULT_IDLE_TTL:
            out.append(
                f"--token-lifetime: must be positive and at most the context's idle TTL "
                f"({DEFAULT_IDLE_TTL:g}s), got {self.token_lifetime:g}"
            )
        if self.price_origin is not None:
            url = urlsplit(self.price_origin)
            if url.scheme not in ("http", "https") or not url.hostname:
                out.append(f"--price-origin: not an http(s) URL: {self.price_origin!r}")
        if self.price_delay < 0:
            out.append(f"--price-delay: must be >= 0, got {self.price_delay:g}")
        if self.price_ttl <= 0:
            out.append(f"--price-ttl: must be positive, got {self.price_ttl:g}")
        return out

    @property
    def mode(self) -> str:
        return "stateless" if self.stateless else "sticky"


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m shop", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--node-id", required=True, help="this instance's name (X-Served-By)")
    p.add_argument("--redis", required=True, metavar="URL", help="e.g. redis://127.0.0.1:6379/0")
    p.add_argument(
        "--stateless",
        action="store_true",
        help="keep all state in Redis on every request (the design being replaced)",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=DEFAULT_RATE_LIMIT,
        help=f"requests per user per window, 0 = off (default {DEFAULT_RATE_LIMIT})",
    )
    p.add_argument(
        "--rate-window",
        type=float,
        default=DEFAULT_RATE_WINDOW,
        help=f"rate-limit window in seconds (default {DEFAULT_RATE_WINDOW:g})",
    )
    p.add_argument("--job-steps", type=int, default=DEFAULT_JOB_STEPS)
    p.add_argument("--job-step-seconds", type=float, default=DEFAULT_JOB_STEP_SECONDS)
    p.add_argument(
        "--token-secret",
        default=os.environ.get(TOKEN_SECRET_ENV, DEMO_TOKEN_SECRET),
        help=f"HS256 key of the tokens /login issues, the same on every instance "
        f"(default ${TOKEN_SECRET_ENV}, else a demo key)",
    )
    p.add_argument(
        "--token-lifetime",
        type=float,
        default=DEFAULT_TOKEN_LIFETIME,
        help=f"seconds a token from /login is valid (default {DEFAULT_TOKEN_LIFETIME:g})",
    )
    p.add_argument(
        "--price-origin",
        metavar="URL",
        help="pricing service answering GET URL/prices/{user}/{item} "
        "(default: a built-in one, see --price-delay)",
    )
    p.add_argument(
        "--price-delay",
        type=float,
        default=DEFAULT_PRICE_DELAY,
        help=f"seconds the built-in pricing origin takes per lookup (default {DEFAULT_PRICE_DELAY:g})",
    )
    p.add_argument(
        "--price-ttl",
        type=float,
        default=DEFAULT_PRICE_TTL,
        help=f"seconds a cached price stays fresh (default {DEFAULT_PRICE_TTL:g})",
    )
    a = p.parse_args(argv)
    try:
        return Settings(
            port=a.port,
            host=a.host,
            node_id=a.node_id,
            redis_url=a.redis,
            stateless=a.stateless,
            rate_limit=a.rate_limit,
            rate_window=a.rate_window,
            job_steps=a.job_steps,
            job_step_seconds=a.job_step_seconds,
            token_secret=a.token_secret,
            token_lifetime=a.token_lifetime,
            price_origin=a.price_origin,
            price_delay=a.price_delay,
            price_ttl=a.price_ttl,
        )
    except ValueError as e:
        p.error(str(e))
