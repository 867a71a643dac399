"""Skewed users over three backends: bounded load and gradual failback, simulated (no sockets).

Users are Zipf-distributed (s = 1.1) over the real ring (stickyproxy.routing.ring), and the
decisions are the real ones (stickyproxy.routing.spill, stickyproxy.routing.ramp); only time,
arrivals and service are simulated, so the figures are exact for the model and the same on
every machine (seeded).

- **Load spread** (``balance``): requests arrive as a Poisson stream and stay in flight for an
  exponential time (mean in flight across the three backends: ``INFLIGHT_MEAN``). Each is
  sent to its owner, or, with a balance factor, spilled along its preference list by
  ``spill.choose`` on the in-flight counts of that instant. Per factor: each backend's share
  of requests and its peak in flight against the mean, the share of requests served off
  their owner, and user moves (a request served by another backend than the same user's
  previous one: each is a rehydration from Redis for the context library).
- **Failback** (``failback``): one backend is down, its users on their failover targets; it
  recovers at ``RECOVERY_AT`` seconds. A rehydration is a request of one of its users that
  lands on it for the first time since the recovery. Counted per second without a ramp (all
  of them return at once) and with ``health.failback_ramp`` = ``RAMP`` seconds; also how many
  requests two proxies whose ramps start ``FLEET_SKEW`` apart (one health-check interval)
  send to different backends.

Then the same questions **measured** through ``stickyproxy run`` (one worker), to set beside
the model (``real``): three aiohttp backends in one process that take ``SERVICE_S`` per
request, wrk sending Zipf users (``lua/zipf.lua``, the same law and seed), health checks
every ``REAL_HEALTH_INTERVAL_MS``.

- **Load spread**, per factor back to back: each backend's requests
  (``stickyproxy_requests_total``), in-flight peaks (the proxy's
  ``stickyproxy_backend_inflight`` sampled, and each backend's own exact count), the requests
  spilled (``stickyproxy_route_decisions_total{result="spill"}`` over all, and
  ``stickyproxy_spills_total``), the users served by more than one backend, and req/s.
- **Failback**, without and with ``failback_ramp = REAL_RAMP``: the victim fails its health
  checks (a flag) until the proxy marks it down, wrk starts, the victim passes them again
  ``RECOVER_AFTER`` s later and counts, per second since, the first request of each user it
  sees (a rehydration from Redis in a real app).
- **Speed** (not in ``--smoke``): two proxies side by side, the three features on (hot keys,
  ``balance_factor = 1.25``, ``failback_ramp`` set) and off, in front of backends that answer
  at once; wrk against each in turn, ``SPEED_ROUNDS`` interleaved rounds; on / off per round.

    python -m bench.skew [--smoke] [--simulate-only] [--out DIR]   # also: python -m bench --only skew
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import heapq
import itertools
import json
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stickyproxy.routing import ramp, spill
from stickyproxy.routing.ring import Member, Ring

BACKENDS = ("app-1", "app-2", "app-3")
ZIPF_S = 1.1
USERS, SMOKE_USERS = 100_000, 20_000
SEED = 22
# -- balance
BALANCE_REQUESTS, SMOKE_BALANCE_REQUESTS = 300_000, 40_000
# Mean requests in flight over all backends (Little's law: arrival rate x service time);
# about what 3 small app instances hold under a moderate load.
INFLIGHT_MEAN = 48
FACTORS: tuple[float | None, ...] = (None, 2.0, 1.5, 1.25)
# -- failback
REQUEST_RATE, SMOKE_REQUEST_RATE = 4000.0, 1500.0  # requests per second, all users
RECOVERY_AT = 5.0  # seconds into the simulated window
RAMP, SMOKE_RAMP = 30.0, 10.0  # health.failback_ramp
AFTER_RAMP = 15.0  # seconds simulated after the ramp
FLEET_SKEW = 0.5  # seconds between two proxies' starts
VICTIM = "app-2"

RESULTS = Path(__file__).resolve().parent / "results"


class Sim:
    """A simulated backend: its in-flight count and weight."""

    __slots__ = ("id", "inflight", "weight")

    def __init__(self, backend_id: str):
        self.id = backend_id
        self.inflight = 0
        self.weight = 1


def zipf_users(users: int, count: int, rng: random.Random, s: float = ZIPF_S) -> list[int]:
    """``count`` draws of a user index (0 = hottest), user i with weight 1 / (i + 1)**s."""
    cum = list(itertools.accumulate(1.0 / i**s for i in range(1, users + 1)))
    top = cum[-1]
    return [bisect.bisect_left(cum, rng.random() * top) for _ in range(count)]


def user_key(i: int) -> str:
    return f"user-{i + 1}"


class Users:
    """``count`` users and each one's preference list on the ring (computed once per user)."""

    def __init__(self, ring: Ring, count: int):
        self.ring = ring
        self.count = count
        self._pref: dict[int, list[str]] = {}

    def preference(self, user: int) -> list[str]:
        pref = self._pref.get(user)
        if pref is None:
            pref = self._pref[user] = self.ring.preference(user_key(user))
        return pref


