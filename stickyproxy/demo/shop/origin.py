"""A pricing service for the shop to sit in front of (``--price-origin URL``): slow on purpose.

    GET /prices/{user}/{item}   {"item", "price"} after ``--delay`` seconds (404: unknown item)
    PUT /prices/{user}/{item}   {"price": cents}: change one user's price (as a repricing would)
    GET /stats                  {"lookups": N}: price lookups answered so far

Run it: ``python -m stickyproxy.demo.shop.origin --port 9100 [--delay 0.05]``; stop it to watch
the sticky shop's breaker and stale entries at work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiohttp import web

from .catalog import check_item
from .prices import price_of
from .settings import DEFAULT_HOST, DEFAULT_PRICE_DELAY

# Largest PUT body accepted: {"price": N}.
MAX_BODY = 256
# Highest price a PUT may set, in cents (a sanity bound, not a business rule).
MAX_PRICE = 10_000_000


@dataclass
class PriceBook:
    delay: float
    lookups: int = 0
    overrides: dict[tuple[str, str], int] = field(default_factory=dict)

    def price(self, user: str, item: str) -> int:
        return self.overrides.get((user, item), price_of(user, item))


BOOK_KEY: web.AppKey[PriceBook] = web.AppKey("price_book", PriceBook)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def get_price(request: web.Request) -> web.Response:
    book = request.app[BOOK_KEY]
    user, item = request.match_info["user"], request.match_info["item"]
    problem = check_item(item)
    if problem:
        return _error(404, problem)
    book.lookups += 1
    await asyncio.sleep(book.delay)
    return web.json_response({"item": item, "price": book.price(user, item)})


async def put_price(request: web.Request) -> web.Response:
    book = request.app[BOOK_KEY]
    user, item = request.match_info["user"], request.match_info["item"]
    problem = check_item(item)
    if problem:
        return _error(404, problem)
    try:
        price = json.loads(await request.read()).get("price")
    except (ValueError, AttributeError):
        return _error(400, 'body must be a JSON object {"price": cents}')
    if isinstance(price, bool) or not isinstance(price, int) or not 0 <= price <= MAX_PRICE:
        return _error(400, f"price must be an integer from 0 to {MAX_PRICE} cents, got {price!r}")
    book.overrides[(user, item)] = price
    return web.json_response({"item": item, "price": price})


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"lookups": request.app[BOOK_KEY].lookups})


def create_origin_app(delay: float = DEFAULT_PRICE_DELAY) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[BOOK_KEY] = PriceBook(delay)
    app.router.add_get("/prices/{user}/{item}", get_price)
    app.router.add_put("/prices/{user}/{item}", put_price)
    app.router.add_get("/stats", stats)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stickyproxy.demo.shop.origin", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--delay", type=float, default=DEFAULT_PRICE_DELAY, help="seconds per lookup")
    a = p.parse_args(argv)
    if a.delay < 0:
        p.error("--delay: must be >= 0")
    web.run_app(create_origin_app(a.delay), host=a.host, port=a.port, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
