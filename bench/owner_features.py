"""Owner-local features against their stateless versions, same run: Redis commands and round
trips per request, throughput and p99 of a rate limit, a token-revocation check, a job-progress
poll and a cache hit on every call, and following a running job over the owner's WebSocket
against polling it from Redis; with Redis on loopback and behind a relay that adds a network
round trip.

    python -m bench.owner_features [--duration 5] [--connections 16] [--rtt-ms 0.5] [--out FILE]

Each variant is one aiohttp app process (uvloop); the per-request ones answer ``GET /`` with
2 bytes:
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
* ``jobfollow-sticky``: ``FOLLOWERS`` users each run a job (``Jobs``) whose progress changes
  every ``PROGRESS_INTERVAL``; the client follows each over a WebSocket that the app feeds
  from ``Jobs.follow`` (memory). ``jobfollow-stateless``: each job writes its step to a Redis
  hash (``HSET``) and the client polls ``GET /progress`` (``HGETALL``) once per interval (the
  shop's ``--stateless`` jobs). Each change carries its CLOCK_MONOTONIC time, so the client
  measures the delay from a change to seeing it.
The variants are minimal apps, not the shop, so that each row is one feature's cost alone;
the shop's own Redis commands per request, in both modes, are asserted by
tests/examples/test_shop.py and test_shop_logout_prices.py.
Limits are set so nobody is refused and no token is revoked: every request does the full check.
Redis commands are counted by ``INFO commandstats`` before and after each timed run (the
library's listener PINGs excluded, as a test's own bookkeeping is), divided by wrk's requests
(or by updates delivered). Round trips are counted in each app (``RedisTally``: one per write
of a command or pipeline by redis-py, bookkeeping excluded), read on its second, bench port,
which also runs the one-off actions whose cost is reported (a user's first request, a
revocation, a job's start and end).
The relay delays each chunk by half the round trip in each direction, order kept, without
limiting throughput (a thread per direction, high-resolution sleeps); it runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from .procs import free_ports
from .wrk import LUA_DIR, run_script

VARIANTS = (
    "ratelimit-sticky",
    "ratelimit-stateless",
    "revocation-sticky",
    "revocation-stateless",
    "jobpoll-sticky",
    "jobpoll-stateless",
    "cache-sticky",
    "cache-stateless",
    "jobfollow-sticky",
    "jobfollow-stateless",
)
# The feature measured per progress update delivered, not per request.
FOLLOW_FEATURE = "jobfollow"
SCRIPT = LUA_DIR / "owner.lua"
# Users in the load (each with one token); every one is held by the app after the warm-up.
USERS = 1000
# Warm-up before each timed run, after every user was touched once: pools filled, caches hot.
WARMUP_S = 1.0
# Commands that are bookkeeping, not the feature's cost (INFO commandstats names).
BOOKKEEPING = frozenset({"info", "ping", "hello", "client|setinfo", "subscribe"})
# The same, as the apps' tally names them (first word of the command a client sends).
TALLY_BOOKKEEPING = frozenset({"INFO", "PING", "HELLO", "CLIENT", "SELECT", "AUTH", "SUBSCRIBE"})
# Where an app answers what it has sent to Redis (on its bench port).
TALLY_PATH = "/_bench/redis"
# Jobs followed at once, and the interval of their progress: 1,000 updates/s offered.
FOLLOWERS = 100
PROGRESS_INTERVAL = 0.1
# The stateless apps' Redis connections (the context store's default pool size), and how long
# a request waits for one.
STATELESS_POOL = 32
STATELESS_POOL_WAIT = 5.0
# A user outside the load, whose revocation loads the script before the measured ones.
WARM_UP_USER = "warm-up"
# Revocations made after a revocation variant's timed run, to measure what one costs.
REVOCATIONS = 100
START_DEADLINE = 10.0
# Longest the bench waits for one answer of an app (a request, a tally, an action).
ACTION_DEADLINE = 30.0
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
# Each app serves its variant on one port and the bench's own routes (Redis tally, touching a
# user, starting and ending jobs, revoking) on a second one, outside the feature's middlewares.


class RedisTally:
    """What this process sent to Redis: a round trip is one write of a command or of a
    pipeline to a connection (each followed by a wait for its reply); connection bookkeeping
    (handshake, health checks, the takeover listener) is left out. Commands a Lua script runs
    inside Redis are not sent by the client and are not counted here."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.by_command: collections.Counter[str] = collections.Counter()

    def as_dict(self) -> dict[str, Any]:
        return {
            "round_trips": self.round_trips,
            "commands": sum(self.by_command.values()),
            "by_command": dict(self.by_command),
        }


