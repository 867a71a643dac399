"""Failover drill: under a fixed request rate, kill one of three shop instances (SIGKILL, sticky
mode), later start it again, and account for every request and every counter increment.

Reported: failed requests by method, when the proxy saw the instance go down and come back
(its admin API, polled), how long after the kill requests kept failing (relative to the
health-check interval), lost counter increments (every user's counter read at the end vs
the increments acknowledged to that user), rehydrations from each instance's
stickyctx_acquisitions_total, and requests per second per instance over time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import random
import re
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stats
from .httpclient import Outcome, Request, closed_loop, open_loop, run_loop
from .procs import LOOPBACK, free_ports, wait_until_accepting
from .shopstack import (
    APP_START_TIMEOUT,
    Health,
    ShopApp,
    context_counters,
    get_json,
    proxy_config,
    scrape,
    spawn_shop,
    start_proxy,
    start_redis,
    start_shops,
)

INSTANCES = ("app-1", "app-2", "app-3")
VICTIM = "app-2"
HEALTH = Health(interval="1s", timeout="500ms", rise=2, fall=2)
HEALTH_INTERVAL_S = 1.0
ITEMS = ("apple", "bread", "coffee", "milk", "tea")
# (name, method, path, weight); "increment" is the counter whose acknowledgements are tracked.
ACTIONS = (
    ("read cart", "GET", "/cart", 30),
    ("read counter", "GET", "/counter", 20),
    ("increment", "POST", "/counter", 30),
    ("add item", "POST", "/cart/items", 10),
    ("remove item", "DELETE", "/cart/items/{item}", 10),
)
INCREMENT = "increment"
IDEMPOTENT_METHODS = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
EJECTED = "ejected"
LOG_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(?P<ms>\d{3}) \w+ [\w.]+: "
    r"(?P<message>.*)$"
)
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
CONNECTIONS = 64
REQUEST_TIMEOUT = 5.0
ADMIN_POLL_S = 0.1
SEED = 7


@dataclass(frozen=True)
class DrillPlan:
    users: int
    rate: float
    duration: float
    kill_at: float
    restart_at: float
    smoke: bool


FULL = DrillPlan(users=300, rate=300.0, duration=50.0, kill_at=10.0, restart_at=20.0, smoke=False)
SMOKE = DrillPlan(users=60, rate=100.0, duration=7.0, kill_at=1.5, restart_at=3.0, smoke=True)


def make_plan(smoke: bool) -> DrillPlan:
    return SMOKE if smoke else FULL


def _request_maker(users: int) -> Callable[[int], Request]:
    rng = random.Random(SEED)
    names = [a[0] for a in ACTIONS]
    weights = [a[3] for a in ACTIONS]
    by_name = {a[0]: a for a in ACTIONS}

    def make(_i: int) -> Request:
        name, method, path, _ = by_name[rng.choices(names, weights)[0]]
        user = f"drill-{rng.randint(1, users)}"
        item = rng.choice(ITEMS)
        body = f'{{"item": "{item}", "qty": 1}}'.encode() if name == "add item" else b""
        return Request(method, path.format(item=item), user, body, name)

    return make


@dataclass
class Events:
    """Moments of the drill, in seconds since its start (time.perf_counter based)."""

    start: float
    wall_start: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)
    backend_states: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    context: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - self.start


class Drill:
    def __init__(
        self,
        plan: DrillPlan,
        workdir: Path,
        exits: contextlib.ExitStack,
        redis_url: str,
        apps: list[ShopApp],
        admin_port: int,
        progress: Callable[[str], None],
    ):
        self.plan = plan
        self.workdir = workdir
        self.exits = exits
        self.redis_url = redis_url
        self.apps = {a.id: a for a in apps}
        self.admin_url = f"http://{LOOPBACK}:{admin_port}"
        self.progress = progress
        self.events = Events(0.0)

    def scrape_context(self, label: str) -> None:
        out = {}
        for app in self.apps.values():
            if app.server.running:
                with contextlib.suppress(OSError):
                    out[app.id] = context_counters(scrape(app))
        self.events.context[label] = out

    def _kill(self) -> None:
        victim = self.apps[VICTIM]
        self.events.mark("kill")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(victim.server.proc.pid, signal.SIGKILL)
        victim.server.proc.wait()
        self.progress(f"t={self.events.marks['kill']:.1f}s killed {VICTIM} (SIGKILL)")

    def _restart(self) -> None:
        old = self.apps[VICTIM]
        self.events.mark("restart")
        app = spawn_shop(
            self.workdir,
            self.exits,
            VICTIM,
            old.port,
            self.redis_url,
            stateless=False,
            counted=False,
        )
        self.apps[VICTIM] = app
        self.progress(f"t={self.events.marks['restart']:.1f}s started {VICTIM} again")

    async def _control(self) -> None:
        await asyncio.sleep(self.plan.kill_at)
        await asyncio.to_thread(self.scrape_context, "before_kill")
        self._kill()
        await asyncio.sleep(max(0.0, self.plan.restart_at - self.events.marks["kill"]))
        await asyncio.to_thread(self.scrape_context, "before_restart")
        self._restart()
        victim = self.apps[VICTIM]
        await asyncio.to_thread(
            wait_until_accepting, victim.server, [victim.port], APP_START_TIMEOUT
        )
        self.events.mark("restarted_accepting")

    async def _watch_admin(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                view = await asyncio.to_thread(get_json, self.admin_url + "/backends")
                states = {b["id"]: b["state"] for b in view["backends"]}
                self.events.backend_states.append((time.perf_counter() - self.events.start, states))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ADMIN_POLL_S)

    async def run(self, proxy_port: int) -> list[Outcome]:
        stop = asyncio.Event()
        self.events = Events(time.perf_counter(), time.time())
        watcher = asyncio.create_task(self._watch_admin(stop))
        control = asyncio.create_task(self._control())
        outcomes = await open_loop(
            proxy_port,
            self.plan.rate,
            self.plan.duration,
            _request_maker(self.plan.users),
            connections=CONNECTIONS,
            timeout=REQUEST_TIMEOUT,
            keep_body=True,
        )
        await control
        stop.set()
        await watcher
        return outcomes


def _counter_value(body: bytes) -> int | None:
    try:
        return int(json.loads(body)["value"])
    except (ValueError, KeyError, TypeError):
        return None


def final_counters(proxy_port: int, users: int) -> dict[str, int | None]:
    requests = [Request("GET", "/counter", f"drill-{i}") for i in range(1, users + 1)]
    outcomes = run_loop(closed_loop(proxy_port, requests, connections=8, keep_body=True))
    return {o.request.user: _counter_value(o.body) if o.ok else None for o in outcomes}


def _first_state_change(
    states: list[tuple[float, dict[str, str]]], after: float, wanted: Callable[[str], bool]
) -> float | None:
    for t, backends in states:
        if t >= after and wanted(backends.get(VICTIM, "")):
            return t
    return None


def _time_of(outcome: Outcome, start: float) -> float:
    """When the request was due, in seconds since the drill started."""
    return outcome.due - start


def _ended(outcome: Outcome, start: float) -> float:
    """When the request was answered (or failed), in seconds since the drill started."""
    return outcome.done - start


def timeline(outcomes: Sequence[Outcome], start: float, duration: float) -> dict[str, Any]:
    """Per whole second of the drill: answers per instance, failures per method."""
    seconds = math.ceil(duration)
    served: dict[str, list[int]] = collections.defaultdict(lambda: [0] * seconds)
    failed: dict[str, list[int]] = collections.defaultdict(lambda: [0] * seconds)
    for o in outcomes:
        second = min(int(_time_of(o, start)), seconds - 1)
        if o.ok:
            served[o.served_by or "?"][second] += 1
        else:
            failed[o.request.method][second] += 1
    return {"seconds": list(range(seconds)), "served": dict(served), "failed": dict(failed)}


def analyse(
    outcomes: Sequence[Outcome], events: Events, counters: dict[str, int | None], plan: DrillPlan
) -> dict[str, Any]:
    start = events.start
    kill, restart = events.marks["kill"], events.marks["restart"]
    failures = [o for o in outcomes if not o.ok]
    by_method: dict[str, dict[str, int]] = {}
    for o in outcomes:
        entry = by_method.setdefault(o.request.method, {"requests": 0, "failed": 0})
        entry["requests"] += 1
        entry["failed"] += not o.ok
    failure_kinds = collections.Counter(o.error or str(o.status) for o in failures)

    acked: collections.Counter[str] = collections.Counter()
    for o in outcomes:
        if o.request.action == INCREMENT and o.ok:
            acked[o.request.user] += 1
    unreadable = [u for u, v in counters.items() if v is None]
    lost = {u: acked[u] - (v or 0) for u, v in counters.items() if v is not None and acked[u] > v}
    extra = sum(max(0, (v or 0) - acked[u]) for u, v in counters.items() if v is not None)

    after_kill = [_ended(o, start) - kill for o in failures if _ended(o, start) >= kill]
    last_failure_after_kill = max(after_kill, default=None)
    first_clean_second = _first_clean_second(outcomes, start, kill, restart)
    down_seen = _first_state_change(events.backend_states, kill, lambda s: s != "up")
    up_seen = _first_state_change(events.backend_states, restart, lambda s: s == "up")
    first_served = min(
        (
            _time_of(o, start)
            for o in outcomes
            if o.ok and o.served_by == VICTIM and _time_of(o, start) >= restart
        ),
        default=None,
    )
    latencies = sorted(o.latency for o in outcomes if o.ok)
    spans = victim_spans(events.backend_states, plan.duration)
    return {
        "requests": len(outcomes),
        "failed": len(failures),
        "by_method": by_method,
        "failure_kinds": dict(failure_kinds),
        "failed_idempotent": sum(
            v["failed"] for m, v in by_method.items() if m in IDEMPOTENT_METHODS
        ),
        "increments_acknowledged": sum(acked.values()),
        "lost_increments": sum(lost.values()),
        "users_with_lost_increments": len(lost),
        "unacknowledged_but_applied": extra,
        "unreadable_counters": len(unreadable),
        "kill_s": kill,
        "restart_s": restart,
        "restarted_accepting_s": events.marks.get("restarted_accepting"),
        "last_failure_after_kill_s": last_failure_after_kill,
        "first_clean_second_after_kill": first_clean_second,
        "proxy_saw_down_after_s": None if down_seen is None else down_seen - kill,
        "proxy_saw_up_after_restart_s": None if up_seen is None else up_seen - restart,
        "first_served_after_restart_s": None if first_served is None else first_served - restart,
        "health_interval_s": HEALTH_INTERVAL_S,
        "latency_p99_ms": stats.percentile(latencies, 99) * 1000 if latencies else None,
        "victim_states": spans,
        "ejected_s": sum(e - b for b, e, state in spans if state == EJECTED),
        "context": events.context,
        "timeline": timeline(outcomes, start, plan.duration),
        "backend_states": [{"t": t, **s} for t, s in events.backend_states],
    }


def victim_spans(
    states: list[tuple[float, dict[str, str]]], duration: float
) -> list[tuple[float, float, str]]:
    """The victim's state as the proxy's admin API showed it: (from, to, state) spans."""
    spans: list[list[Any]] = []
    for t, backends in states:
        state = backends.get(VICTIM, "?")
        if spans and spans[-1][2] == state:
            continue
        if spans:
            spans[-1][1] = t
        spans.append([t, duration, state])
    return [(b, e, state) for b, e, state in spans]


def proxy_log_events(log_text: str, wall_start: float) -> list[tuple[float, str]]:
    """The proxy's log lines about the victim, in seconds since the drill started."""
    out = []
    for line in log_text.splitlines():
        m = LOG_LINE.match(line)
        if not m or f"backend {VICTIM} " not in m.group("message"):
            continue
        stamp = time.mktime(time.strptime(m.group("time"), LOG_TIME_FORMAT))
        stamp += int(m.group("ms")) / 1000
        out.append((stamp - wall_start, m.group("message")))
    return out


