"""Kill drill: backends killed with SIGKILL under load and started again, through NGINX, HAProxy
and stickyproxy, each configured as its users would for the job (bench/targets.py,
``*_drill_launch``), one after another in the same run.

Three backends (bench/backend.py, one process per port so each can be killed alone), `clients`
keep-alive connections each sending its next GET (a random user of `users`, X-User-Id) when
the previous one is answered, and every `period` s one backend, in turn, killed -9 and started
again on the same port `down` s later. A GET answered 200 is counted answered; anything else
(another status, a reset, a timeout, a refused connect) failed, with its reason: the status
and the first bytes of the body, or the client's error. The client never retries.

Afterwards, what each proxy counted itself: stickyproxy's ``retries_total`` and
``retries_denied_total`` by reason (/metrics on its admin listener), HAProxy's retries and
redispatches (its stats page, CSV), NGINX's failed upstream attempts (its error log).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import os
import random
import re
import signal
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stats
from .backend import backend_argv
from .httpclient import CONNECT_ERROR, TIMEOUT_ERROR, Request, connect, run_loop
from .probe import ProbeError, check_sticky_routing
from .procs import (
    LOOPBACK,
    Server,
    StartError,
    free_ports,
    spawn_server,
    start_server,
    wait_until_accepting,
)
from .targets import (
    BACKEND_IDS,
    DRILL_HAPROXY_RETRIES,
    DRILL_HEALTH_FALL,
    DRILL_HEALTH_INTERVAL_MS,
    DRILL_HEALTH_RISE,
    DRILL_NGINX_FAIL_TIMEOUT,
    DRILL_NGINX_MAX_FAILS,
    DRILL_NGINX_TRIES,
    DRILL_UPSTREAM_KEEPALIVE,
    Launch,
    haproxy_drill_launch,
    nginx_drill_launch,
    python_env,
    stickyproxy_drill_launch,
)

TARGETS = ("nginx", "haproxy", "stickyproxy")
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "stickyproxy": None}
KILL, START = "kill", "start"
OK_STATUS = 200
# A Python backend importing aiohttp on a busy 2-CPU machine.
BACKEND_START_TIMEOUT = 30.0
# Longer than any proxy's path to an answer on loopback (connects are refused at once, not
# timed out); a GET unanswered this long is counted failed as a timeout.
REQUEST_TIMEOUT = 10.0
# After the client could not connect to the proxy itself: a pause before the next GET, so a
# proxy that died does not turn the client into a busy loop.
CONNECT_BACKOFF_S = 0.05
# Bytes of a failed response's body kept in its reason: enough for the proxy's own message.
REASON_BODY_BYTES = 120
# Failures kept one by one (time, backend killed last, reason), per proxy.
FAILURE_SAMPLES = 40
HTTP_TIMEOUT = 5.0
SEED = 15
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"


@dataclass(frozen=True)
class Plan:
    clients: int
    users: int
    duration: float
    period: float  # one backend killed every `period` seconds…
    down: float  # …and started again this long after its kill
    first_kill: float
    smoke: bool
    targets: tuple[str, ...] = TARGETS


FULL = Plan(clients=24, users=500, duration=30.0, period=4.0, down=2.0, first_kill=2.0, smoke=False)
SMOKE = Plan(clients=8, users=50, duration=4.0, period=2.0, down=1.0, first_kill=0.5, smoke=True)


def make_plan(smoke: bool, targets: Sequence[str] = TARGETS) -> Plan:
    base = SMOKE if smoke else FULL
    return Plan(
        base.clients,
        base.users,
        base.duration,
        base.period,
        base.down,
        base.first_kill,
        base.smoke,
        tuple(targets),
    )


@dataclass(frozen=True)
class Step:
    at: float
    action: str
    backend: str


def schedule(plan: Plan, backends: Sequence[str] = BACKEND_IDS) -> list[Step]:
    """Kills every `period` s from `first_kill`, the backends in turn, each started again
    `down` s later; only what falls before the drill ends, in time order."""
    steps = []
    at, turn = plan.first_kill, 0
    while at < plan.duration:
        victim = backends[turn % len(backends)]
        steps.append(Step(at, KILL, victim))
        if at + plan.down < plan.duration:
            steps.append(Step(at + plan.down, START, victim))
        at += plan.period
        turn += 1
    return sorted(steps, key=lambda s: s.at)


def failure_reason(status: int, body: bytes, error: str) -> str:
    """What a failed GET got: the client's error, or the status and the start of the body."""
    if error:
        return f"no response: {error}"
    text = " ".join(body[:REASON_BODY_BYTES].decode(errors="replace").split())
    return f"{status} {text}".strip()