def count_redis_calls(tally: RedisTally) -> None:
    """Wrap redis-py's asyncio connection so that every command and every send is tallied
    (the same hook as bench/shopapp.py, with the bookkeeping left out)."""
    from redis.asyncio.connection import AbstractConnection

    pack = AbstractConnection.pack_command
    send_packed = AbstractConnection.send_packed_command

    def pack_command(self: Any, *args: Any) -> list[bytes]:
        first = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        name = first.split(" ", 1)[0].upper()
        if name not in TALLY_BOOKKEEPING:
            self.__dict__.setdefault("_bench_pending", []).append(name)
        return pack(self, *args)

    async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        pending = self.__dict__.get("_bench_pending")
        if pending:
            tally.round_trips += 1
            tally.by_command.update(pending)
            pending.clear()
        await send_packed(self, command, check_health)

    AbstractConnection.pack_command = pack_command  # type: ignore[method-assign]
    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]


def build_apps(variant: str, redis_url: str, tally: RedisTally) -> tuple[Any, Any]:
    """(the variant's app, the bench's app) sharing one set of objects."""
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

    bench = web.Application()
    middlewares: list[Any] = []
    app_routes: list[Any] = [web.get("/", ok)]
    # The bench's own actions, by name; each takes the user.
    actions: dict[str, Callable[[str], Awaitable[Any]]] = {}
    if variant.endswith("-sticky"):
        store = ContextStore(redis_url, namespace="bench")
        jobs = Jobs(store, max_running=USERS * 2)
        job_of: dict[str, str] = {}
        if variant == "jobfollow-sticky":
            # The WebSocket stays outside the context middleware: it would hold the user's lock.
            async def ticker(handle: Any) -> None:
                step = 0
                while True:
                    await asyncio.sleep(PROGRESS_INTERVAL)
                    step += 1
                    await handle.progress(step, None, repr(time.monotonic()))

            async def follow(request: web.Request) -> web.StreamResponse:
                user = request.headers["X-Sticky-Key"]
                ws = web.WebSocketResponse()
                await ws.prepare(request)

                async def send() -> None:
                    with contextlib.suppress(ConnectionError):
                        async for status in jobs.follow(user, job_of[user]):
                            if status["progress"]:
                                await ws.send_str(
                                    f"{status['progress']['done']} {status['progress']['message']}"
                                )

                sender = asyncio.create_task(send())
                try:
                    async for _ in ws:
                        pass
                finally:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
                return ws

            async def start_job(user: str) -> None:
                job_of[user] = (await jobs.start(user, ticker))["id"]

            app_routes.append(web.get("/follow", follow))

            async def end_job(user: str) -> None:
                await jobs.cancel(user, job_of[user])

            actions.update(touch=store.get, start=start_job, end=end_job)
        else:
            middlewares.append(context_middleware(store))
            actions["touch"] = store.get
        if variant == "ratelimit-sticky":
            limiter = RateLimiter({"api": Limit.per(NO_REFUSAL_PER_MINUTE, 60)}, store=store)
            middlewares.append(rate_limit_middleware(limiter, "api"))
        elif variant == "revocation-sticky":
            revocations = Revocations(store, max_token_lifetime="1h")
            middlewares.append(revocation_middleware(revocations))

            async def revoke(user: str) -> None:
                # Not the user's own token: requests after it are still answered.
                await revocations.revoke(user, f"bench-revoked-{user}", time.time() + 3000)

            actions["revoke"] = revoke
        elif variant == "jobpoll-sticky":

            async def forever(handle: Any) -> None:
                await handle.progress(1, 100)
                await asyncio.sleep(3600)

            @web.middleware
            async def poll(request: web.Request, handler: Any) -> web.StreamResponse:
                user = request.headers["X-Sticky-Key"]
                job_id = job_of.get(user)
                if job_id is None:
                    job_of[user] = (await jobs.start(user, forever, context=get_context(request)))[
                        "id"
                    ]
                    return await handler(request)
                status = await jobs.status(user, job_id)
                return web.Response(
                    text=str(status["progress"]["done"]) if status["progress"] else "0"
                )

            middlewares.append(poll)
        elif variant == "cache-sticky":
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
            await jobs.close()
            await store.close()
    else:
        import redis.asyncio as aioredis

        # A blocking pool, as the shop's --stateless mode has: a burst waits for a connection
        # instead of failing (every job runner writes at once).
        client = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                redis_url, max_connections=STATELESS_POOL, timeout=STATELESS_POOL_WAIT
            )
        )
        tickers: dict[str, asyncio.Task[None]] = {}
        # Jobs told to stop: a runner ends at its next step. Cancelling it instead can land inside
        # redis-py waiting for a pooled connection, which then swallows the cancellation.
        stopping: set[str] = set()

        def job_key(user: str) -> str:
            return f"bench:job:{{{user}}}"

        if variant == "jobfollow-stateless":
            # The runner writes each step to Redis; a follower polls it once per step interval
            # (the shop's --stateless jobs).
            async def run_job(user: str, step: int) -> None:
                while True:
                    await asyncio.sleep(PROGRESS_INTERVAL)
                    if user in stopping:
                        return
                    step += 1
                    await client.hset(
                        job_key(user), mapping={"step": step, "changed": repr(time.monotonic())}
                    )

            async def start_stateless(user: str) -> None:
                await client.hset(
                    job_key(user),
                    mapping={"step": 0, "changed": repr(time.monotonic()), "state": "running"},
                )
                tickers[user] = asyncio.create_task(run_job(user, 0))

            async def end_stateless(user: str) -> None:
                task = tickers.pop(user, None)
                if task is not None:
                    stopping.add(user)
                    await task
                    await client.hset(job_key(user), "state", "cancelled")

            async def progress(request: web.Request) -> web.Response:
                job = await client.hgetall(job_key(request.headers["X-Sticky-Key"]))
                step, changed = (
                    v.decode() if isinstance(v, bytes) else str(v)
                    for v in (job[b"step"], job[b"changed"])
                )
                return web.Response(text=f"{step} {changed}")

            app_routes.append(web.get("/progress", progress))
            actions.update(start=start_stateless, end=end_stateless)

        @web.middleware
        async def stateless(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path != "/":
                return await handler(request)
            user = request.headers["X-Sticky-Key"]
            async with client.pipeline(transaction=False) as pipe:
                if variant == "ratelimit-stateless":
                    pipe.incr(f"bench:{{{user}}}:rl")
                    pipe.pexpire(f"bench:{{{user}}}:rl", 60_000, nx=True)
                    count, _ = await pipe.execute()
                    if count > NO_REFUSAL_PER_MINUTE:
                        return web.Response(status=429)
                elif variant == "jobpoll-stateless":
                    pipe.hgetall(job_key(user))
                    (job,) = await pipe.execute()
                    if not job:
                        await client.hset(
                            job_key(user), mapping={"step": 1, "steps": 100, "state": "running"}
                        )
                        return await handler(request)
                    return web.Response(text=job[b"step"].decode())
                elif variant == "cache-stateless":
                    pipe.get(f"bench:{{{user}}}:profile")
                    (raw,) = await pipe.execute()
                    if raw is None:
                        await client.set(
                            f"bench:{{{user}}}:profile",
                            json.dumps({"plan": "pro", "name": "x" * 64}),
                            px=3_600_000,
                        )
                        return await handler(request)
                    return web.Response(text=json.loads(raw)["plan"])
                elif variant == "revocation-stateless":
                    claims = unverified_claims(request.headers["Authorization"]) or {}
                    pipe.exists(f"bench:revoked:{claims.get('jti')}")
                    pipe.get(f"bench:{{{user}}}:revoked-before")
                    revoked, before = await pipe.execute()
                    if revoked or (before is not None and claims.get("iat", 0) < float(before)):
                        return web.Response(status=401)
            return await handler(request)

        if variant == "revocation-stateless":

            async def revoke_stateless(user: str) -> None:
                await client.set(f"bench:revoked:bench-revoked-{user}", 1, px=3_000_000)

            actions["revoke"] = revoke_stateless
        middlewares.append(stateless)

        async def lifecycle(app: web.Application) -> Any:
            yield
            for task in tickers.values():
                task.cancel()
            await client.aclose()

    async def nothing(user: str) -> None:
        return None

    actions.setdefault("touch", nothing)

    async def counts(request: web.Request) -> web.Response:
        return web.json_response(tally.as_dict())

    async def act(request: web.Request) -> web.Response:
        action = actions.get(request.match_info["action"])
        if action is None:
            return web.Response(
                status=404, text=f"{variant} has no {request.match_info['action']}\n"
            )
        await action(request.query["user"])
        return web.Response(text="ok")

    bench.router.add_get(TALLY_PATH, counts)
    bench.router.add_post("/_bench/{action}", act)
    app = web.Application(middlewares=middlewares)
    app.router.add_routes(app_routes)
    app.cleanup_ctx.append(lifecycle)
    return app, bench


def serve_apps(
    variants: Sequence[str], ports: Sequence[int], bench_ports: Sequence[int], redis_url: str
) -> None:
    """Each variant's app and bench app on its two ports, in this one process (one variant, in a
    measured run; the smoke puts all of a path's in one, as start-up is most of its time)."""
    import uvloop
    from aiohttp import web

    tally = RedisTally()
    count_redis_calls(tally)
    sites = []
    for variant, port, bench_port in zip(variants, ports, bench_ports, strict=True):
        app, bench = build_apps(variant, redis_url, tally)
        sites += [(app, port), (bench, bench_port)]

    async def main() -> None:
        runners = []
        for application, listen in sites:
            runner = web.AppRunner(application, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", listen).start()
            runners.append(runner)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        for runner in reversed(runners):
            await runner.cleanup()

    uvloop.run(main())


# -- orchestration ----------------------------------------------------------------------------


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + START_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not accepting within {START_DEADLINE:g}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start(stack: contextlib.ExitStack, argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, proc)
    return proc


def _spawn(stack: contextlib.ExitStack, argv: list[str], *ports: int) -> subprocess.Popen[bytes]:
    proc = _start(stack, argv)
    for port in ports:
        _wait_port(port, proc)
    return proc


def _commands(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


def _spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands Redis ran between two ``INFO commandstats``, bookkeeping left out."""
    return {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if v != before.get(k, 0) and k not in BOOKKEEPING
    }


def tally_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What an app sent between two reads of its tally."""
    by = {
        k: v - before["by_command"].get(k, 0)
        for k, v in after["by_command"].items()
        if v != before["by_command"].get(k, 0)
    }
    return {
        "round_trips": after["round_trips"] - before["round_trips"],
        "commands": sum(by.values()),
        "by_command": by,
    }


def per(delta: dict[str, Any], count: int) -> dict[str, Any]:
    """A tally delta per operation: ``count`` operations, round trips and commands each."""
    n = max(1, count)
    return {
        "count": count,
        "round_trips": round(delta["round_trips"] / n, 3),
        "commands": round(delta["commands"] / n, 3),
        "by_command": {k: round(v / n, 3) for k, v in sorted(delta["by_command"].items())},
    }


def _users_file(directory: Path, users: int) -> Path:
    import jwt

    now = int(time.time())
    path = directory / "users.txt"
    lines = [
        f"user-{i} {jwt.encode({'sub': f'user-{i}', 'jti': f'j{i}', 'iat': now, 'exp': now + 3000}, SECRET)}"
        for i in range(users)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(users: Path) -> list[list[str]]:
    return [line.split(" ", 1) for line in users.read_text().splitlines()]


async def _tally(http: Any, bench_port: int) -> dict[str, Any]:
    async with http.get(f"http://127.0.0.1:{bench_port}{TALLY_PATH}") as r:
        return dict(await r.json())


async def _act(
    http: Any, bench_port: int, action: str, users: Sequence[str], connections: int
) -> dict[str, Any]:
    """Run a bench action for each user (``connections`` at a time); what it sent to Redis, per user."""
    limit = asyncio.Semaphore(connections)
    before = await _tally(http, bench_port)

    async def one(user: str) -> None:
        async with (
            limit,
            http.post(f"http://127.0.0.1:{bench_port}/_bench/{action}", params={"user": user}) as r,
        ):
            if r.status != 200:
                raise RuntimeError(f"{action} for {user} answered {r.status}: {await r.text()}")

    await asyncio.gather(*(one(u) for u in users))
    return per(tally_delta(before, await _tally(http, bench_port)), len(users))


def touch_every_user(port: int, bench_port: int, users: Path, connections: int) -> dict[str, Any]:
    """One request per user, ``connections`` at a time: every user is held by the app (sticky)
    and every key exists (stateless) before the timed run. Returns what a user's first
    request sent to Redis (per user)."""
    import aiohttp

    pairs = _pairs(users)

    async def go() -> dict[str, Any]:
        limit = asyncio.Semaphore(connections)
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ACTION_DEADLINE)
        ) as http:
            before = await _tally(http, bench_port)

            async def one(user: str, token: str) -> None:
                async with (
                    limit,
                    http.get(
                        f"http://127.0.0.1:{port}/",
                        headers={"X-Sticky-Key": user, "Authorization": "Bearer " + token},
                    ) as r,
                ):
                    if r.status != 200:
                        raise RuntimeError(f"warm-up request for {user} answered {r.status}")

            await asyncio.gather(*(one(u, t) for u, t in pairs))
            return per(tally_delta(before, await _tally(http, bench_port)), len(pairs))

    return asyncio.run(go())


def bench_actions(
    bench_port: int, action: str, users: Sequence[str], connections: int
) -> dict[str, Any]:
    import aiohttp

    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ACTION_DEADLINE)
        ) as http:
            return await _act(http, bench_port, action, users, connections)

    return asyncio.run(go())


