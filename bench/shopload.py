"""Sticky vs stateless, measured: the example shop with the context library behind stickyproxy
(hash on the user) vs the same shop in ``--stateless`` mode behind stickyproxy spreading
requests round-robin (its only key source is a header no client sends). Three instances each,
one private redis-server, the same request mix, interleaved rounds.

Redis cost per request, three ways:
- round trips: writes of a command or pipeline by the apps, each waited on (counted in the app
  processes, bench/shopapp.py);
- commands sent: commands in those writes (an EVALSHA is one);
- commands executed: Redis's INFO commandstats, which also counts the commands a Lua script
  runs inside the server (an EVALSHA running HMGET, HSET and PEXPIRE counts 4).
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import stats
from .httpclient import Request, closed_loop, run_loop
from .procs import LOOPBACK, Server, free_ports
from .shopstack import (
    COUNTS_PATH,
    STICKY_KEY_HEADER,
    ShopApp,
    acquisitions,
    command_calls,
    get_json,
    proxy_config,
    redis_client,
    scrape,
    shop_requests,
    start_proxy,
    start_redis,
    start_shops,
)
from .wrk import LUA_DIR, SEED, run_script

STICKY, STATELESS = "sticky", "stateless"
MODES = (STICKY, STATELESS)
INSTANCES = ("app-1", "app-2", "app-3")
ITEMS = ("apple", "bread", "coffee", "milk", "tea")


@dataclass(frozen=True)
class Action:
    name: str
    method: str
    path: str
    writes: bool

    def request(self, user: str, rng: random.Random) -> Request:
        body = (
            f'{{"item": "{rng.choice(ITEMS)}", "qty": 1}}'.encode()
            if self.path == "/cart/items"
            else b""
        )
        return Request(self.method, self.path, user, body, self.name)


# In the order bench/lua/shop.lua takes their weights.
ACTIONS = (
    Action("read cart", "GET", "/cart", False),
    Action("add item", "POST", "/cart/items", True),
    Action("read counter", "GET", "/counter", False),
    Action("increment", "POST", "/counter", True),
)
MIX = (50, 10, 30, 10)
SHOP_ROUTES = tuple(dict.fromkeys(a.path for a in ACTIONS))
SHOP_SCRIPT = LUA_DIR / "shop.lua"
USERS, SMOKE_USERS = 10_000, 200
DURATION, SMOKE_DURATION = 10.0, 1.0
ACTION_DURATION, SMOKE_ACTION_DURATION = 3.0, 1.0
WARMUP, SMOKE_WARMUP = 3.0, 0.0
ROUNDS, SMOKE_ROUNDS = 3, 1
CONNECTIONS = 32
PROBE_USERS = 20
TARGET_REDUCTION = 0.95
WRITE_SHARES = (0.05, 0.10, 0.20, 0.30, 0.50)
# Commands of the benchmark's own Redis connection, which reads INFO between runs.
BENCH_OWN_COMMANDS = ("INFO",)


@dataclass(frozen=True)
class ShopPlan:
    users: int
    duration: float
    action_duration: float
    warmup: float
    rounds: int
    connections: int
    use_wrk: bool
    smoke: bool


def make_plan(smoke: bool, use_wrk: bool) -> ShopPlan:
    return ShopPlan(
        users=SMOKE_USERS if smoke else USERS,
        duration=SMOKE_DURATION if smoke else DURATION,
        action_duration=SMOKE_ACTION_DURATION if smoke else ACTION_DURATION,
        warmup=SMOKE_WARMUP if smoke else WARMUP,
        rounds=SMOKE_ROUNDS if smoke else ROUNDS,
        connections=CONNECTIONS,
        use_wrk=use_wrk,
        smoke=smoke,
    )


@dataclass
class Stack:
    mode: str
    apps: list[ShopApp]
    port: int
    proxy: Server


class ShopBenchError(Exception):
    """The stack answered wrongly before any load."""


def start_stack(mode: str, workdir: Path, stack: contextlib.ExitStack, redis_url: str) -> Stack:
    apps = start_shops(
        workdir,
        stack,
        [f"{mode}-{i}" for i in INSTANCES],
        redis_url,
        stateless=mode == STATELESS,
        counted=True,
    )
    (port,) = free_ports(1)
    config = proxy_config(port, apps, sticky=mode == STICKY)
    proxy = start_proxy(workdir, stack, f"proxy-{mode}", config, [port])
    return Stack(mode, apps, port, proxy)


def _served_by(port: int, user: str) -> str:
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{port}/counter", headers={STICKY_KEY_HEADER: user}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers.get("X-Served-By", "")


def probe(stack: Stack) -> None:
    """Sticky: every user always on one instance, users over several. Stateless: one user's
    requests over every instance."""
    if stack.mode == STICKY:
        placement = {}
        for user in (f"probe-{i}" for i in range(PROBE_USERS)):
            seen = {_served_by(stack.port, user) for _ in range(2)}
            if len(seen) != 1:
                raise ShopBenchError(f"sticky: user {user} served by {sorted(seen)}")
            placement[user] = seen.pop()
        if len(set(placement.values())) < 2:
            raise ShopBenchError("sticky: every probe user on one instance")
    else:
        seen = {_served_by(stack.port, "probe-rr") for _ in range(len(stack.apps) * 2)}
        if len(seen) != len(stack.apps):
            raise ShopBenchError(f"stateless: one user served by only {sorted(seen)}")


def touch_every_user(stack: Stack, users: int, connections: int) -> int:
    """One read per user, so the measured rounds start in steady state."""
    rng = random.Random(SEED)
    requests = (ACTIONS[0].request(f"user-{i}", rng) for i in range(1, users + 1))
    outcomes = run_loop(closed_loop(stack.port, requests, connections=connections))
    return sum(not o.ok for o in outcomes)


def _python_load(
    port: int, duration: float, connections: int, users: int, weights: Sequence[int]
) -> dict[str, Any]:
    rng = random.Random(SEED)

    def requests():
        while True:
            action = rng.choices(ACTIONS, weights=weights)[0]
            yield action.request(f"user-{rng.randint(1, users)}", rng)

    outcomes = run_loop(closed_loop(port, requests(), connections=connections, duration=duration))
    latency = stats.latency_ms(o.latency for o in outcomes)
    span = max(o.done for o in outcomes) - min(o.issued for o in outcomes)
    return {
        "tool": "python closed loop",
        "requests": len(outcomes),
        "rps": len(outcomes) / span,
        "p50_ms": latency["p50"],
        "p99_ms": latency["p99"],
        "non_2xx": sum(1 for o in outcomes if o.status and not o.ok),
        "socket_errors": sum(1 for o in outcomes if o.error),
    }


def load(stack: Stack, plan: ShopPlan, duration: float, weights: Sequence[int]) -> dict[str, Any]:
    if not plan.use_wrk:
        return _python_load(stack.port, duration, plan.connections, plan.users, weights)
    result = run_script(
        stack.port,
        duration,
        plan.connections,
        SHOP_SCRIPT,
        [str(plan.users), str(SEED), *map(str, weights)],
    )
    return {
        "tool": "wrk",
        "requests": result.requests,
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "non_2xx": result.non_2xx,
        "socket_errors": result.socket_errors,
    }


def _add(total: dict[str, float], more: dict[str, float]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value


def snapshot(stack: Stack, redis: Any) -> dict[str, Any]:
    """What the stack's instances have answered and sent to Redis so far, and what Redis
    has executed (for every client)."""
    by_command: dict[str, float] = {}
    reasons: dict[str, float] = {}
    round_trips = requests = 0.0
    for app in stack.apps:
        tally = get_json(app.url + COUNTS_PATH)
        round_trips += tally["round_trips"]
        _add(by_command, tally["by_command"])
        metrics = scrape(app)
        requests += shop_requests(metrics, SHOP_ROUTES)
        _add(reasons, acquisitions(metrics))
    return {
        "requests": requests,
        "round_trips": round_trips,
        "client": by_command,
        "server": command_calls(redis),
        "acquisitions": reasons,
    }


def _delta(
    after: dict[str, float], before: dict[str, float], skip: Sequence[str] = ()
) -> dict[str, float]:
    out = {k: v - before.get(k, 0) for k, v in after.items() if k not in skip}
    return {k: v for k, v in out.items() if v}


def redis_cost(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Redis work per request the instances answered between two snapshots."""
    client = _delta(after["client"], before["client"])
    server = _delta(after["server"], before["server"], BENCH_OWN_COMMANDS)
    round_trips = after["round_trips"] - before["round_trips"]
    requests = after["requests"] - before["requests"]
    per = 1 / requests if requests else 0.0
    return {
        "requests_answered": requests,
        "round_trips": round_trips,
        "commands_sent": sum(client.values()),
        "commands_executed": sum(server.values()),
        "round_trips_per_request": round_trips * per,
        "commands_sent_per_request": sum(client.values()) * per,
        "commands_executed_per_request": sum(server.values()) * per,
        "client_by_command": client,
        "server_by_command": server,
        "acquisitions": _delta(after["acquisitions"], before["acquisitions"]),
    }