@dataclass
class Tally:
    """Every GET of one drill, counted as it ends: `at` is seconds since the drill started,
    `latency` seconds from sending the GET to its answer (or failure)."""

    seconds: int
    answered: int = 0
    failed: int = 0
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    served_by: collections.Counter[str] = field(default_factory=collections.Counter)
    answered_per_second: list[int] = field(default_factory=list)
    failed_per_second: list[int] = field(default_factory=list)
    served_per_second: dict[str, list[int]] = field(default_factory=dict)
    samples: list[tuple[float, str]] = field(default_factory=list)
    latencies: array.array = field(default_factory=lambda: array.array("d"))

    def __post_init__(self) -> None:
        self.answered_per_second = [0] * self.seconds
        self.failed_per_second = [0] * self.seconds

    def add(
        self, at: float, latency: float, status: int, body: bytes, error: str, served_by: str
    ) -> None:
        second = max(0, min(int(at), self.seconds - 1))
        if status == OK_STATUS and not error:
            backend = served_by or "?"
            self.answered += 1
            self.answered_per_second[second] += 1
            self.served_by[backend] += 1
            per_second = self.served_per_second.get(backend)
            if per_second is None:
                per_second = self.served_per_second[backend] = [0] * self.seconds
            per_second[second] += 1
            self.latencies.append(latency)
            return
        reason = failure_reason(status, body, error)
        self.failed += 1
        self.failed_per_second[second] += 1
        self.reasons[reason] += 1
        if len(self.samples) < FAILURE_SAMPLES:
            self.samples.append((round(at, 3), reason))


def last_kill_before(at: float, events: Sequence[dict[str, Any]]) -> tuple[str, float] | None:
    """The backend killed last before `at` and how long before, from the drill's events."""
    kills = [e for e in events if e["action"] == KILL and e["at"] <= at]
    if not kills:
        return None
    last = max(kills, key=lambda e: e["at"])
    return last["backend"], at - last["at"]


# -- what each proxy counted itself ----------------------------------------------------------


def metric_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """One Prometheus metric's samples summed by one label's value (`name` as exported)."""
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', head[len(name) :]))
        out[labels.get(label, "")] += float(value)
    return dict(out)


def stickyproxy_counters(metrics_text: str) -> dict[str, dict[str, float]]:
    return {
        "retries_total": metric_by_label(metrics_text, "stickyproxy_retries_total", "reason"),
        "retries_denied_total": metric_by_label(
            metrics_text, "stickyproxy_retries_denied_total", "reason"
        ),
        "upstream_errors_total": metric_by_label(
            metrics_text, "stickyproxy_upstream_errors_total", "kind"
        ),
    }


HAPROXY_FIELDS = {
    "wretr": "retries",
    "wredis": "redispatches",
    "econ": "connection errors",
    "eresp": "response errors",
}


def haproxy_counters(csv_text: str, backend: str = "apps") -> dict[str, int]:
    """The backend's retries, redispatches and errors from HAProxy's stats CSV."""
    lines = csv_text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    columns = lines[0][2:].split(",")
    for line in lines[1:]:
        row = dict(zip(columns, line.split(",")))
        if row.get("pxname") == backend and row.get("svname") == "BACKEND":
            return {label: int(row.get(key) or 0) for key, label in HAPROXY_FIELDS.items()}
    return {}


# error-log text → kind of failed upstream attempt
NGINX_ERRORS = (
    ("Connection refused", "connect refused"),
    ("prematurely closed", "closed before the response"),
    ("reset by peer", "reset"),
    ("timed out", "timeout"),
    ("no live upstreams", "no live upstreams"),
    ("temporarily disabled", "server disabled (max_fails)"),
)


def nginx_counters(error_log: str) -> dict[str, int]:
    """NGINX's upstream errors by kind, one per line of its error log about an upstream."""
    out: collections.Counter[str] = collections.Counter()
    for line in error_log.splitlines():
        if "upstream" not in line:
            continue
        kind = next((k for text, k in NGINX_ERRORS if text in line), "other")
        out[kind] += 1
    return dict(out)