def read_tally(bench_port: int) -> dict[str, Any]:
    import aiohttp

    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ACTION_DEADLINE)
        ) as http:
            return await _tally(http, bench_port)

    return asyncio.run(go())


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class FollowStats:
    """What the followers saw inside the measured window."""

    updates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    polls: int = 0
    errors: int = 0


def _seen(stats: FollowStats, measuring: bool, line: str, last: int) -> int:
    """Account one progress message ``"<step> <monotonic time of the change>"``; returns the
    step now known. CLOCK_MONOTONIC is one clock for every process of the machine (Linux), so
    the app's stamp and this process's reading are comparable."""
    step_text, changed = line.split(" ", 1)
    step = int(float(step_text))
    if step > last and measuring:
        stats.updates += 1
        stats.latencies_ms.append((time.monotonic() - float(changed)) * 1000)
    return max(step, last)


def follow_load(
    port: int,
    bench_port: int,
    redis_port: int,
    users: Sequence[str],
    design: str,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """Every user follows its running job for ``warmup`` + ``duration`` seconds: over a
    WebSocket (sticky: the app pushes each change) or by polling ``GET /progress`` once per
    ``PROGRESS_INTERVAL`` (stateless). Returns the window's figures and Redis traffic."""
    import aiohttp
    import redis.asyncio as aioredis

    async def go() -> dict[str, Any]:
        stats = FollowStats()
        measuring = False
        done = asyncio.Event()
        counter = aioredis.Redis(port=redis_port)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=ACTION_DEADLINE),
        ) as http:

            async def push(user: str) -> None:
                last = -1
                async with http.ws_connect(
                    f"http://127.0.0.1:{port}/follow", headers={"X-Sticky-Key": user}
                ) as ws:
                    while not done.is_set():
                        receive = asyncio.ensure_future(ws.receive())
                        stop = asyncio.ensure_future(done.wait())
                        await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                        stop.cancel()
                        if not receive.done():
                            receive.cancel()
                            return
                        msg = receive.result()
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            stats.errors += not done.is_set()
                            return
                        last = _seen(stats, measuring, msg.data, last)

            async def poll(user: str) -> None:
                last = -1
                while not done.is_set():
                    async with http.get(
                        f"http://127.0.0.1:{port}/progress", headers={"X-Sticky-Key": user}
                    ) as r:
                        text = await r.text()
                    if r.status != 200:
                        stats.errors += 1
                    else:
                        stats.polls += measuring
                        last = _seen(stats, measuring, text, last)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(done.wait(), PROGRESS_INTERVAL)

            tasks = [asyncio.create_task(push(u) if design == "sticky" else poll(u)) for u in users]
            await asyncio.sleep(warmup)
            tally_before, commands_before = (
                await _tally(http, bench_port),
                await counter.info("commandstats"),
            )
            measuring, started = True, time.monotonic()
            await asyncio.sleep(duration)
            measuring, elapsed = False, time.monotonic() - started
            tally_after, commands_after = (
                await _tally(http, bench_port),
                await counter.info("commandstats"),
            )
            done.set()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            stats.errors += sum(isinstance(o, BaseException) for o in outcomes)
        await counter.aclose()
        as_calls = [
            {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in c.items()}
            for c in (commands_before, commands_after)
        ]
        return {
            "stats": stats,
            "elapsed": elapsed,
            "sent": tally_delta(tally_before, tally_after),
            "commands": _spent(*as_calls),
        }

    return asyncio.run(go())


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