def measured_run(
    stack: Stack, plan: ShopPlan, redis: Any, duration: float, weights: Sequence[int]
) -> dict[str, Any]:
    before = snapshot(stack, redis)
    figures = load(stack, plan, duration, weights)
    after = snapshot(stack, redis)
    return {**figures, "redis": redis_cost(before, after)}


def _describe(run: dict[str, Any]) -> str:
    r = run["redis"]
    text = (
        f"{run['rps']:,.0f} req/s, p99 {run['p99_ms']:.2f} ms, "
        f"{r['round_trips_per_request']:.3f} round trips/req, "
        f"{r['commands_executed_per_request']:.3f} commands executed/req"
    )
    if run["non_2xx"] or run["socket_errors"]:
        text += f", {run['non_2xx']} non-2xx, {run['socket_errors']} socket errors"
    return text


def run(plan: ShopPlan, progress: Callable[[str], None]) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-shop-") as tmp,
        contextlib.ExitStack() as exits,
    ):
        workdir = Path(tmp)
        redis_url = start_redis(workdir, exits)
        redis = exits.enter_context(contextlib.closing(redis_client(redis_url)))
        progress(f"redis-server at {redis_url}")
        stacks = {mode: start_stack(mode, workdir, exits, redis_url) for mode in MODES}
        for stack in stacks.values():
            probe(stack)
            progress(
                f"{stack.mode}: proxy on {LOOPBACK}:{stack.port}, instances on "
                + ", ".join(str(a.port) for a in stack.apps)
            )
        for stack in stacks.values():
            failed = touch_every_user(stack, plan.users, plan.connections)
            progress(f"{stack.mode}: touched {plan.users:,} users ({failed} failed)")
            if plan.warmup:
                load(stack, plan, plan.warmup, MIX)
        mixed: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for round_no in range(1, plan.rounds + 1):
            for mode in MODES:
                result = measured_run(stacks[mode], plan, redis, plan.duration, MIX)
                mixed[mode].append({"round": round_no, **result})
                progress(f"round {round_no}/{plan.rounds} {mode} ... {_describe(result)}")
        per_action: dict[str, dict[str, dict[str, Any]]] = {mode: {} for mode in MODES}
        for i, action in enumerate(ACTIONS):
            only = [0] * len(ACTIONS)
            only[i] = 1
            for mode in MODES:
                result = measured_run(stacks[mode], plan, redis, plan.action_duration, only)
                per_action[mode][action.name] = result
                progress(f"only '{action.name}' {mode} ... {_describe(result)}")
    return {
        "benchmark": "shop",
        "settings": _settings(plan),
        "modes": {mode: summarize(mixed[mode]) for mode in MODES},
        "runs": mixed,
        "per_action": per_action,
        "comparison": compare(mixed),
        "write_share_sweep": sweep(per_action),
    }


