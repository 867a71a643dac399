"""The admin API and /metrics (aiohttp, on ``[admin]``; loopback by default).

Read endpoints are open to whoever can reach the listener; mutating ones (drain, undrain,
reload) require ``Authorization: Bearer <token>`` when a token is configured. JSON bodies
everywhere except /metrics (Prometheus text) and the plain health probes.

The ``control`` object behind it is the single-process ``Service`` or, with several
workers, the supervisor; both provide the methods used here.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import views

log = logging.getLogger("stickyproxy.control.admin")

# Longest key accepted by GET /route (the data plane's limit is configurable and smaller).
MAX_ROUTE_KEY = 4096
# GET /hotkeys?n=: how many keys by default, and at most (a sketch holds max_keys anyway).
HOTKEYS_DEFAULT_N = 20
HOTKEYS_MAX_N = 1000


def _json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class Admin:
    def __init__(self, control: Any):
        self.control = control
        self.runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/backends", self.backends)
        r.add_get("/ring", self.ring)
        r.add_get("/route", self.route)
        r.add_get("/hotkeys", self.hotkeys)
        r.add_post("/backends/{id}/drain", self.drain)
        r.add_post("/backends/{id}/undrain", self.undrain)
        r.add_post("/reload", self.reload)
        return app

    async def start(self) -> None:
        cfg = self.control.config.admin
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.host, cfg.port, reuse_address=True)
        await site.start()
        # the bound address tells the port when 0 was configured
        addresses = self.runner.addresses
        if addresses:
            self.port = addresses[0][1]
        log.info("admin API on http://%s:%d", cfg.host, self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- plumbing ------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400 and e.content_type != "application/json":
                return _json_error(e.status, e.reason)
            raise
        except Exception:
            log.exception("admin request %s %s failed", request.method, request.path)
            return _json_error(500, "internal error (see the proxy's log)")

    def _authorised(self, request: web.Request) -> web.Response | None:
        token = self.control.config.admin.token
        if not token:
            return None
        got = request.headers.get("Authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            resp = _json_error(401, "a valid bearer token is required")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="stickyproxy-admin"'
            return resp
        return None

    # -- handlers ------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        ready, why = self.control.ready()
        return web.Response(
            text=("ready\n" if ready else f"not ready: {why}\n"), status=200 if ready else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(await self.control.metrics_registry())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def backends(self, request: web.Request) -> web.Response:
        return web.json_response({"backends": await self.control.backends_view()})

    async def ring(self, request: web.Request) -> web.Response:
        return web.json_response(self.control.ring_view())

    async def route(self, request: web.Request) -> web.Response:
        key = request.query.get("key")
        if not key:
            return _json_error(400, "missing query parameter: key")
        if len(key.encode()) > MAX_ROUTE_KEY:
            return _json_error(400, f"key longer than {MAX_ROUTE_KEY} bytes")
        return web.json_response(self.control.route_view(key))

    async def hotkeys(self, request: web.Request) -> web.Response:
        raw = request.query.get("n", str(HOTKEYS_DEFAULT_N))
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if not 1 <= n <= HOTKEYS_MAX_N:
            return _json_error(
                400, f"n: expected an integer from 1 to {HOTKEYS_MAX_N}, got {raw!r}"
            )
        control = self.control
        merged = getattr(control, "merged_hotkeys", None)
        if merged is not None:
            # the supervisor: every worker's counts merged
            sketch, processes = await merged()
        else:
            hot = control.table.hotkeys
            sketch, processes = (hot.view(time.monotonic()) if hot is not None else None), 1
        return web.json_response(views.hotkeys_view(sketch, n, control.table.router, processes))

    async def drain(self, request: web.Request) -> web.Response:
        return await self._drain(request, True)

    async def undrain(self, request: web.Request) -> web.Response:
        return await self._drain(request, False)

    async def _drain(self, request: web.Request, on: bool) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        bid = request.match_info["id"]
        if not await self.control.drain(bid, on):
            return _json_error(404, f"no backend with id {bid!r}")
        return web.json_response({"backend": bid, "drained": on})

    async def reload(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        ok, errors = await self.control.reload("admin API")
        if not ok:
            return _json_error(400, "configuration rejected; the running one stays", errors=errors)
        body: dict = {"reloaded": True, "ring": self.control.ring_view()["fingerprint"]}
        if errors:
            body["workers_restarted"] = errors  # applied, but not by every worker in time
        return web.json_response(body)