def calibrated_relay(
    stack: contextlib.ExitStack, redis_port: int, rtt_ms: float
) -> tuple[int, float]:
    """A relay whose added PING round trip is close to ``rtt_ms``: sleeps overshoot by an amount
    that depends on the machine's load, so the per-direction delay is adjusted from measurements."""
    direct = ping_ms(redis_port)
    delay = rtt_ms / 2
    for attempt in range(CALIBRATION_ROUNDS):
        (port,) = free_ports(1)
        relay_stack = contextlib.ExitStack()
        _spawn(
            relay_stack,
            [
                sys.executable,
                "-m",
                "bench.owner_features",
                "relay",
                "--listen",
                str(port),
                "--to",
                str(redis_port),
                "--delay-ms",
                f"{delay:.4f}",
            ],
            port,
        )
        added = ping_ms(port) - direct
        if (
            abs(added - rtt_ms) <= rtt_ms * CALIBRATION_TOLERANCE
            or attempt == CALIBRATION_ROUNDS - 1
        ):
            stack.enter_context(relay_stack)
            return port, added
        relay_stack.close()
        delay = max(0.0, delay + (rtt_ms - added) / 2)
    raise AssertionError("unreachable")


Launched = dict[str, tuple[subprocess.Popen[bytes], int, int]]