def _settings(plan: ShopPlan) -> dict[str, Any]:
    return {
        "users": plan.users,
        "duration_s": plan.duration,
        "rounds": plan.rounds,
        "warmup_s": plan.warmup,
        "connections": plan.connections,
        "action_duration_s": plan.action_duration,
        "smoke": plan.smoke,
        "load_tool": "wrk -t1" if plan.use_wrk else "python closed loop",
        "instances": len(INSTANCES),
        "mix": {a.name: w for a, w in zip(ACTIONS, MIX)},
        "write_share": sum(w for a, w in zip(ACTIONS, MIX) if a.writes) / sum(MIX),
        "proxy": {
            STICKY: f"stickyproxy, key from {STICKY_KEY_HEADER}, consistent hash",
            STATELESS: "stickyproxy, no key source matches, no_key = round-robin",
        },
    }


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        return stats.median(r[key] for r in runs)

    def med_redis(key: str) -> float | None:
        return stats.median(r["redis"][key] for r in runs)

    return {
        "rps": med("rps"),
        "rps_rounds": [r["rps"] for r in runs],
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "round_trips_per_request": med_redis("round_trips_per_request"),
        "commands_sent_per_request": med_redis("commands_sent_per_request"),
        "commands_executed_per_request": med_redis("commands_executed_per_request"),
        "non_2xx": sum(r["non_2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "acquisitions": sum(sum(r["redis"]["acquisitions"].values()) for r in runs),
    }


def _reduction(sticky: float | None, stateless: float | None) -> float | None:
    return None if sticky is None or not stateless else 1 - sticky / stateless


def compare(mixed: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per round (the two modes ran back to back), then the median over rounds."""
    pairs = list(zip(mixed[STICKY], mixed[STATELESS]))

    def per_round(fn: Callable[[dict[str, Any], dict[str, Any]], float | None]) -> dict[str, Any]:
        values = [fn(a, b) for a, b in pairs]
        return {"median": stats.median(values), "rounds": values}

    def fewer(key: str) -> dict[str, Any]:
        return per_round(lambda a, b: _reduction(a["redis"][key], b["redis"][key]))

    return {
        "fewer_round_trips": fewer("round_trips_per_request"),
        "fewer_commands_sent": fewer("commands_sent_per_request"),
        "fewer_commands_executed": fewer("commands_executed_per_request"),
        "throughput_ratio": per_round(lambda a, b: stats.ratio(a["rps"], b["rps"])),
        "p99_ratio": per_round(lambda a, b: stats.ratio(a["p99_ms"], b["p99_ms"])),
        "judged_on": "fewer_round_trips",
        "target": TARGET_REDUCTION,
    }


def _mix_cost(per_action: dict[str, dict[str, Any]], key: str, write_share: float) -> float:
    """Cost per request of the mix's reads and writes, reweighted to `write_share`."""
    reads = [(a, w) for a, w in zip(ACTIONS, MIX) if not a.writes]
    writes = [(a, w) for a, w in zip(ACTIONS, MIX) if a.writes]

    def average(group: list[tuple[Action, int]]) -> float:
        total = sum(w for _, w in group)
        return sum(per_action[a.name]["redis"][key] * w for a, w in group) / total

    return (1 - write_share) * average(reads) + write_share * average(writes)


def sweep(per_action: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Fewer round trips and commands executed, per share of requests that change state,
    from the single-action runs."""
    out = []
    for share in WRITE_SHARES:
        row: dict[str, Any] = {"write_share": share}
        for key in ("round_trips_per_request", "commands_executed_per_request"):
            sticky = _mix_cost(per_action[STICKY], key, share)
            stateless = _mix_cost(per_action[STATELESS], key, share)
            row[key] = {
                STICKY: sticky,
                STATELESS: stateless,
                "fewer": _reduction(sticky, stateless),
            }
        out.append(row)
    return out


def main() -> int:
    from .procs import missing_tools

    result = run(make_plan(smoke=True, use_wrk=not missing_tools(["wrk"])), print)
    print(result["comparison"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
