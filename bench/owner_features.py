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
  pipelined (one round trip), the classic revocation list (the shop's ``--stateless`` check).
* ``jobpoll-sticky``: each request reads the progress of the user's running job
  (``Jobs.status``, from memory); ``jobpoll-stateless``: ``HGETALL`` of the job's hash (the
  shop's ``--stateless`` jobs). The job is started by the user's first (warm-up) request.
* ``cache-sticky``: a ``GuardedCache`` hit per request; ``cache-stateless``: a Redis ``GET``
  of the cached value per request (loaded into Redis by the warm-up request; the shop's
  ``--stateless`` price cache does the same with one ``HGET``).
The variants are minimal apps, not the shop, so that each row is one feature's cost alone;
the shop's own Redis commands per request, in both modes, are asserted by
tests/examples/test_shop.py and test_shop_logout_prices.py.
Limits are set so nobody is refused and no token is revoked: every request does the full check.
Redis commands are counted by ``INFO commandstats`` before and after each timed run (the
library's listener PINGs excluded, as a test's own bookkeeping is), divided by wrk's requests.
The relay delays each chunk by half the round trip in each direction, order kept, without
limiting throughput (a thread per direction, high-resolution sleeps); it runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from .procs import free_ports
from .wrk import LUA_DIR, run_script

VARIANTS = ("ratelimit-sticky", "ratelimit-stateless", "revocation-sticky", "revocation-stateless",
            "jobpoll-sticky", "jobpoll-stateless", "cache-sticky", "cache-stateless")
SCRIPT = LUA_DIR / "owner.lua"
# Users in the load (each with one token); every one is held by the app after the warm-up.
USERS = 1000
# Warm-up before each timed run, after every user was touched once: pools filled, caches hot.
WARMUP_S = 1.0
# Commands that are bookkeeping, not the feature's cost.
BOOKKEEPING = frozenset({"info", "ping", "hello", "client|setinfo", "subscribe"})
START_DEADLINE = 10.0
SECRET = "bench-secret-not-for-production-32b"
# The two paths to Redis of each row (its "redis" field).
LOOPBACK, RELAY = "loopback", "relay"
# Rate limit that nobody reaches in a run: both designs do their full work per request.
NO_REFUSAL_PER_MINUTE = 1_000_000_000
# PINGs per round-trip measurement, relay calibration rounds, and the accepted error.
RTT_SAMPLES = 300
CALIBRATION_ROUNDS = 5
CALIBRATION_TOLERANCE = 0.2


# -- the delaying relay (its own process) ---------------------------------------------------
# Threads, not an event loop: libuv and asyncio's selector time out in whole milliseconds, so a
# 0.25 ms timer would fire at once or after 1 ms; time.sleep is a high-resolution nanosleep.


def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
    chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def send() -> None:
        while True:
            due, data = chunks.get()
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                return

    threading.Thread(target=send, daemon=True).start()
    while True:
        try:
            data = src.recv(65536)
        except OSError:
            data = b""
        chunks.put((time.monotonic() + delay, data))
        if not data:
            return


def relay(listen: int, target: int, delay: float) -> None:
    server = socket.create_server(("127.0.0.1", listen))
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pipe, args=(client, upstream, delay), daemon=True).start()
        threading.Thread(target=_pipe, args=(upstream, client, delay), daemon=True).start()


# -- the app (its own process) ---------------------------------------------------------------