def _launch(
    stack: contextlib.ExitStack, variants: Sequence[str], ports: Sequence[int], redis_url: str
) -> Launched:
    """Start one app process serving ``variants``, the i-th on the i-th pair of ``ports``,
    without waiting: {variant: (process, app port, bench port)}."""
    argv = [sys.executable, "-m", "bench.owner_features", "app", "--redis", redis_url]
    for i, variant in enumerate(variants):
        argv += [
            "--variant",
            variant,
            "--port",
            str(ports[2 * i]),
            "--bench-port",
            str(ports[2 * i + 1]),
        ]
    proc = _start(stack, argv)
    return {v: (proc, ports[2 * i], ports[2 * i + 1]) for i, v in enumerate(variants)}


def _request_row(
    plan: Plan, variant: str, app_port: int, bench_port: int, users: Path, counter: redis.Redis
) -> dict[str, Any]:
    """wrk's figures for a per-request variant and what it cost in Redis."""
    first = touch_every_user(app_port, bench_port, users, plan.connections)
    if plan.warmup > 0:
        run_script(app_port, plan.warmup, plan.connections, SCRIPT, [str(users), "1"])
    before, tally_before = _commands(counter), read_tally(bench_port)
    result = run_script(app_port, plan.duration, plan.connections, SCRIPT, [str(users), "2"])
    after, tally_after = _commands(counter), read_tally(bench_port)
    spent, sent = _spent(before, after), tally_delta(tally_before, tally_after)
    n = max(1, result.requests)
    costs = {"first_request": first}
    if variant.startswith("revocation-"):
        revoked = [u for u, _ in _pairs(users)][:REVOCATIONS]
        # One first, unmeasured: a script's first calls on a new Redis also load it (NOSCRIPT).
        bench_actions(bench_port, "revoke", [WARM_UP_USER], 1)
        costs["revocation"] = bench_actions(bench_port, "revoke", revoked, plan.connections)
    return {
        "kind": "request",
        "requests": result.requests,
        "rps": round(result.rps),
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
        "redis_commands_per_request": round(sum(spent.values()) / n, 3),
        "round_trips_per_request": round(sent["round_trips"] / n, 3),
        "commands_sent_per_request": round(sent["commands"] / n, 3),
        "commands": spent,
        "sent": sent["by_command"],
        "costs": costs,
    }