# -- processes ---------------------------------------------------------------------------------


class Fleet:
    """The three backends, each its own process on a fixed port, so one can be killed -9 and
    started again on the same port."""

    def __init__(self, workdir: Path, exits: contextlib.ExitStack, ports: Sequence[int]):
        self.workdir = workdir
        self.exits = exits
        self.ports = dict(zip(BACKEND_IDS, ports))
        self.servers: dict[str, Server] = {}

    def start(self, backend_id: str) -> None:
        argv = backend_argv([self.ports[backend_id]], [backend_id])
        self.servers[backend_id] = spawn_server(
            backend_id, argv, self.workdir, self.exits, python_env()
        )

    def kill(self, backend_id: str) -> None:
        proc = self.servers[backend_id].proc
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def all_up(self) -> None:
        """Every backend running and accepting connections."""
        for backend_id in BACKEND_IDS:
            server = self.servers.get(backend_id)
            if server is None or not server.running:
                self.start(backend_id)
        for backend_id in BACKEND_IDS:
            wait_until_accepting(
                self.servers[backend_id], [self.ports[backend_id]], BACKEND_START_TIMEOUT
            )


def _launch(
    name: str, workdir: Path, port: int, backend_ports: Sequence[int], extra_port: int
) -> tuple[Launch, list[int]]:
    """The proxy's launch and the ports to wait for."""
    if name == "nginx":
        return nginx_drill_launch(workdir, port, backend_ports), [port]
    if name == "haproxy":
        return haproxy_drill_launch(workdir, port, backend_ports, extra_port), [port, extra_port]
    return stickyproxy_drill_launch(workdir, port, backend_ports, extra_port), [port, extra_port]


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        return response.read().decode(errors="replace")


def proxy_counters(name: str, launch: Launch, extra_port: int) -> dict[str, Any]:
    base = f"http://{LOOPBACK}:{extra_port}"
    try:
        if name == "stickyproxy":
            return stickyproxy_counters(_get_text(base + "/metrics"))
        if name == "haproxy":
            return haproxy_counters(_get_text(base + "/stats;csv"))
        return nginx_counters((launch.config_path.parent / "error.log").read_text(errors="replace"))
    except OSError as e:
        return {"unavailable": f"{type(e).__name__}: {e}"}


# -- the drill -----------------------------------------------------------------------------------

now = time.perf_counter


class Drill:
    def __init__(self, port: int, plan: Plan, fleet: Fleet, progress: Callable[[str], None]):
        self.port = port
        self.plan = plan
        self.fleet = fleet
        self.progress = progress
        self.tally = Tally(max(1, int(plan.duration + 0.999)))
        self.events: list[dict[str, Any]] = []
        host = f"{LOOPBACK}:{port}"
        self.requests = [
            Request("GET", "/", f"user-{i}").encode(host) for i in range(1, plan.users + 1)
        ]
        self.start = 0.0

    async def run(self) -> None:
        self.start = now()
        end = self.start + self.plan.duration
        control = asyncio.create_task(self._control())
        await asyncio.gather(
            *(self._client(random.Random(SEED + i), end) for i in range(self.plan.clients))
        )
        await control

    async def _control(self) -> None:
        for step in schedule(self.plan):
            await asyncio.sleep(max(0.0, self.start + step.at - now()))
            act = self.fleet.kill if step.action == KILL else self.fleet.start
            await asyncio.to_thread(act, step.backend)
            self.events.append(
                {"at": round(now() - self.start, 3), "action": step.action, "backend": step.backend}
            )

    async def _client(self, rng: random.Random, end: float) -> None:
        loop = asyncio.get_running_loop()
        conn = None
        while now() < end:
            raw = self.requests[rng.randrange(len(self.requests))]
            issued = now()
            if conn is None or not conn.reusable:
                if conn is not None:
                    conn.close()
                try:
                    conn = await connect(self.port, served_by=True, keep_body=True)
                except OSError:
                    conn = None
                    self.tally.add(now() - self.start, now() - issued, 0, b"", CONNECT_ERROR, "")
                    await asyncio.sleep(CONNECT_BACKOFF_S)
                    continue
            answered: asyncio.Future[Any] = loop.create_future()
            conn.send(raw, lambda _c, r, e: answered.set_result((r, e)))
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    response, error = await answered
            except TimeoutError:
                conn.abandon()
                response, error = None, TIMEOUT_ERROR
            done = now()
            if response is None:
                self.tally.add(done - self.start, done - issued, 0, b"", error, "")
            else:
                self.tally.add(
                    done - self.start,
                    done - issued,
                    response.status,
                    b"".join(response.body),
                    "",
                    response.served_by,
                )
        if conn is not None:
            conn.close()