# -- load spread -------------------------------------------------------------------------


def balance_run(
    users: Users, draws: list[int], gaps: list[float], services: list[float], factor: float | None
) -> dict[str, Any]:
    sims = {b: Sim(b) for b in BACKENDS}
    pct = spill.percent(factor) if factor is not None else 0
    served = dict.fromkeys(BACKENDS, 0)
    peak = dict.fromkeys(BACKENDS, 0)
    finishing: list[tuple[float, str]] = []
    last: dict[int, str] = {}
    ratios: list[float] = []
    off_owner = moves = total = 0
    now = 0.0
    weight = len(BACKENDS)
    for user, gap, service in zip(draws, gaps, services):
        now += gap
        while finishing and finishing[0][0] <= now:
            sims[heapq.heappop(finishing)[1]].inflight -= 1
            total -= 1
        pref = users.preference(user)
        if factor is None:
            chosen = sims[pref[0]]
        else:
            cands = [sims[b] for b in pref]
            chosen = cands[
                spill.choose(
                    [c.inflight for c in cands], [c.weight for c in cands], total, weight, pct
                )
            ]
        chosen.inflight += 1
        total += 1
        if chosen.inflight > peak[chosen.id]:
            peak[chosen.id] = chosen.inflight
        # the busiest backend against the mean of this instant (this request counted)
        ratios.append(max(s.inflight for s in sims.values()) * len(BACKENDS) / total)
        heapq.heappush(finishing, (now + service, chosen.id))
        served[chosen.id] += 1
        off_owner += chosen.id != pref[0]
        previous = last.get(user)
        moves += previous is not None and previous != chosen.id
        last[user] = chosen.id
    n = len(draws)
    ratios.sort()
    return {
        "factor": factor,
        "requests": n,
        "share": {b: served[b] / n for b in BACKENDS},
        "max_share_over_mean": max(served.values()) / (n / len(BACKENDS)),
        "peak_inflight": peak,
        "busiest_over_mean": {
            "mean": sum(ratios) / n,
            "p50": ratios[n // 2],
            "p99": ratios[min(n - 1, n * 99 // 100)],
        },
        "off_owner_share": off_owner / n,
        "user_moves": moves,
        "user_moves_per_1000": 1000 * moves / n,
    }


def balance(
    users: Users, requests: int, rng: random.Random, progress: Callable[[str], None]
) -> dict[str, Any]:
    draws = zipf_users(users.count, requests, rng)
    # arrival rate 1 per time unit, so the mean service time is the mean in flight
    gaps = [rng.expovariate(1.0) for _ in range(requests)]
    services = [rng.expovariate(1.0 / INFLIGHT_MEAN) for _ in range(requests)]
    key_share = users.ring.key_share()
    hottest = users.preference(0)[0]
    hot_share = sum(1 for d in draws if d == 0) / requests
    runs = []
    for factor in FACTORS:
        r = balance_run(users, draws, gaps, services, factor)
        runs.append(r)
        progress(
            f"skew: balance factor {factor or 'off'}: shares "
            + " ".join(f"{r['share'][b]:.1%}" for b in BACKENDS)
            + f", busiest in flight p99 {r['busiest_over_mean']['p99']:.2f}x mean, off owner "
            f"{r['off_owner_share']:.2%}, user moves {r['user_moves_per_1000']:.1f}/1000 req"
        )
    return {
        "requests": requests,
        "inflight_mean": INFLIGHT_MEAN,
        "key_share": key_share,
        "hottest_user_owner": hottest,
        "hottest_user_share": hot_share,
        "runs": runs,
    }


# -- failback ----------------------------------------------------------------------------


def failback(
    users: Users, rate: float, ramp_s: float, rng: random.Random, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Rehydrations per second on the recovered backend, without and with the ramp."""
    window = RECOVERY_AT + ramp_s + AFTER_RAMP
    count = int(rate * window)
    draws = zipf_users(users.count, count, rng)
    times = list(itertools.accumulate(rng.expovariate(rate) for _ in range(count)))
    keep = bisect.bisect_left(times, int(window))
    draws, times = draws[:keep], times[:keep]
    seconds = int(window)  # whole seconds: the last partial one is left out
    points: dict[int, int] = {}

    def point(user: int) -> int:
        p = points.get(user)
        if p is None:
            p = points[user] = ramp.key_point(user_key(user))
        return p

    curves: dict[str, list[int]] = {}
    summary: dict[str, dict[str, Any]] = {}
    for label, duration in (("no_ramp", 0.0), ("ramp", ramp_s)):
        per_second = [0] * seconds
        back: set[int] = set()
        for user, t in zip(draws, times):
            if users.preference(user)[0] != VICTIM or t < RECOVERY_AT or user in back:
                continue
            if ramp.returned(point(user), RECOVERY_AT, duration, t):
                back.add(user)  # its first request on the victim: rehydrate
                per_second[int(t)] += 1
        curves[label] = per_second
        first = int(RECOVERY_AT)
        summary[label] = {
            "rehydrations": sum(per_second),
            "peak_per_s": max(per_second),
            "first_second": per_second[first],
            "first_5_seconds": sum(per_second[first : first + 5]),
        }

    # Two proxies of a fleet whose ramps (or instant failbacks) start FLEET_SKEW apart.
    disagree = {"no_ramp": 0, "ramp": 0}
    for user, t in zip(draws, times):
        if users.preference(user)[0] != VICTIM:
            continue
        for label, duration in (("no_ramp", 0.0), ("ramp", ramp_s)):
            a = t >= RECOVERY_AT and ramp.returned(point(user), RECOVERY_AT, duration, t)
            b = t >= RECOVERY_AT + FLEET_SKEW and ramp.returned(
                point(user), RECOVERY_AT + FLEET_SKEW, duration, t
            )
            disagree[label] += a != b
    for label in summary:
        summary[label]["fleet_disagreements"] = disagree[label]
        progress(
            f"skew: failback {label.replace('_', ' ')}: {summary[label]['rehydrations']} "
            f"rehydrations in the window, peak {summary[label]['peak_per_s']}/s, first 5 s "
            f"{summary[label]['first_5_seconds']}; requests two proxies "
            f"{FLEET_SKEW:g} s apart route differently: {disagree[label]}"
        )
    return {
        "rate": rate,
        "ramp_s": ramp_s,
        "recovery_at": RECOVERY_AT,
        "window_s": window,
        "requests": count,
        "victim": VICTIM,
        "fleet_skew_s": FLEET_SKEW,
        "per_second": curves,
        "summary": summary,
        "peak_reduction": (
            summary["no_ramp"]["peak_per_s"] / max(1, summary["ramp"]["peak_per_s"])
        ),
    }


# -- measured through the real proxy ---------------------------------------------------------
# Three aiohttp backends (one process, one port each) that take SERVICE_S per request, wrk
# sending Zipf users (lua/zipf.lua), and `stickyproxy run` (one worker) between them. What the
# simulation above models, counted by the proxy itself (/metrics) and by the backends.

SERVICE_S = 0.005  # each backend request sleeps this long: in-flight load exists
HEALTH_PATH = "/health"
CONTROL_PATH = "/_bench"  # the bench's own endpoint on each backend (not via the proxy)
REAL_HEALTH_INTERVAL_MS = 200  # checks every 200 ms, fall 2, rise 1: a recovery is seen
REAL_HEALTH_FALL, REAL_HEALTH_RISE = 2, 1  # within about 0.2 s
REAL_FACTORS: tuple[float | None, ...] = (None, 1.5, 1.25)
SMOKE_REAL_FACTORS: tuple[float | None, ...] = (None, 1.25)
REAL_CONNECTIONS = 48  # wrk connections: at most 48 requests in flight in all
BALANCE_SECONDS, SMOKE_BALANCE_SECONDS = 6, 2  # wrk takes whole seconds
WARMUP_SECONDS = 1  # wrk through each new proxy before its measured run
# The request path's speed, features off vs on (not in --smoke): backends answer at once
SPEED_ROUNDS, SPEED_SECONDS, SPEED_CONNECTIONS = 5, 2, 16
REAL_RAMP, SMOKE_REAL_RAMP = 10.0, 2.0  # health.failback_ramp for the measured runs
RECOVER_AFTER, SMOKE_RECOVER_AFTER = 1.0, 1.0  # seconds into the wrk run the victim recovers
AFTER_REAL_RAMP, SMOKE_AFTER_REAL_RAMP = 1.0, 1.0
SAMPLE_INTERVAL = 0.1  # /metrics scraped this often for in-flight peaks
HTTP_TIMEOUT = 5.0
DOWN_TIMEOUT = 10.0  # the proxy must mark the failing victim down within this
START_TIMEOUT = 30.0  # a Python server importing aiohttp on a busy machine


def _http(port: int, path: str, method: str = "GET") -> bytes:
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
        return bytes(resp.read())


def _backend_app(backend_id: str, state: dict[str, Any]) -> Any:
    """One backend: GET / sleeps SERVICE_S and counts the request, its user and its in-flight
    load; GET /health fails while the bench says so; CONTROL_PATH sets that flag, resets the
    counts and reports them."""
    from aiohttp import web

    def fresh() -> dict[str, Any]:
        return {
            "requests": 0,
            "inflight": 0,
            "peak": 0,
            "busy": 0.0,
            "since": time.monotonic(),
            "changed": time.monotonic(),
            "users": set(),
            "failing": False,
            "recovered_at": None,
            "back": set(),
            "rehydrations": [],
            "service": SERVICE_S,
        }

    state[backend_id] = fresh()

    async def hello(request: web.Request) -> web.Response:
        st = state[backend_id]
        user = request.headers.get("X-User-Id", "")
        now = time.monotonic()
        st["busy"] += st["inflight"] * (now - st["changed"])
        st["changed"] = now
        st["inflight"] += 1
        st["peak"] = max(st["peak"], st["inflight"])
        st["requests"] += 1
        st["users"].add(user)
        if st["recovered_at"] is not None and user not in st["back"]:
            # its first request here since the recovery: the app would rehydrate it from Redis
            st["back"].add(user)
            st["rehydrations"].append(now - st["recovered_at"])
        try:
            if st["service"]:
                await asyncio.sleep(st["service"])
        finally:
            now = time.monotonic()
            st["busy"] += st["inflight"] * (now - st["changed"])
            st["changed"] = now
            st["inflight"] -= 1
        return web.Response(text="ok\n", headers={"X-Backend": backend_id})

    async def health(_request: web.Request) -> web.Response:
        return web.Response(status=503 if state[backend_id]["failing"] else 200)

    async def control(request: web.Request) -> web.Response:
        st = state[backend_id]
        q = request.query
        if q.get("reset"):
            st = state[backend_id] = fresh()
        if "service" in q:
            st["service"] = float(q["service"])
        if q.get("fail") == "1":
            st["failing"] = True
        elif q.get("fail") == "0" and st["failing"]:
            st["failing"] = False
            st["recovered_at"] = time.monotonic()
            st["back"] = set()
            st["rehydrations"] = []
        now = time.monotonic()
        elapsed = max(1e-9, now - st["since"])
        busy = st["busy"] + st["inflight"] * (now - st["changed"])
        return web.json_response(
            {
                "id": backend_id,
                "requests": st["requests"],
                "peak_inflight": st["peak"],
                "mean_inflight": busy / elapsed,
                "users": len(st["users"]),
                "rehydrations": st["rehydrations"],
            }
        )

    async def union(_request: web.Request) -> web.Response:
        return web.json_response(len(set().union(*(st["users"] for st in state.values()))))

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_post(CONTROL_PATH, control)
    app.router.add_post(CONTROL_PATH + "/union", union)
    return app


async def _serve_backends(ports: list[int], ids: list[str]) -> None:
    from aiohttp import web

    state: dict[str, Any] = {}
    runners = []
    for backend_id, port in zip(ids, ports):
        runner = web.AppRunner(_backend_app(backend_id, state), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    try:
        await asyncio.Event().wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def proxy_config(
    port: int,
    admin_port: int,
    backend_ports: list[int],
    factor: float | None = None,
    ramp_s: float = 0.0,
    hotkeys: bool = True,
) -> str:
    backends = "\n".join(
        f'[[backends]]\nid = "{b}"\nurl = "http://127.0.0.1:{p}"\n'
        for b, p in zip(BACKENDS, backend_ports)
    )
    return f"""[listen]
host = "127.0.0.1"
port = {port}

[admin]
host = "127.0.0.1"
port = {admin_port}

[routing]
balance_factor = {factor or 0}

[hotkeys]
enabled = {str(hotkeys).lower()}

[health]
path = "{HEALTH_PATH}"
interval = "{REAL_HEALTH_INTERVAL_MS}ms"
timeout = "{REAL_HEALTH_INTERVAL_MS}ms"
fall = {REAL_HEALTH_FALL}
rise = {REAL_HEALTH_RISE}
failback_ramp = "{ramp_s:g}s"

{backends}"""


def _metric(text: str, name: str, label: str) -> dict[str, float]:
    from .killdrill import metric_by_label

    return metric_by_label(text, name, label)


class Sampler:
    """Scrapes the proxy's /metrics every SAMPLE_INTERVAL in a thread: the peak of each
    backend's in-flight gauge, and when the victim was seen usable again."""

    def __init__(self, admin_port: int):
        self.admin_port = admin_port
        self.peak = dict.fromkeys(BACKENDS, 0.0)
        self.samples = 0
        self.up_at: dict[str, float] = {}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Sampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            try:
                text = _http(self.admin_port, "/metrics").decode()
            except OSError:
                continue
            self.samples += 1
            for b, n in _metric(text, "stickyproxy_backend_inflight", "backend").items():
                if b in self.peak:
                    self.peak[b] = max(self.peak[b], n)
            for b, n in _metric(text, "stickyproxy_backend_up", "backend").items():
                if n and b not in self.up_at:
                    self.up_at[b] = time.monotonic()


def _control(port: int, query: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_http(port, f"{CONTROL_PATH}?{query}", "POST"))
    return result


class RealRig:
    """The backends' process (started once) and one proxy at a time."""

    def __init__(self, workdir: Path, stack: Any):
        from .procs import free_ports, start_server
        from .targets import python_env

        self.workdir, self.stack = workdir, stack
        self.backend_ports = free_ports(len(BACKENDS))
        start_server(
            "skew-backends",
            [
                sys.executable,
                "-m",
                "bench.skew",
                "--serve-backends",
                ",".join(map(str, self.backend_ports)),
            ],
            self.backend_ports,
            workdir,
            stack,
            python_env(),
            timeout=START_TIMEOUT,
        )

    def control_all(self, query: str) -> dict[str, dict[str, Any]]:
        return {b: _control(p, query) for b, p in zip(BACKENDS, self.backend_ports)}

    def proxy(
        self, name: str, factor: float | None = None, ramp_s: float = 0.0, hotkeys: bool = True
    ) -> Any:
        """A context manager: `stickyproxy run` with this config, its (port, admin port)."""
        import contextlib

        from .procs import free_ports, start_server
        from .targets import python_env

        @contextlib.contextmanager
        def running() -> Any:
            port, admin = free_ports(2)
            conf = self.workdir / f"{name}.toml"
            conf.write_text(proxy_config(port, admin, self.backend_ports, factor, ramp_s, hotkeys))
            with contextlib.ExitStack() as stack:
                start_server(
                    name,
                    [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(conf)],
                    [port, admin],
                    self.workdir,
                    stack,
                    python_env(),
                    timeout=START_TIMEOUT,
                )
                yield port, admin

        return running()


def _wrk(
    port: int, seconds: float, users: int, connections: int = REAL_CONNECTIONS
) -> dict[str, Any]:
    from .wrk import LUA_DIR, run_script

    r = run_script(
        port, seconds, connections, LUA_DIR / "zipf.lua", [str(users), str(ZIPF_S), str(SEED)]
    )
    return {
        "requests": r.requests,
        "rps": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "non_2xx": r.non_2xx,
        "socket_errors": r.socket_errors,
    }


def _added(before: str, after: str, name: str, label: str) -> dict[str, float]:
    """What a run added to a counter between two scrapes (a warm-up's requests left out)."""
    start = _metric(before, name, label)
    return {
        k: v - start.get(k, 0.0)
        for k, v in _metric(after, name, label).items()
        if v - start.get(k, 0.0)
    }


def real_balance(
    rig: RealRig,
    users: int,
    seconds: float,
    warmup: int,
    factors: tuple[float | None, ...],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Per factor, back to back: each backend's requests (the proxy's requests_total), its
    in-flight peak (sampled gauge) and mean and peak (counted by the backend), the requests
    spilled (route decisions and spills_total), and the users a second backend saw (each
    is one extra rehydration from Redis)."""
    runs = []
    for factor in factors:
        name = f"skew-proxy-balance-{_factor_name(factor)}"
        with rig.proxy(name, factor=factor) as (port, admin):
            if warmup:
                _wrk(port, warmup, users)
            rig.control_all("reset=1")
            before = _http(admin, "/metrics").decode()
            with Sampler(admin) as sampler:
                load = _wrk(port, seconds, users)
            text = _http(admin, "/metrics").decode()
        seen = rig.control_all("")
        served = _added(before, text, "stickyproxy_requests_total", "backend")
        decisions = _added(before, text, "stickyproxy_route_decisions_total", "result")
        spills = _added(before, text, "stickyproxy_spills_total", "backend")
        answered = sum(served.get(b, 0) for b in BACKENDS)
        routed = sum(decisions.values())
        mean_inflight = sum(seen[b]["mean_inflight"] for b in BACKENDS) / len(BACKENDS)
        distinct = _distinct_users(rig)
        run = {
            "factor": factor,
            "load": load,
            "requests": answered,
            "share": {b: served.get(b, 0) / max(1, answered) for b in BACKENDS},
            "max_share_over_mean": (
                max(served.get(b, 0) for b in BACKENDS) / max(1e-9, answered / len(BACKENDS))
            ),
            "proxy_inflight_peak": sampler.peak,
            "inflight_samples": sampler.samples,
            "backend_requests": {b: seen[b]["requests"] for b in BACKENDS},
            "backend_peak_inflight": {b: seen[b]["peak_inflight"] for b in BACKENDS},
            "backend_mean_inflight": {b: round(seen[b]["mean_inflight"], 2) for b in BACKENDS},
            "busiest_mean_over_mean": (
                max(seen[b]["mean_inflight"] for b in BACKENDS) / max(1e-9, mean_inflight)
            ),
            "route_decisions": decisions,
            "spill_share": decisions.get("spill", 0) / max(1, routed),
            "spills_total": spills,
            "spills": sum(spills.values()),
            "users_on_two_backends": sum(seen[b]["users"] for b in BACKENDS) - distinct,
            "distinct_users": distinct,
        }
        runs.append(run)
        progress(
            f"skew (real): factor {_factor_name(factor)}: {load['rps']:,.0f} req/s, shares "
            + " ".join(f"{run['share'][b]:.1%}" for b in BACKENDS)
            + ", backend in-flight mean "
            + "/".join(f"{run['backend_mean_inflight'][b]:.1f}" for b in BACKENDS)
            + f", spilled {run['spill_share']:.2%} ({run['spills']:.0f}), users on a second "
            f"backend {run['users_on_two_backends']}"
        )
    off = runs[0]["load"]["rps"]
    for r in runs:
        r["rps_over_off"] = r["load"]["rps"] / off if off else None
    return {
        "seconds": seconds,
        "warmup_s": warmup,
        "connections": REAL_CONNECTIONS,
        "service_ms": SERVICE_S * 1000,
        "runs": runs,
    }


def _distinct_users(rig: RealRig) -> int:
    """Users seen by any backend: asked of the backends' process as a union of their sets."""
    return int(json.loads(_http(rig.backend_ports[0], f"{CONTROL_PATH}/union", "POST")))


def _factor_name(factor: float | None) -> str:
    return "off" if factor is None else f"{factor:g}"


def _wrk_into(box: dict[str, Any], port: int, seconds: float, users: int) -> None:
    """_wrk in a thread: its figures, or its error for the caller to raise, into ``box``."""
    try:
        box.update(_wrk(port, seconds, users))
    except Exception as e:  # noqa: BLE001 -- re-raised by the caller after join()
        box["error"] = e


def real_failback(
    rig: RealRig,
    users: int,
    ramp_s: float,
    recover_after: float,
    after: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Without and with the ramp, back to back: the victim fails its health checks until the
    proxy marks it down, wrk starts, the victim passes them again `recover_after` s later;
    the victim counts the first request of each user since (a rehydration), by time since."""
    victim_port = rig.backend_ports[BACKENDS.index(VICTIM)]
    window = math.ceil(recover_after + ramp_s + after)  # wrk takes whole seconds
    runs: dict[str, dict[str, Any]] = {}
    for label, duration in (("no_ramp", 0.0), ("ramp", ramp_s)):
        rig.control_all("reset=1")
        with rig.proxy(f"skew-proxy-failback-{label}", ramp_s=duration) as (port, admin):
            _control(victim_port, "fail=1")
            deadline = time.monotonic() + DOWN_TIMEOUT
            while _metric(
                _http(admin, "/metrics").decode(), "stickyproxy_backend_up", "backend"
            ).get(VICTIM, 1):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the proxy did not mark {VICTIM} down within {DOWN_TIMEOUT:g}s"
                    )
                time.sleep(SAMPLE_INTERVAL)
            box: dict[str, Any] = {}
            worker = threading.Thread(target=_wrk_into, args=(box, port, window, users))
            with Sampler(admin) as sampler:
                sampler.up_at.clear()
                worker.start()
                time.sleep(recover_after)
                recovered = time.monotonic()
                _control(victim_port, "fail=0")
                worker.join()
            if "error" in box:
                raise box["error"]
            seen = _control(victim_port, "")
        offsets = seen["rehydrations"]
        seconds = int(window - recover_after)
        per_second = [0] * seconds
        for t in offsets:
            if t < seconds:
                per_second[int(t)] += 1
        up = sampler.up_at.get(VICTIM)
        runs[label] = {
            "ramp_s": duration,
            "load": box,
            "per_second": per_second,
            "rehydrations": sum(per_second),
            "peak_per_s": max(per_second, default=0),
            "first_second": per_second[0] if per_second else 0,
            "median_s": sorted(offsets)[len(offsets) // 2] if offsets else None,
            "seen_up_after_s": round(up - recovered, 3) if up else None,
        }
        progress(
            f"skew (real): failback {label.replace('_', ' ')}: {sum(per_second)} rehydrations, "
            f"peak {runs[label]['peak_per_s']}/s, first second "
            f"{runs[label]['first_second']}, {box.get('rps', 0):,.0f} req/s"
        )
    return {
        "victim": VICTIM,
        "ramp_s": ramp_s,
        "recover_after_s": recover_after,
        "window_s": window,
        "connections": REAL_CONNECTIONS,
        "runs": runs,
        "peak_reduction": (runs["no_ramp"]["peak_per_s"] / max(1, runs["ramp"]["peak_per_s"])),
    }


def real_speed(
    rig: RealRig, users: int, rounds: int, seconds: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """The request path's speed with the three features off and on: two proxies running side
    by side in front of backends that answer at once, wrk against each in turn (which goes
    first alternates), ``rounds`` times; on ÷ off per round."""
    rig.control_all("reset=1&service=0")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    p99: dict[str, list[float]] = {"off": [], "on": []}
    with (
        rig.proxy("skew-proxy-speed-off", hotkeys=False) as (off_port, _),
        rig.proxy("skew-proxy-speed-on", factor=1.25, ramp_s=REAL_RAMP) as (on_port, _),
    ):
        ports = {"off": off_port, "on": on_port}
        for label in ports:
            _wrk(ports[label], WARMUP_SECONDS, users, SPEED_CONNECTIONS)
        for i in range(rounds):
            for label in ("off", "on") if i % 2 == 0 else ("on", "off"):
                r = _wrk(ports[label], seconds, users, SPEED_CONNECTIONS)
                rates[label].append(r["rps"])
                p99[label].append(r["p99_ms"])
    rig.control_all(f"reset=1&service={SERVICE_S}")
    ratios = [on / off for on, off in zip(rates["on"], rates["off"]) if off]
    median = sorted(ratios)[len(ratios) // 2] if ratios else None
    progress(
        "skew (real): request path, features on ÷ off per round: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + " ("
        + ", ".join(f"{a:,.0f}/{b:,.0f} req/s" for a, b in zip(rates["on"], rates["off"]))
        + ")"
    )
    return {
        "rounds": rounds,
        "seconds": seconds,
        "connections": SPEED_CONNECTIONS,
        "rps": rates,
        "p99_ms": p99,
        "ratios": ratios,
        "median_ratio": median,
    }


def real(smoke: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """The measured part, or why it was skipped (no wrk)."""
    import contextlib
    import shutil
    import tempfile

    if shutil.which("wrk") is None:
        progress("skew (real): wrk is not installed, only the simulation ran")
        return {"skipped": "wrk is not installed"}
    started = time.perf_counter()
    users = SMOKE_USERS if smoke else USERS
    with tempfile.TemporaryDirectory(prefix="skew-") as tmp, contextlib.ExitStack() as stack:
        rig = RealRig(Path(tmp), stack)
        out = {
            "users": users,
            "service_ms": SERVICE_S * 1000,
            "health_interval_ms": REAL_HEALTH_INTERVAL_MS,
            "loadavg_at_start": list(os.getloadavg()),
            "balance": real_balance(
                rig,
                users,
                SMOKE_BALANCE_SECONDS if smoke else BALANCE_SECONDS,
                0 if smoke else WARMUP_SECONDS,
                SMOKE_REAL_FACTORS if smoke else REAL_FACTORS,
                progress,
            ),
            "failback": real_failback(
                rig,
                users,
                SMOKE_REAL_RAMP if smoke else REAL_RAMP,
                SMOKE_RECOVER_AFTER if smoke else RECOVER_AFTER,
                SMOKE_AFTER_REAL_RAMP if smoke else AFTER_REAL_RAMP,
                progress,
            ),
        }
        if not smoke:
            out["speed"] = real_speed(rig, users, SPEED_ROUNDS, SPEED_SECONDS, progress)
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


# -- chart -------------------------------------------------------------------------------


def chart(path: Path, result: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_share, ax_fb) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = result["balance"]["runs"]
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(BACKENDS))]
        label = (
            f"factor {r['factor']:g}: {r['off_owner_share']:.1%} off owner"
            if r["factor"]
            else "no balance factor"
        )
        ax_share.bar(xs, [r["share"][b] for b in BACKENDS], width, label=label)
    ax_share.axhline(1 / len(BACKENDS), color="black", linewidth=0.8, linestyle=":")
    ax_share.set_xticks(range(len(BACKENDS)), BACKENDS)
    ax_share.set_ylabel("share of requests")
    ax_share.set_ylim(0, 0.55)
    ax_share.set_title(f"Zipf s={ZIPF_S} users over 3 backends: load spread", fontsize=10)
    ax_share.legend(fontsize=8, loc="upper left", ncols=2)
    fb = result["failback"]
    for label, style in (("no_ramp", "tab:red"), ("ramp", "tab:blue")):
        curve = fb["per_second"][label]
        name = "no ramp" if label == "no_ramp" else f"ramp {fb['ramp_s']:g} s"
        ax_fb.step(
            [s - fb["recovery_at"] for s in range(len(curve))],
            curve,
            where="post",
            color=style,
            label=name,
        )
    ax_fb.axvline(0, color="black", linewidth=0.8, linestyle=":")
    ax_fb.set_xlabel(f"seconds since {fb['victim']} recovered")
    ax_fb.set_ylabel("rehydrations per second")
    ax_fb.set_title(f"failback at {fb['rate']:,.0f} req/s", fontsize=10)
    ax_fb.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_real(path: Path, result: dict[str, Any]) -> Path | None:
    """The measured part: each backend's share of requests per factor (the simulation's for
    the same factor as a dot), and the recovered backend's rehydrations per second."""
    real_part = result.get("real") or {}
    if "balance" not in real_part:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_share, ax_fb) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = real_part["balance"]["runs"]
    simulated = {r["factor"]: r for r in result["balance"]["runs"]}
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(BACKENDS))]
        label = (
            f"factor {r['factor']:g}: {r['spill_share']:.1%} spilled"
            if r["factor"]
            else "no balance factor"
        )
        ax_share.bar(xs, [r["share"][b] for b in BACKENDS], width, label=label)
        sim = simulated.get(r["factor"])
        if sim is not None:
            ax_share.plot(
                xs,
                [sim["share"][b] for b in BACKENDS],
                "o",
                markersize=4,
                color="black",
                label="simulated" if i == 0 else None,
            )
    ax_share.axhline(1 / len(BACKENDS), color="black", linewidth=0.8, linestyle=":")
    ax_share.set_xticks(range(len(BACKENDS)), BACKENDS)
    ax_share.set_ylabel("share of requests (proxy's requests_total)")
    ax_share.set_ylim(0, 0.55)
    ax_share.set_title(f"measured: Zipf s={ZIPF_S} users through stickyproxy", fontsize=10)
    ax_share.legend(fontsize=8, loc="upper left", ncols=2)
    fb = real_part["failback"]
    for label, color in (("no_ramp", "tab:red"), ("ramp", "tab:blue")):
        curve = fb["runs"][label]["per_second"]
        name = "no ramp" if label == "no_ramp" else f"failback_ramp {fb['ramp_s']:g} s"
        ax_fb.step(range(len(curve) + 1), curve + curve[-1:], where="post", color=color, label=name)
    ax_fb.set_xlabel(f"seconds since {fb['victim']} passed its health checks again")
    ax_fb.set_ylabel("rehydrations per second (first request of a user)")
    ax_fb.set_ylim(bottom=0)
    ax_fb.set_title("measured: the recovered backend's rehydrations", fontsize=10)
    ax_fb.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- entry points ------------------------------------------------------------------------


def run(
    smoke: bool,
    progress: Callable[[str], None],
    images_dir: Path | None = None,
    measure: bool = True,
) -> dict[str, Any]:
    """The simulation, then (``measure``) the same through the real proxy."""
    started = time.perf_counter()
    ring = Ring([Member(b) for b in BACKENDS])
    users = Users(ring, SMOKE_USERS if smoke else USERS)
    rng = random.Random(SEED)
    result: dict[str, Any] = {
        "benchmark": "skew",
        "smoke": smoke,
        "zipf_s": ZIPF_S,
        "users": users.count,
        "backends": list(BACKENDS),
        "seed": SEED,
        "balance": balance(
            users, SMOKE_BALANCE_REQUESTS if smoke else BALANCE_REQUESTS, rng, progress
        ),
        "failback": failback(
            users,
            SMOKE_REQUEST_RATE if smoke else REQUEST_RATE,
            SMOKE_RAMP if smoke else RAMP,
            rng,
            progress,
        ),
    }
    if measure:
        result["real"] = real(smoke, progress)
        if "failback" in result["real"]:
            # the model at the measured run's rate and ramp, to set beside it
            fb = result["real"]["failback"]
            rate = sum(r["load"].get("rps", 0) for r in fb["runs"].values()) / 2
            result["real"]["failback"]["simulated"] = failback(
                users, rate, fb["ramp_s"], random.Random(SEED + 1), lambda _msg: None
            )["summary"]
    result["seconds"] = round(time.perf_counter() - started, 2)
    if images_dir is not None:
        drawn = chart(images_dir / "skew.png", result)
        result["chart"] = str(drawn) if drawn else None
        if drawn is None:
            progress("skew: no chart (pip install -e '.[bench]' for matplotlib)")
        measured = chart_real(images_dir / "skew-measured.png", result)
        result["chart_measured"] = str(measured) if measured else None
    return result


def run_suite(settings: Any) -> dict[str, Any]:
    """For bench/__main__.py: settings has ``smoke`` and ``images_dir``."""
    from .console import progress

    return run(settings.smoke, progress, settings.images_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.skew", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="small counts, a few seconds")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for skew.json and skew.png (default bench/results[/smoke])",
    )
    p.add_argument(
        "--simulate-only",
        action="store_true",
        help="the simulation only, no proxy, backends or wrk",
    )
    p.add_argument("--serve-backends", metavar="PORTS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_backends:
        ports = [int(x) for x in args.serve_backends.split(",")]
        asyncio.run(_serve_backends(ports, list(BACKENDS[: len(ports)])))
        return 0
    from .console import progress

    out = args.out or (RESULTS / "smoke" if args.smoke else RESULTS)
    result = run(args.smoke, progress, out, measure=not args.simulate_only)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skew.json").write_text(json.dumps(result, indent=1) + "\n")
    progress(f"skew: {out / 'skew.json'}, chart {result.get('chart')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