def _first_clean_second(
    outcomes: Sequence[Outcome], start: float, kill: float, restart: float
) -> int | None:
    """Whole seconds after the kill until the first second without a failed request."""
    failed_seconds = {
        int(_ended(o, start) - kill)
        for o in outcomes
        if not o.ok and kill <= _ended(o, start) < restart
    }
    for second in range(int(restart - kill)):
        if second not in failed_seconds:
            return second
    return None


def run(plan: DrillPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-failover-") as tmp,
        contextlib.ExitStack() as exits,
    ):
        workdir = Path(tmp)
        redis_url = start_redis(workdir, exits)
        apps = start_shops(workdir, exits, INSTANCES, redis_url, stateless=False, counted=False)
        port, admin_port = free_ports(2)
        config = proxy_config(port, apps, sticky=True, health=HEALTH, admin_port=admin_port)
        start_proxy(workdir, exits, "proxy", config, [port, admin_port])
        progress(
            f"drill: proxy on {LOOPBACK}:{port}, {len(apps)} instances, health every "
            f"{HEALTH.interval} (rise {HEALTH.rise}, fall {HEALTH.fall}); "
            f"{plan.rate:g} req/s for {plan.duration:g}s, kill {VICTIM} at "
            f"{plan.kill_at:g}s, restart at {plan.restart_at:g}s"
        )
        drill = Drill(plan, workdir, exits, redis_url, apps, admin_port, progress)
        outcomes = run_loop(drill.run(port))
        progress("drill: reading every user's counter")
        counters = final_counters(port, plan.users)
        drill.scrape_context("end")
        result = analyse(outcomes, drill.events, counters, plan)
        result["proxy_log"] = proxy_log_events(
            (workdir / "proxy.log").read_text(errors="replace"), drill.events.wall_start
        )
    return {
        "benchmark": "failover",
        "settings": {
            "users": plan.users,
            "rate": plan.rate,
            "duration_s": plan.duration,
            "kill_at_s": plan.kill_at,
            "restart_at_s": plan.restart_at,
            "victim": VICTIM,
            "instances": list(INSTANCES),
            "health": vars(HEALTH),
            "mix": {a[0]: a[3] for a in ACTIONS},
            "smoke": plan.smoke,
            "proxy_config": config,
        },
        **result,
    }


def main() -> int:
    result = run(make_plan(smoke=True), print)
    print({k: v for k, v in result.items() if k not in ("timeline", "backend_states", "settings")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