def run_target(
    name: str, workdir: Path, fleet: Fleet, plan: Plan, progress: Callable[[str], None]
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        port, extra_port = free_ports(2)
        launch, ports = _launch(name, workdir, port, list(fleet.ports.values()), extra_port)
        launch.write()
        try:
            start_server(f"{name}-drill", launch.argv, ports, workdir, stack, launch.env)
            check_sticky_routing(port)
        except (StartError, ProbeError) as e:
            return {
                "name": name,
                "status": STATUS_FAILED,
                "reason": str(e),
                "config": launch.config,
            }
        progress(
            f"killdrill: {name} on {LOOPBACK}:{port}, {plan.clients} clients, "
            f"{plan.users} users, {plan.duration:g}s, a backend killed every "
            f"{plan.period:g}s and started {plan.down:g}s later"
        )
        drill = Drill(port, plan, fleet, progress)
        run_loop(drill.run())
        counters = proxy_counters(name, launch, extra_port)
    t = drill.tally
    progress(
        f"killdrill: {name}: {t.answered:,} answered 200, {t.failed:,} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in t.reasons.most_common(3))})" if t.failed else "")
    )
    return {
        "name": name,
        "status": STATUS_OK,
        "answered": t.answered,
        "failed": t.failed,
        "gets_per_s": t.answered / plan.duration,
        "failure_reasons": dict(t.reasons),
        "served_by": dict(t.served_by),
        "latency_ms": stats.latency_ms(t.latencies),
        "failure_samples": [
            {"at": at, "reason": reason, "after_kill": last_kill_before(at, drill.events)}
            for at, reason in t.samples
        ],
        "timeline": {
            "answered": t.answered_per_second,
            "failed": t.failed_per_second,
            "served": t.served_per_second,
        },
        "events": drill.events,
        "proxy_counters": counters,
        "config": launch.config,
    }


def run(
    plan: Plan, has_tool: Callable[[str], bool], progress: Callable[[str], None]
) -> dict[str, Any]:
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-killdrill-") as tmp,
        contextlib.ExitStack() as exits,
    ):
        workdir = Path(tmp)
        fleet = Fleet(workdir, exits, free_ports(len(BACKEND_IDS)))
        for name in plan.targets:
            tool = TOOLS[name]
            if tool is not None and not has_tool(tool):
                progress(f"killdrill: skipping {name}: not installed")
                results.append(
                    {"name": name, "status": STATUS_SKIPPED, "reason": f"{tool} is not installed"}
                )
                continue
            fleet.all_up()
            results.append(run_target(name, workdir, fleet, plan, progress))
    return {
        "benchmark": "killdrill",
        "settings": {
            "clients": plan.clients,
            "users": plan.users,
            "duration_s": plan.duration,
            "period_s": plan.period,
            "down_s": plan.down,
            "first_kill_s": plan.first_kill,
            "backends": list(BACKEND_IDS),
            "smoke": plan.smoke,
            "request_timeout_s": REQUEST_TIMEOUT,
            "failure_samples_kept": FAILURE_SAMPLES,
            "health": {
                "interval_ms": DRILL_HEALTH_INTERVAL_MS,
                "fall": DRILL_HEALTH_FALL,
                "rise": DRILL_HEALTH_RISE,
            },
            "nginx": {
                "tries": DRILL_NGINX_TRIES,
                "max_fails": DRILL_NGINX_MAX_FAILS,
                "fail_timeout": DRILL_NGINX_FAIL_TIMEOUT,
                "keepalive": DRILL_UPSTREAM_KEEPALIVE,
            },
            "haproxy": {"retries": DRILL_HAPROXY_RETRIES},
        },
        "targets": results,
    }


def main() -> int:
    import shutil

    result = run(make_plan(smoke=True), lambda tool: shutil.which(tool) is not None, print)
    for t in result["targets"]:
        print({k: v for k, v in t.items() if k not in ("timeline", "config", "failure_samples")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
