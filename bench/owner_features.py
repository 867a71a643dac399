"""Owner-local features against their stateless versions, same run: Redis commands per
request, throughput and p99 of a rate limit and of a token-revocation check on every call,
with Redis on loopback and behind a relay that adds a network round trip.

    python -m bench.owner_features [--duration 5] [--connections 16] [--rtt-ms 0.5] [--out FILE]

Each variant is one aiohttp app process (uvloop) answering ``GET /`` with 2 bytes:
* ``ratelimit-sticky``: the context middleware and ``rate_limit_middleware`` (library);
* ``ratelimit-stateless``: ``INCR`` + ``PEXPIRE … NX`` pipelined per request (the shop's
  ``--stateless`` limiter);
* ``revocation-sticky``: the context middleware and ``revocation_middleware`` (library);
* ``revocation-stateless``: per request, ``EXISTS revoked:<jti>`` + ``GET revoked-before:<user>``
  pipelined (one round trip), the classic revocation list.
Limits are set so nobody is refused and no token is revoked: every request does the full check.
Redis commands are counted by ``INFO commandstats`` before and after each timed run (the
library's listener PINGs excluded, as a test's own bookkeeping is), divided by wrk's requests.
The relay delays each chunk by half the round trip in each direction, order kept, without
limiting throughput; it runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from .procs import free_ports
from .wrk import LUA_DIR, run_script

VARIANTS = ("ratelimit-sticky", "ratelimit-stateless", "revocation-sticky", "revocation-stateless")
SCRIPT = LUA_DIR / "owner.lua"
# Users in the load (each with one token); every one is held by the app after the warm-up.
USERS = 1000
# Warm-up before each timed run, after every user was touched once: pools filled, caches hot.
WARMUP_S = 1.0
# Commands that are bookkeeping, not the feature's cost.
BOOKKEEPING = frozenset({"info", "ping", "hello", "client|setinfo", "subscribe"})
START_DEADLINE = 10.0
SECRET = "bench-secret-not-for-production-32b"
# Rate limit that nobody reaches in a run: both designs do their full work per request.
NO_REFUSAL_PER_MINUTE = 1_000_000_000


# -- the delaying relay (its own process) ---------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                writer.close()
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()


async def relay(listen: int, target: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(_pipe(reader, up_writer, delay), _pipe(up_reader, writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


# -- the app (its own process) ---------------------------------------------------------------


def build_app(variant: str, redis_url: str) -> Any:
    from aiohttp import web

    from stickyproxy.context import (
        ContextStore,
        Limit,
        RateLimiter,
        Revocations,
        context_middleware,
        rate_limit_middleware,
        revocation_middleware,
    )
    from stickyproxy.context.revocation import unverified_claims

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    middlewares: list[Any] = []
    if variant.endswith("-sticky"):
        store = ContextStore(redis_url, namespace="bench")
        middlewares.append(context_middleware(store))
        if variant == "ratelimit-sticky":
            limiter = RateLimiter({"api": Limit.per(NO_REFUSAL_PER_MINUTE, 60)}, store=store)
            middlewares.append(rate_limit_middleware(limiter, "api"))
        else:
            middlewares.append(revocation_middleware(Revocations(store, max_token_lifetime="1h")))

        async def lifecycle(app: web.Application) -> Any:
            await store.start()
            yield
            await store.close()
    else:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url, max_connections=32)

        @web.middleware
        async def stateless(request: web.Request, handler: Any) -> web.StreamResponse:
            user = request.headers["X-Sticky-Key"]
            async with client.pipeline(transaction=False) as pipe:
                if variant == "ratelimit-stateless":
                    pipe.incr(f"bench:{{{user}}}:rl")
                    pipe.pexpire(f"bench:{{{user}}}:rl", 60_000, nx=True)
                    count, _ = await pipe.execute()
                    if count > NO_REFUSAL_PER_MINUTE:
                        return web.Response(status=429)
                else:
                    claims = unverified_claims(request.headers["Authorization"]) or {}
                    pipe.exists(f"bench:revoked:{claims.get('jti')}")
                    pipe.get(f"bench:{{{user}}}:revoked-before")
                    revoked, before = await pipe.execute()
                    if revoked or (before is not None and claims.get("iat", 0) < float(before)):
                        return web.Response(status=401)
            return await handler(request)

        middlewares.append(stateless)

        async def lifecycle(app: web.Application) -> Any:
            yield
            await client.aclose()

    app = web.Application(middlewares=middlewares)
    app.router.add_get("/", ok)
    app.cleanup_ctx.append(lifecycle)
    return app


def serve_app(variant: str, port: int, redis_url: str) -> None:
    import uvloop
    from aiohttp import web

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(build_app(variant, redis_url), host="127.0.0.1", port=port, access_log=None, print=None)


# -- orchestration ----------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    end = time.monotonic() + START_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not accepting within {START_DEADLINE:g}s")


def _spawn(stack: contextlib.ExitStack, argv: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    _wait_port(port, proc)
    return proc


def _commands(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def _users_file(directory: Path) -> Path:
    import jwt

    now = int(time.time())
    path = directory / "users.txt"
    lines = [f"user-{i} {jwt.encode({'sub': f'user-{i}', 'jti': f'j{i}', 'iat': now, 'exp': now + 3000}, SECRET)}"
             for i in range(USERS)]
    path.write_text("\n".join(lines) + "\n")
    return path


def touch_every_user(port: int, users: Path, connections: int) -> None:
    """One request per user, ``connections`` at a time: every user is held by the app (sticky)
    and every key exists (stateless) before the timed run."""
    import aiohttp

    pairs = [line.split(" ", 1) for line in users.read_text().splitlines()]

    async def go() -> None:
        limit = asyncio.Semaphore(connections)
        async with aiohttp.ClientSession() as http:

            async def one(user: str, token: str) -> None:
                async with limit, http.get(f"http://127.0.0.1:{port}/",
                                           headers={"X-Sticky-Key": user, "Authorization": "Bearer " + token}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"warm-up request for {user} answered {r.status}")

            await asyncio.gather(*(one(u, t) for u, t in pairs))

    asyncio.run(go())


def run(duration: float, connections: int, rtt_ms: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        users = _users_file(workdir)
        redis_port, relay_port = free_ports(2)
        _spawn(stack, ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", str(workdir)], redis_port)
        _spawn(stack, [sys.executable, "-m", "bench.owner_features", "relay", "--listen", str(relay_port),
                       "--to", str(redis_port), "--delay-ms", str(rtt_ms / 2)], relay_port)
        counter = redis.Redis(port=redis_port)
        for network, port in (("loopback", redis_port), (f"+{rtt_ms:g} ms RTT", relay_port)):
            for variant in VARIANTS:
                (app_port,) = free_ports(1)
                with contextlib.ExitStack() as app_stack:
                    _spawn(app_stack, [sys.executable, "-m", "bench.owner_features", "app", "--variant", variant,
                                       "--port", str(app_port), "--redis", f"redis://127.0.0.1:{port}/0"], app_port)
                    touch_every_user(app_port, users, connections)
                    run_script(app_port, WARMUP_S, connections, SCRIPT, [str(users), "1"])
                    before = _commands(counter)
                    result = run_script(app_port, duration, connections, SCRIPT, [str(users), "2"])
                    after = _commands(counter)
                spent = {k: v - before.get(k, 0) for k, v in after.items()
                         if v != before.get(k, 0) and k not in BOOKKEEPING}
                rows.append({
                    "network": network, "variant": variant, "requests": result.requests,
                    "rps": round(result.rps), "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                    "non_2xx": result.non_2xx, "socket_errors": result.socket_errors,
                    "redis_commands_per_request": round(sum(spent.values()) / max(1, result.requests), 3),
                    "commands": spent,
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    out = ["| Redis | variant | req/s | p50 ms | p99 ms | Redis commands / request | non-2xx |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['network']} | {r['variant']} | {r['rps']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['redis_commands_per_request']:.3f} | {r['non_2xx']} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.owner_features", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("relay")
    r.add_argument("--listen", type=int, required=True)
    r.add_argument("--to", type=int, required=True)
    r.add_argument("--delay-ms", type=float, required=True)
    a = sub.add_parser("app")
    a.add_argument("--variant", choices=VARIANTS, required=True)
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--redis", required=True)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rtt-ms", type=float, default=0.5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "relay":
        import uvloop

        uvloop.run(relay(args.listen, args.to, args.delay_ms / 1000))
        return 0
    if args.cmd == "app":
        serve_app(args.variant, args.port, args.redis)
        return 0
    rows = run(args.duration, args.connections, args.rtt_ms)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