def build_app(variant: str, redis_url: str) -> Any:
    from aiohttp import web

    from stickyproxy.context import (
        ContextStore,
        GuardedCache,
        Jobs,
        Limit,
        RateLimiter,
        Revocations,
        context_middleware,
        get_context,
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
        elif variant == "revocation-sticky":
            middlewares.append(revocation_middleware(Revocations(store, max_token_lifetime="1h")))
        elif variant == "jobpoll-sticky":
            jobs = Jobs(store, max_running=USERS * 2)
            job_of: dict[str, str] = {}

            async def forever(handle: Any) -> None:
                await handle.progress(1, 100)
                await asyncio.sleep(3600)

            @web.middleware
            async def poll(request: web.Request, handler: Any) -> web.StreamResponse:
                user = request.headers["X-Sticky-Key"]
                job_id = job_of.get(user)
                if job_id is None:
                    job_of[user] = (await jobs.start(user, forever, context=get_context(request)))["id"]
                    return await handler(request)
                status = await jobs.status(user, job_id)
                return web.Response(text=str(status["progress"]["done"]) if status["progress"] else "0")

            middlewares.append(poll)
        else:
            cache = GuardedCache(store=store, ttl="1h")

            async def profile() -> Any:
                return {"plan": "pro", "name": "x" * 64}

            @web.middleware
            async def cached(request: web.Request, handler: Any) -> web.StreamResponse:
                value = await cache.get(request.headers["X-Sticky-Key"], "profile", profile)
                return web.Response(text=value["plan"])

            middlewares.append(cached)

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
                elif variant == "jobpoll-stateless":
                    pipe.hgetall(f"bench:job:{{{user}}}")
                    (job,) = await pipe.execute()
                    if not job:
                        await client.hset(f"bench:job:{{{user}}}", mapping={"step": 1, "steps": 100,
                                                                             "state": "running"})
                        return await handler(request)
                    return web.Response(text=job[b"step"].decode())
                elif variant == "cache-stateless":
                    pipe.get(f"bench:{{{user}}}:profile")
                    (raw,) = await pipe.execute()
                    if raw is None:
                        await client.set(f"bench:{{{user}}}:profile", json.dumps({"plan": "pro", "name": "x" * 64}),
                                         px=3_600_000)
                        return await handler(request)
                    return web.Response(text=json.loads(raw)["plan"])
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


def ping_ms(port: int) -> float:
    """Median PING round trip through ``port``, in milliseconds."""
    client = redis.Redis(port=port)
    client.ping()
    samples = []
    for _ in range(RTT_SAMPLES):
        started = time.perf_counter()
        client.ping()
        samples.append((time.perf_counter() - started) * 1000)
    client.close()
    return statistics.median(samples)


def calibrated_relay(stack: contextlib.ExitStack, redis_port: int, rtt_ms: float) -> tuple[int, float]:
    """A relay whose added PING round trip is close to ``rtt_ms``: sleeps overshoot by an amount
    that depends on the machine's load, so the per-direction delay is adjusted from measurements."""
    direct = ping_ms(redis_port)
    delay = rtt_ms / 2
    for attempt in range(CALIBRATION_ROUNDS):
        (port,) = free_ports(1)
        relay_stack = contextlib.ExitStack()
        _spawn(relay_stack, [sys.executable, "-m", "bench.owner_features", "relay", "--listen", str(port),
                             "--to", str(redis_port), "--delay-ms", f"{delay:.4f}"], port)
        added = ping_ms(port) - direct
        if abs(added - rtt_ms) <= rtt_ms * CALIBRATION_TOLERANCE or attempt == CALIBRATION_ROUNDS - 1:
            stack.enter_context(relay_stack)
            return port, added
        relay_stack.close()
        delay = max(0.0, delay + (rtt_ms - added) / 2)
    raise AssertionError("unreachable")


def run(duration: float, connections: int, rtt_ms: float, *, warmup: float = WARMUP_S,
        log: Callable[[str], None] = print, relay_rtt: list[float] | None = None) -> list[dict[str, Any]]:
    """Every variant with Redis on loopback, then through the relay; ``relay_rtt``, when given,
    receives the PING round trip measured direct and the one the relay adds (ms)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        users = _users_file(workdir)
        (redis_port,) = free_ports(1)
        _spawn(stack, ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", str(workdir)], redis_port)
        relay_port, added = calibrated_relay(stack, redis_port, rtt_ms)
        if relay_rtt is not None:
            relay_rtt[:] = [ping_ms(redis_port), added]
        log(f"relay adds {added:.2f} ms to a PING round trip (median of {RTT_SAMPLES})")
        counter = redis.Redis(port=redis_port)
        for redis_path, network, port in ((LOOPBACK, "loopback", redis_port),
                                           (RELAY, f"+{added:.2f} ms RTT", relay_port)):
            for variant in VARIANTS:
                (app_port,) = free_ports(1)
                with contextlib.ExitStack() as app_stack:
                    _spawn(app_stack, [sys.executable, "-m", "bench.owner_features", "app", "--variant", variant,
                                       "--port", str(app_port), "--redis", f"redis://127.0.0.1:{port}/0"], app_port)
                    touch_every_user(app_port, users, connections)
                    run_script(app_port, warmup, connections, SCRIPT, [str(users), "1"])
                    before = _commands(counter)
                    result = run_script(app_port, duration, connections, SCRIPT, [str(users), "2"])
                    after = _commands(counter)
                spent = {k: v - before.get(k, 0) for k, v in after.items()
                         if v != before.get(k, 0) and k not in BOOKKEEPING}
                feature, _, design = variant.rpartition("-")
                rows.append({
                    "network": network, "variant": variant, "requests": result.requests,
                    "redis": redis_path, "feature": feature, "design": design,
                    "rps": round(result.rps), "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
                    "non_2xx": result.non_2xx, "socket_errors": result.socket_errors,
                    "redis_commands_per_request": round(sum(spent.values()) / max(1, result.requests), 3),
                    "commands": spent,
                })
                log(json.dumps(rows[-1]) if log is print else
                    f"{network} {variant}: {rows[-1]['rps']:,} req/s, p99 {result.p99_ms:.2f} ms, "
                    f"{rows[-1]['redis_commands_per_request']:.3f} Redis commands/request")
    return rows


@dataclass(frozen=True)
class Plan:
    duration: float
    warmup: float
    connections: int
    rtt_ms: float
    smoke: bool


# The suite's settings (python -m bench): those of the standalone command's defaults; the smoke
# only checks that every variant starts, answers and is counted (wrk's -d takes whole seconds).
FULL = Plan(duration=5.0, warmup=WARMUP_S, connections=16, rtt_ms=0.5, smoke=False)
SMOKE = Plan(duration=1.0, warmup=1.0, connections=4, rtt_ms=0.5, smoke=True)


def make_plan(smoke: bool) -> Plan:
    return SMOKE if smoke else FULL


def run_suite(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """bench/results/owners.json: the settings, the relay's measured round trip and one row per
    (Redis path, variant); a row with a non-2xx answer or a socket error fails the benchmark."""
    rtt: list[float] = []
    rows = run(plan.duration, plan.connections, plan.rtt_ms, warmup=plan.warmup, log=log, relay_rtt=rtt)
    bad = [f"{r['network']} {r['variant']}: {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors"
           for r in rows if r["non_2xx"] or r["socket_errors"]]
    if bad:
        raise RuntimeError("; ".join(bad))
    return {"settings": {"duration_s": plan.duration, "warmup_s": plan.warmup, "connections": plan.connections,
                         "users": USERS, "rtt_ms_target": plan.rtt_ms, "smoke": plan.smoke},
            "relay": {"direct_ping_ms": round(rtt[0], 3), "added_rtt_ms": round(rtt[1], 3),
                      "ping_samples": RTT_SAMPLES},
            "rows": rows}


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
        relay(args.listen, args.to, args.delay_ms / 1000)
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
