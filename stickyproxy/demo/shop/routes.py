"""The HTTP API (JSON everywhere but /metrics and /healthz).

GET    /                    this instance: node id, mode, endpoints
GET    /cart                the user's cart
POST   /cart/items          {"item": "apple", "qty": 2} -> the item's new quantity
DELETE /cart/items/{item}   remove a product from the cart
GET    /counter             the user's counter
POST   /counter             increment it -> the new value (never goes backwards)
POST   /jobs                start a job -> 202 {"id", ...}
GET    /jobs/{id}           its progress
GET    /jobs/{id}/ws        WebSocket: one message per step until the job is done
POST   /login               a bearer token for the user -> {"token", "jti", "iat", "exp"}
POST   /logout              revoke the presented token (401 on every later use)
POST   /logout-everywhere   revoke every token of the user issued until now
GET    /prices/{item}       the user's price in cents, through the guarded cache
DELETE /prices              forget the user's cached prices
GET    /healthz, /metrics
"""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import suppress
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from stickyproxy.context import TooManyRevocations

from .catalog import check_item, check_qty
from .jobs import JobsFull
from .prices import BREAKER_RESET, PriceUnavailable
from .revocation import CLAIMS_KEY
from .shop import SHOP_KEY, Shop
from .tokens import issue
from .users import require_user

# Largest request body accepted (413 beyond): the API takes small JSON objects only.
MAX_BODY = 4096
# Seconds between WebSocket pings, so a dead client is noticed.
WS_HEARTBEAT = 15.0
# Seconds a client is told to wait when the pricing origin cannot answer: the breaker's reset.
PRICE_RETRY_AFTER = str(math.ceil(BREAKER_RESET))


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    503: web.HTTPServiceUnavailable,
}


def _error(status: int, message: str) -> web.HTTPException:
    return _ERRORS[status](text=json.dumps({"error": message}), content_type="application/json")


def _context(request: web.Request) -> tuple[Shop, str]:
    shop = request.app[SHOP_KEY]
    return shop, require_user(request, stateless=shop.settings.stateless)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise _error(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise _error(400, "body must be a JSON object")
    return body


ENDPOINTS = [line.strip() for line in (__doc__ or "").strip().splitlines()[2:]]


async def index(request: web.Request) -> web.Response:
    s = request.app[SHOP_KEY].settings
    return web.json_response({"node": s.node_id, "mode": s.mode, "endpoints": ENDPOINTS})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SHOP_KEY].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def get_cart(request: web.Request) -> web.Response:
    shop, user = _context(request)
    items = await shop.state.cart(request, user)
    return web.json_response({"user": user, "items": items, "count": sum(items.values())})


async def add_item(request: web.Request) -> web.Response:
    shop, user = _context(request)
    body = await _json_body(request)
    item, qty = body.get("item"), body.get("qty", 1)
    problem = check_item(item) or check_qty(qty)
    if problem:
        raise _error(400, problem)
    return web.json_response(
        {"item": item, "qty": await shop.state.add(request, user, str(item), qty)}
    )


async def remove_item(request: web.Request) -> web.Response:
    shop, user = _context(request)
    item = request.match_info["item"]
    problem = check_item(item)
    if problem:
        raise _error(404, problem)
    return web.json_response(
        {"item": item, "removed": await shop.state.remove(request, user, item)}
    )


async def get_counter(request: web.Request) -> web.Response:
    shop, user = _context(request)
    return web.json_response({"value": await shop.state.counter(request, user)})


async def increment(request: web.Request) -> web.Response:
    shop, user = _context(request)
    return web.json_response({"value": await shop.state.increment(request, user)})


async def start_job(request: web.Request) -> web.Response:
    shop, user = _context(request)
    try:
        progress = await shop.jobs.start(user)
    except JobsFull:
        raise _error(503, "too many jobs on this instance") from None

    shop.metrics.jobs_started.inc()
    return web.json_response({**progress, "ws": f"/jobs/{progress['id']}/ws"}, status=202)


async def job_status(request: web.Request) -> web.Response:
    shop, user = _context(request)
    progress = await shop.jobs.status(user, request.match_info["id"])
    if progress is None:
        raise _error(404, "no such job for this user")
    return web.json_response(progress)


async def job_ws(request: web.Request) -> web.StreamResponse:
    """Progress messages until the job is done; messages from the client are ignored, and
    reading them is how a client's close is noticed at once."""
    shop, user = _context(request)
    job_id = request.match_info["id"]
    if await shop.jobs.status(user, job_id) is None:
        raise _error(404, "no such job for this user on this instance")
    ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT)
    await ws.prepare(request)

    async def send_progress() -> None:
        with suppress(ConnectionError):
            async for progress in shop.jobs.follow(user, job_id):
                await ws.send_json(progress)
        await ws.close()

    sender = asyncio.create_task(send_progress())
    try:
        async for _ in ws:
            pass
    finally:
        sender.cancel()
        with suppress(asyncio.CancelledError):
            await sender
    return ws


async def login(request: web.Request) -> web.Response:
    shop, user = _context(request)
    s = shop.settings
    return web.json_response({"user": user, **issue(user, s.token_secret, s.token_lifetime)})


def _claims(request: web.Request) -> Any:
    claims = request.get(CLAIMS_KEY)
    if claims is None:
        # RFC 6750 §3.1: a request without a token gets the challenge without an error code.
        raise web.HTTPUnauthorized(
            text="no token: send it as 'Authorization: Bearer <token>'\n",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return claims


async def logout(request: web.Request) -> web.Response:
    shop, user = _context(request)
    claims = _claims(request)
    try:
        revoked = await shop.revocations.revoke(request, user, claims)
    except TooManyRevocations as exc:
        raise _error(409, f"{exc}: POST /logout-everywhere") from None
    return web.json_response({"jti": claims["jti"], "revoked": revoked, "until": claims["exp"]})


async def logout_everywhere(request: web.Request) -> web.Response:
    shop, user = _context(request)
    _claims(request)
    return web.json_response({"revoked_before": await shop.revocations.revoke_all(request, user)})


async def get_price(request: web.Request) -> web.Response:
    shop, user = _context(request)
    item = request.match_info["item"]
    problem = check_item(item)
    if problem:
        raise _error(404, problem)
    try:
        price = await shop.prices.price(user, item)
    except PriceUnavailable as exc:
        raise web.HTTPServiceUnavailable(
            text=json.dumps({"error": f"pricing unavailable: {exc}"}),
            content_type="application/json",
            headers={"Retry-After": PRICE_RETRY_AFTER},
        ) from None
    return web.json_response({"item": item, "price": price})


async def forget_prices(request: web.Request) -> web.Response:
    shop, user = _context(request)
    return web.json_response({"forgotten": await shop.prices.forget(user)})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/cart", get_cart)
    r.add_post("/cart/items", add_item)
    r.add_delete("/cart/items/{item}", remove_item)
    r.add_get("/counter", get_counter)
    r.add_post("/counter", increment)
    r.add_post("/jobs", start_job)
    r.add_get("/jobs/{id}", job_status)
    r.add_get("/jobs/{id}/ws", job_ws)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_post("/logout-everywhere", logout_everywhere)
    r.add_get("/prices/{item}", get_price)
    r.add_delete("/prices", forget_prices)
