"""Logout end to end: shop processes behind the proxy, which routes on the verified ``sub`` of
the shop's own tokens (HS256, the same secret). The proxy verifies signatures; the owner
decides revocation; a revoked token stays refused after its owner is killed and the proxy
fails the user over to the next instance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import jwt
import pytest

from support.net import IO_TIMEOUT, eventually, free_port

from .conftest import START_DEADLINE

SECRET = "test-shop-secret-of-at-least-thirty-two-bytes"
SECRET_ENV = "SHOP_TOKEN_SECRET"


@dataclass
class ShopProcess:
    id: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)


@pytest.fixture
def shop_processes(redis_server, tmp_path) -> Iterator[list[ShopProcess]]:
    """Two ``python -m stickyproxy.demo.shop`` processes sharing the token secret."""
    procs = []
    env = {**os.environ, SECRET_ENV: SECRET}
    for node in ("app-1", "app-2"):
        port = free_port()
        log = tmp_path / f"{node}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stickyproxy.demo.shop",
                    "--port",
                    str(port),
                    "--node-id",
                    node,
                    "--redis",
                    redis_server.url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        procs.append(ShopProcess(node, port, proc, log))
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


async def wait_ready(session: aiohttp.ClientSession, shops: list[ShopProcess]) -> None:
    for s in shops:

        async def up(s: ShopProcess = s) -> bool:
            assert s.proc.poll() is None, s.log.read_text(errors="replace")
            try:
                async with session.get(s.url + "/healthz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(up, deadline=START_DEADLINE, interval=0.05, what=f"{s.id} serving")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=IO_TIMEOUT)) as session:
        yield session


async def test_revoked_token_stays_refused_when_the_proxy_fails_the_user_over(
    shop_processes, proxy, http, monkeypatch
):
    monkeypatch.setenv(SECRET_ENV, SECRET)
    keys = [
        {"from": "jwt", "claim": "sub", "algorithms": ["HS256"], "secret_env": SECRET_ENV},
        {"from": "header", "name": "X-User-Id"},
    ]
    p = await proxy(shop_processes, {"routing": {"keys": keys}})
    await wait_ready(http, shop_processes)
    base = f"http://127.0.0.1:{p.port}"

    async with http.post(base + "/login", headers={"X-User-Id": "alice"}) as r:
        assert r.status == 200
        owner = r.headers["X-Served-By"]
        token = (await r.json())["token"]
    auth = {"Authorization": f"Bearer {token}"}
    # routed by the token's verified sub: no X-User-Id needed
    async with http.get(base + "/cart", headers=auth) as r:
        assert r.status == 200 and r.headers["X-Served-By"] == owner
        assert (await r.json())["user"] == "alice"
    async with http.get(base + "/prices/apple", headers=auth) as r:
        assert r.status == 200 and r.headers["X-Served-By"] == owner
    async with http.post(base + "/logout", headers=auth) as r:
        assert r.status == 200 and (await r.json())["revoked"] is True
    async with http.get(base + "/cart", headers=auth) as r:
        assert r.status == 401 and r.headers["X-Served-By"] == owner
        assert "token revoked" in await r.text()

    # a forged token never reaches a shop: the proxy verifies the signature
    forged = jwt.encode(
        {"sub": "alice", "jti": "x", "iat": 1, "exp": 2**31},
        "another-secret-of-at-least-thirty-two-bytes",
        algorithm="HS256",
    )
    async with http.get(base + "/cart", headers={"Authorization": f"Bearer {forged}"}) as r:
        assert r.status == 401 and "X-Served-By" not in r.headers

    next(s for s in shop_processes if s.id == owner).kill()
    survivor = next(s.id for s in shop_processes if s.id != owner)
    async with http.get(base + "/cart", headers=auth) as r:
        assert r.headers["X-Served-By"] == survivor
        assert r.status == 401 and "token revoked" in await r.text()
    async with http.post(base + "/login", headers={"X-User-Id": "alice"}) as r:
        fresh = {"Authorization": f"Bearer {(await r.json())['token']}"}
    async with http.get(base + "/cart", headers=fresh) as r:
        assert r.status == 200 and r.headers["X-Served-By"] == survivor
