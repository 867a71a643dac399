"""An in-process proxy with its admin API, as an operator drives it: admin calls, /metrics,
the backend view, and config rewrites of the file it was started from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from support.config import build_toml, merged, ring_of
from support.metrics import Metrics
from support.net import LOCALHOST
from support.proxy import ProxyHandle

# The admin API on an ephemeral loopback port.
ADMIN = {"enabled": True, "host": LOCALHOST, "port": 0}


@dataclass
class AdminReply:
    status: int
    headers: Any
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class OpsProxy:
    """A ProxyHandle plus what operating it needs: admin calls, metrics, config rewrites."""

    def __init__(
        self, handle: ProxyHandle, backends: list[Any], overrides: dict[str, dict[str, Any]]
    ):
        self.h = handle
        self.svc = handle.svc
        self.path = handle.path
        self.backends = list(backends)
        self.overrides = overrides
        self._session: aiohttp.ClientSession | None = None
        self._ring: Any = None
        self._ring_for: Any = None

    # the data plane
    @property
    def port(self) -> int:
        return self.h.port

    def pref(self, key: str) -> list[str]:
        """The key's preference list under the running configuration."""
        cfg = self.svc.config
        if self._ring_for is not cfg:
            self._ring, self._ring_for = ring_of(cfg), cfg
        return self._ring.preference(key)

    @property
    def fingerprint(self) -> str:
        return self.h.fingerprint

    async def get(self, target: str = "/", **kw: Any):
        return await self.h.get(target, **kw)

    # the admin API
    @property
    def admin_port(self) -> int:
        assert self.svc.admin is not None, "admin API not enabled"
        return self.svc.admin.port

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def admin(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> AdminReply:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        s = await self.session()
        async with s.request(method, f"http://{LOCALHOST}:{self.admin_port}{path}", headers=h) as r:
            return AdminReply(r.status, r.headers, await r.text())

    async def metrics(self) -> Metrics:
        r = await self.admin("GET", "/metrics")
        assert r.status == 200, r.text
        return Metrics(r.text)

    async def backend_view(self) -> dict[str, dict[str, Any]]:
        r = await self.admin("GET", "/backends")
        assert r.status == 200, r.text
        return {b["id"]: b for b in r.json()["backends"]}

    async def route(self, key: str) -> dict[str, Any]:
        r = await self.admin("GET", f"/route?key={key}")
        assert r.status == 200, r.text
        return r.json()

    # the configuration file
    def rewrite(
        self, backends: list[Any] | None = None, overrides: dict[str, dict[str, Any]] | None = None
    ) -> str:
        """Write a new config to the file the proxy was started from (not applied yet)."""
        if backends is not None:
            self.backends = list(backends)
        if overrides is not None:
            self.overrides = merged(self.overrides, overrides)
        text = build_toml(self.backends, self.overrides)
        self.path.write_text(text)
        return text

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