def _follow_row(
    plan: Plan, design: str, app_port: int, bench_port: int, redis_port: int, users: Path
) -> dict[str, Any]:
    """Followers of running jobs: updates delivered, their latency, Redis traffic per update."""
    followers = [u for u, _ in _pairs(users)][: plan.followers]
    costs = {
        "first_request": bench_actions(bench_port, "touch", followers, plan.connections),
        "job_start": bench_actions(bench_port, "start", followers, plan.connections),
    }
    window = plan.duration if plan.follow_s is None else plan.follow_s
    out = follow_load(app_port, bench_port, redis_port, followers, design, window, plan.warmup)
    costs["job_end"] = bench_actions(bench_port, "end", followers, plan.connections)
    stats: FollowStats = out["stats"]
    n = max(1, stats.updates)
    lat = stats.latencies_ms
    return {
        "kind": "follow",
        "followers": len(followers),
        "interval_ms": PROGRESS_INTERVAL * 1000,
        "updates": stats.updates,
        "updates_per_s": round(stats.updates / out["elapsed"]),
        "offered_per_s": round(len(followers) / PROGRESS_INTERVAL),
        "polls": stats.polls,
        "errors": stats.errors,
        "latency_p50_ms": round(percentile(lat, 50) or 0.0, 3),
        "latency_p99_ms": round(percentile(lat, 99) or 0.0, 3),
        "redis_commands_per_update": round(sum(out["commands"].values()) / n, 3),
        "round_trips_per_update": round(out["sent"]["round_trips"] / n, 3),
        "commands_sent_per_update": round(out["sent"]["commands"] / n, 3),
        "commands": out["commands"],
        "sent": out["sent"]["by_command"],
        "costs": costs,
    }


