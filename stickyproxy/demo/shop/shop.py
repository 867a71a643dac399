"""What the handlers share: the settings and the mode's state, limiter, jobs, revocations and
price cache."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .jobs import ShopJobs
from .metrics import ShopMetrics
from .prices import ShopPrices
from .ratelimit import ShopRateLimiter
from .revocation import ShopRevocations
from .settings import Settings
from .state import UserState


@dataclass
class Shop:
    settings: Settings
    metrics: ShopMetrics
    state: UserState
    limiter: ShopRateLimiter | None
    jobs: ShopJobs
    revocations: ShopRevocations
    prices: ShopPrices


SHOP_KEY: web.AppKey[Shop] = web.AppKey("shop", Shop)