def run(
    plan: Plan, *, log: Callable[[str], None] = print, relay_rtt: list[float] | None = None
) -> list[dict[str, Any]]:
    """Every variant with Redis on loopback, then through the relay; ``relay_rtt``, when given,
    receives the PING round trip measured direct and the one the relay adds (ms)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        users = _users_file(workdir, plan.users)
        (redis_port,) = free_ports(1)
        _spawn(
            stack,
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            redis_port,
        )
        relay_port, added = calibrated_relay(stack, redis_port, plan.rtt_ms)
        if relay_rtt is not None:
            relay_rtt[:] = [ping_ms(redis_port), added]
        log(f"relay adds {added:.2f} ms to a PING round trip (median of {RTT_SAMPLES})")
        counter = redis.Redis(port=redis_port)
        paths = ((LOOPBACK, "loopback", redis_port), (RELAY, f"+{added:.2f} ms RTT", relay_port))
        count = len(plan.variants)
        ports = free_ports(2 * count * len(paths))
        launched: dict[int, Launched] = {}

        def launch(k: int, variants: Sequence[str]) -> Launched:
            first = k * count + plan.variants.index(variants[0])
            return _launch(
                stack,
                variants,
                ports[2 * first : 2 * (first + len(variants))],
                f"redis://127.0.0.1:{paths[k][2]}/0",
            )

        # The smoke serves all of a path's variants from one process, started while the previous
        # path runs (start-up is most of its time); a measured run starts each variant's app
        # alone, so that no other app shares the cores.
        if plan.smoke:
            launched[0] = launch(0, plan.variants)
        for k, (redis_path, network, _port) in enumerate(paths):
            if plan.smoke and k + 1 < len(paths):
                proc, app_port, bench_port = launched[k][plan.variants[-1]]
                _wait_port(bench_port, proc)
                launched[k + 1] = launch(k + 1, plan.variants)
            for variant in plan.variants:
                proc, app_port, bench_port = (launched[k] if plan.smoke else launch(k, [variant]))[
                    variant
                ]
                feature, _, design = variant.rpartition("-")
                _wait_port(app_port, proc)
                _wait_port(bench_port, proc)
                if feature == FOLLOW_FEATURE:
                    figures = _follow_row(plan, design, app_port, bench_port, redis_port, users)
                else:
                    figures = _request_row(plan, variant, app_port, bench_port, users, counter)
                if not plan.smoke:
                    _stop(proc)
                rows.append(
                    {
                        "network": network,
                        "variant": variant,
                        "redis": redis_path,
                        "feature": feature,
                        "design": design,
                        **figures,
                    }
                )
                log(json.dumps(rows[-1]) if log is print else summary_line(rows[-1]))
    return rows


def summary_line(r: dict[str, Any]) -> str:
    if r["kind"] == "follow":
        return (
            f"{r['network']} {r['variant']}: {r['updates_per_s']:,} updates/s, latency p50 "
            f"{r['latency_p50_ms']:.2f} ms p99 {r['latency_p99_ms']:.2f} ms, "
            f"{r['redis_commands_per_update']:.3f} Redis commands and {r['round_trips_per_update']:.3f} "
            "round trips/update"
        )
    return (
        f"{r['network']} {r['variant']}: {r['rps']:,} req/s, p99 {r['p99_ms']:.2f} ms, "
        f"{r['redis_commands_per_request']:.3f} Redis commands and {r['round_trips_per_request']:.3f} "
        "round trips/request"
    )


@dataclass(frozen=True)
class Plan:
    duration: float
    warmup: float
    connections: int
    rtt_ms: float
    smoke: bool
    users: int = USERS
    followers: int = FOLLOWERS
    variants: tuple[str, ...] = VARIANTS
    # The followers' timed window, when not ``duration`` (no wrk there: any length).
    follow_s: float | None = None


# The suite's settings (python -m bench): those of the standalone command's defaults. The smoke
# only checks that every variant starts, answers and is counted (wrk's -d takes whole seconds),
# with no warm-up load and fewer users.
FULL = Plan(duration=5.0, warmup=WARMUP_S, connections=16, rtt_ms=0.5, smoke=False)
SMOKE = Plan(
    duration=1.0,
    warmup=0.0,
    connections=4,
    rtt_ms=0.5,
    smoke=True,
    users=50,
    followers=10,
    follow_s=0.5,
)


def make_plan(smoke: bool) -> Plan:
    return SMOKE if smoke else FULL


def run_suite(plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """bench/results/owners.json: the settings, the relay's measured round trip and one row per
    (Redis path, variant); a row with a non-2xx answer, a socket error or a follower's error
    fails the benchmark."""
    rtt: list[float] = []
    rows = run(plan, log=log, relay_rtt=rtt)
    bad = [
        f"{r['network']} {r['variant']}: {r['non_2xx']} non-2xx, {r['socket_errors']} socket errors"
        for r in rows
        if r["kind"] == "request" and (r["non_2xx"] or r["socket_errors"])
    ]
    bad += [
        f"{r['network']} {r['variant']}: {r['errors']} follower errors, {r['updates']} updates"
        for r in rows
        if r["kind"] == "follow" and (r["errors"] or not r["updates"])
    ]
    if bad:
        raise RuntimeError("; ".join(bad))
    return {
        "settings": {
            "duration_s": plan.duration,
            "warmup_s": plan.warmup,
            "connections": plan.connections,
            "follow_s": plan.duration if plan.follow_s is None else plan.follow_s,
            "users": plan.users,
            "followers": plan.followers,
            "progress_interval_ms": PROGRESS_INTERVAL * 1000,
            "rtt_ms_target": plan.rtt_ms,
            "smoke": plan.smoke,
        },
        "relay": {
            "direct_ping_ms": round(rtt[0], 3),
            "added_rtt_ms": round(rtt[1], 3),
            "ping_samples": RTT_SAMPLES,
        },
        "rows": rows,
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    out = [
        (
            "| Redis | variant | req/s | p50 ms | p99 ms | Redis commands / request | round trips / request "
            "| non-2xx |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "request":
            out.append(
                f"| {r['network']} | {r['variant']} | {r['rps']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['redis_commands_per_request']:.3f} | {r['round_trips_per_request']:.3f} | "
                f"{r['non_2xx']} |"
            )
    out += [
        "",
        (
            "| Redis | variant | updates/s | latency p50 ms | latency p99 ms | Redis commands / update "
            "| round trips / update | errors |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["kind"] == "follow":
            out.append(
                f"| {r['network']} | {r['variant']} | {r['updates_per_s']:,} | {r['latency_p50_ms']:.2f} | "
                f"{r['latency_p99_ms']:.2f} | {r['redis_commands_per_update']:.3f} | "
                f"{r['round_trips_per_update']:.3f} | {r['errors']} |"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.owner_features", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("relay")
    r.add_argument("--listen", type=int, required=True)
    r.add_argument("--to", type=int, required=True)
    r.add_argument("--delay-ms", type=float, required=True)
    a = sub.add_parser("app")
    a.add_argument("--variant", choices=VARIANTS, action="append", required=True)
    a.add_argument("--port", type=int, action="append", required=True)
    a.add_argument("--bench-port", type=int, action="append", required=True)
    a.add_argument("--redis", required=True)
    p.add_argument("--duration", type=float, default=FULL.duration)
    p.add_argument("--connections", type=int, default=FULL.connections)
    p.add_argument("--rtt-ms", type=float, default=FULL.rtt_ms)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "relay":
        relay(args.listen, args.to, args.delay_ms / 1000)
        return 0
    if args.cmd == "app":
        serve_apps(args.variant, args.port, args.bench_port, args.redis)
        return 0
    rows = run(
        Plan(
            duration=args.duration,
            warmup=WARMUP_S,
            connections=args.connections,
            rtt_ms=args.rtt_ms,
            smoke=False,
        )
    )
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
