"""Data-plane benchmark: stickyproxy, NGINX and HAProxy over the same three backends.

    python -m bench.dataplane [--smoke] [--targets nginx,haproxy,stickyproxy] [--plot]

See bench/README.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import halfload, placement, report
from .backend import backend_argv
from .console import progress
from .cpu import CpuMeter, per_request_us
from .probe import ProbeError, check_sticky_routing
from .procs import (
    LOOPBACK,
    Server,
    StartError,
    ensure_installed,
    free_ports,
    start_server,
    tool_version,
)
from .targets import (
    BACKEND_IDS,
    BASELINE,
    BODY,
    INTERPRETED,
    TARGET_KINDS,
    TargetKind,
    backends_launch,
    default_kinds,
    python_env,
    stickyproxy_version,
)
from .wrk import THREADS, WrkError, run_wrk

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_OUTPUT = RESULTS_DIR / "dataplane.json"
DEFAULT_DURATION = 10.0
DEFAULT_CONNECTIONS = 32
DEFAULT_ROUNDS = 3
DEFAULT_USERS = 10_000
DEFAULT_WORKERS = (1,)
WARMUP_SECONDS = 3.0
SMOKE_DURATION = 1.0
SMOKE_ROUNDS = 1
HALF_LOAD_DURATION = 3.0
SMOKE_HALF_LOAD_DURATION = 0.5
HALF_LOAD_ROUNDS = 5
# The fixed rate of the half-load runs when no saturation figure was measured (no wrk).
FALLBACK_HALF_LOAD_RATE = 500.0
REFERENCE_TARGET = "stickyproxy"
NGINX_BACKENDS, PYTHON_BACKENDS = "nginx", "python"

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STATUS_OK, STATUS_SKIPPED, STATUS_FAILED = report.STATUS_OK, "skipped", "failed"


@dataclass(frozen=True)
class Plan:
    duration: float
    warmup: float
    connections: int
    rounds: int
    users: int
    workers: tuple[int, ...]
    kinds: tuple[TargetKind, ...]
    smoke: bool
    use_wrk: bool = True
    backends: str = NGINX_BACKENDS
    half_load: bool = False
    half_load_duration: float = HALF_LOAD_DURATION
    half_load_rounds: int = HALF_LOAD_ROUNDS


@dataclass
class Target:
    kind: TargetKind
    workers: int
    label: str
    port: int = 0
    server: Server | None = None
    config: str = ""
    command: list[str] = field(default_factory=list)
    status: str = STATUS_OK
    reason: str = ""
    warmup: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status == STATUS_OK

    def give_up(self, reason: str) -> None:
        self.status = STATUS_SKIPPED if self.kind.optional else STATUS_FAILED
        self.reason = reason
        if self.server is not None:
            self.server.stop()


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("each worker count must be at least 1")
    return values


def _target_names(text: str) -> tuple[TargetKind, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGET_KINDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or '(none)'}; known: {', '.join(TARGET_KINDS)}"
        )
    return tuple(TARGET_KINDS[n] for n in dict.fromkeys(names))


def _positive(kind: type):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.dataplane", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--duration",
        type=_positive(float),
        default=DEFAULT_DURATION,
        help=f"seconds per measured run (default {DEFAULT_DURATION:g})",
    )
    p.add_argument(
        "--connections",
        type=_positive(int),
        default=DEFAULT_CONNECTIONS,
        help=f"wrk connections (default {DEFAULT_CONNECTIONS})",
    )
    p.add_argument(
        "--rounds",
        type=_positive(int),
        default=DEFAULT_ROUNDS,
        help=f"interleaved rounds over all targets (default {DEFAULT_ROUNDS})",
    )
    p.add_argument(
        "--users",
        type=_positive(int),
        default=DEFAULT_USERS,
        help=f"distinct X-User-Id values drawn at random (default {DEFAULT_USERS:,})",
    )
    p.add_argument(
        "--targets",
        type=_target_names,
        default=default_kinds(),
        help=f"comma-separated, from {','.join(TARGET_KINDS)} (default all; "
        f"{INTERPRETED} only when the installed build is compiled)",
    )
    p.add_argument(
        "--workers",
        type=_csv_ints,
        default=DEFAULT_WORKERS,
        help="worker processes (threads for HAProxy) of every proxy; "
        "a list such as 1,2 runs each target at each count (default 1)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"check the harness: {SMOKE_DURATION:g}s runs, {SMOKE_ROUNDS} round, no warm-up",
    )
    p.add_argument(
        "--half-load",
        action="store_true",
        help="also measure p99 at half of stickyproxy's saturation rate, through "
        "each proxy and straight to a backend",
    )
    p.add_argument("--plot", action="store_true", help="also write a PNG chart beside the JSON")
    p.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="where to write the JSON results (default bench/results/dataplane.json)",
    )
    p.add_argument(
        "--install", action="store_true", help="install missing nginx/haproxy/wrk with apt-get"
    )
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    duration = SMOKE_DURATION if args.smoke else args.duration
    return Plan(
        duration=duration,
        warmup=0.0 if args.smoke else min(WARMUP_SECONDS, duration),
        connections=args.connections,
        rounds=SMOKE_ROUNDS if args.smoke else args.rounds,
        users=args.users,
        workers=args.workers,
        kinds=args.targets,
        smoke=args.smoke,
        half_load=args.half_load,
        half_load_duration=SMOKE_HALF_LOAD_DURATION if args.smoke else HALF_LOAD_DURATION,
        half_load_rounds=SMOKE_ROUNDS if args.smoke else HALF_LOAD_ROUNDS,
    )


def required_tools(plan: Plan) -> list[str]:
    tools = (
        (["nginx"] if plan.backends == NGINX_BACKENDS else [])
        + (["wrk"] if plan.use_wrk else [])
        + [k.tool for k in plan.kinds if k.tool]
    )
    return list(dict.fromkeys(tools))


def make_targets(plan: Plan) -> list[Target]:
    many = len(plan.workers) > 1
    return [
        Target(kind, workers, f"{kind.name} w{workers}" if many else kind.name)
        for workers in plan.workers
        for kind in plan.kinds
    ]


def start_backends(
    workdir: Path, stack: contextlib.ExitStack, kind: str = NGINX_BACKENDS
) -> tuple[list[int], str, Server]:
    ports = free_ports(len(BACKEND_IDS))
    if kind == NGINX_BACKENDS:
        launch = backends_launch(workdir, ports)
        launch.write()
        program, argv, config, env = launch.program, launch.argv, launch.config, None
    else:
        argv = backend_argv(ports)
        program, config, env = "python -m bench.backend", " ".join(argv), python_env()
    try:
        server = start_server("backends", argv, ports, workdir, stack, env)
    except StartError as e:
        raise StartError(f"backends ({program}) {e}") from None
    for backend_id, port in zip(BACKEND_IDS, ports):
        progress(f"backend {backend_id} on {LOOPBACK}:{port} ({program})")
    return ports, config, server


def start_target(
    target: Target, workdir: Path, backend_ports: Sequence[int], stack: contextlib.ExitStack
) -> None:
    (target.port,) = free_ports(1)
    launch = target.kind.render(workdir, target.port, backend_ports, target.workers)
    launch.write()
    target.config, target.command = launch.config, launch.argv
    name = target.label.replace(" ", "-")
    try:
        target.server = start_server(name, launch.argv, [target.port], workdir, stack, launch.env)
        placement = check_sticky_routing(target.port)
    except StartError as e:
        target.give_up(f"`{launch.program}` {e}")
    except ProbeError as e:
        target.give_up(f"routing check failed: {e}")
    else:
        used = len(set(placement.values()))
        progress(f"{target.label} on {LOOPBACK}:{target.port}, sticky over {used} backends")
        return
    progress(f"{target.label} {target.status}: {target.reason}")


def _describe(result: dict[str, Any]) -> str:
    text = (
        f"{result['rps']:,.0f} req/s (p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms)"
    )
    if result.get("cpu_us"):
        text += f", {result['cpu_us']:.1f} us CPU/request"
    if result["non_2xx"] or result["socket_errors"]:
        text += f", {result['non_2xx']:,} non-2xx, {result['socket_errors']:,} socket errors"
    return text


def measure(target: Target, plan: Plan, duration: float, step: str) -> dict[str, Any] | None:
    """One wrk run against `target`; None (and the target given up) if it cannot be measured."""
    if target.server is not None and not target.server.running:
        target.give_up(f"exited during the benchmark: {target.server.describe_exit()}")
        progress(f"{step} {target.label} ... {target.status}: {target.reason}")
        return None
    meter = CpuMeter(target.server.proc.pid if target.server is not None else None)
    meter.start()
    try:
        result = run_wrk(target.port, duration, plan.connections, plan.users).as_dict()
        used = meter.stop()
        result.update(
            per_request_us(used, result["requests"]),
            cpu_user_s=used.user_s,
            cpu_system_s=used.system_s,
        )
    except WrkError as e:
        target.give_up(str(e))
        progress(f"{step} {target.label} ... {target.status}: {e}")
        return None
    progress(f"{step} {target.label} ... {_describe(result)}")
    return result


def warm_up(targets: Sequence[Target], plan: Plan) -> None:
    for target in targets:
        if target.active:
            target.warmup = measure(target, plan, plan.warmup, f"warm-up ({plan.warmup:g}s)")


def run_rounds(targets: Sequence[Target], plan: Plan) -> None:
    for round_no in range(1, plan.rounds + 1):
        for target in targets:
            if not target.active:
                continue
            result = measure(target, plan, plan.duration, f"round {round_no}/{plan.rounds}")
            if result is not None:
                target.runs.append({"round": round_no, **result})


def target_results(targets: Sequence[Target]) -> list[dict[str, Any]]:
    summaries = {id(t): report.summarize(t.runs) for t in targets if t.active and t.runs}
    baselines = {t.workers: summaries.get(id(t)) for t in targets if t.kind.name == BASELINE}
    out = []
    for t in targets:
        summary = summaries.get(id(t))
        out.append(
            {
                "label": t.label,
                "name": t.kind.name,
                "workers": t.workers,
                "status": t.status,
                "reason": t.reason,
                "port": t.port,
                "command": t.command,
                "config": t.config,
                "warmup": t.warmup,
                "runs": t.runs,
                "summary": summary,
                "ratio_to_nginx": report.ratios(summary, baselines.get(t.workers))
                if summary
                else None,
            }
        )
    return out


def half_load_rate(targets: Sequence[Target], workers: int) -> tuple[float, str]:
    """Half of the reference target's median saturation rate at `workers`, and its basis."""
    measured = {t.kind.name: t for t in targets if t.workers == workers and t.active and t.runs}
    for name in (REFERENCE_TARGET, BASELINE):
        if name in measured:
            rps = report.summarize(measured[name].runs)["rps_median"]
            return (
                halfload.RATE_FRACTION * rps,
                f"{halfload.RATE_FRACTION:g} x {name} w{workers} median {rps:,.0f} req/s",
            )
    return FALLBACK_HALF_LOAD_RATE, "fixed rate (no saturation figure measured)"


def place(
    group: Sequence[Target], backends: Server, workers: int, cores: Sequence[int]
) -> placement.Placement | None:
    """Pin `group`'s proxies away from the load client and the backends when there are cores
    enough (bench/placement.py); None when they share every core."""
    where = placement.plan(cores, workers)
    load = where.load if where is not None else cores
    placement.pin_self(load)
    placement.pin([backends.proc.pid], load)
    if where is not None:
        placement.pin([t.server.proc.pid for t in group if t.server is not None], where.proxy)
    return where


def run_half_load(
    targets: Sequence[Target], plan: Plan, backend_port: int, backends: Server
) -> list[dict[str, Any]]:
    out = []
    cores = placement.available_cores()
    try:
        for workers in plan.workers:
            rate, basis = half_load_rate(targets, workers)
            group = [t for t in targets if t.workers == workers and t.active]
            endpoints = [halfload.Endpoint(halfload.DIRECT, backend_port)] + [
                halfload.Endpoint(t.label, t.port) for t in group
            ]
            plural = "" if workers == 1 else "s"
            where = place(group, backends, workers, cores) if cores else None
            cpus = (
                where.describe()
                if where is not None
                else (
                    f"not pinned: {workers} worker(s) and the load need more than {len(cores)} "
                    "CPUs, so the proxy shares its cores with the client"
                )
            )
            progress(f"half load, {workers} worker{plural}: {rate:,.0f} req/s ({basis}); {cpus}")
            result = halfload.run(
                endpoints,
                rate,
                plan.half_load_duration,
                plan.half_load_rounds,
                plan.users,
                progress,
            )
            out.append(
                {
                    "workers": workers,
                    "rate_basis": basis,
                    "placement": cpus,
                    "pinned": where is not None,
                    **result,
                }
            )
    finally:
        if cores:  # later benchmarks run in this process: give it every core back
            placement.pin_self(cores)
    return out


def tool_versions() -> dict[str, str]:
    return {
        "nginx": tool_version(["nginx", "-v"]),
        "haproxy": tool_version(["haproxy", "-v"]),
        "wrk": tool_version(["wrk", "-v"]),
        "stickyproxy": stickyproxy_version(),
        "python": platform.python_version(),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run(plan: Plan) -> dict[str, Any]:
    started = _now()
    meta = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_before": os.getloadavg(),
    }
    targets = make_targets(plan)
    with (
        tempfile.TemporaryDirectory(prefix="stickyproxy-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        backend_ports, backend_config, backends = start_backends(workdir, stack, plan.backends)
        for target in targets:
            start_target(target, workdir, backend_ports, stack)
        if plan.use_wrk:
            if plan.warmup:
                warm_up(targets, plan)
            run_rounds(targets, plan)
        half_load = (
            run_half_load(targets, plan, backend_ports[0], backends) if plan.half_load else []
        )
    return {
        "benchmark": "dataplane",
        "started_at": started,
        "finished_at": _now(),
        "machine": meta,
        "tools": tool_versions(),
        "settings": {
            "duration_s": plan.duration,
            "warmup_s": plan.warmup,
            "connections": plan.connections,
            "threads": THREADS,
            "rounds": plan.rounds,
            "users": plan.users,
            "workers": list(plan.workers),
            "smoke": plan.smoke,
            "targets": [k.name for k in plan.kinds],
            "wrk": plan.use_wrk,
            "half_load_duration_s": plan.half_load_duration,
            "half_load_rounds": plan.half_load_rounds,
        },
        "backends": {
            "ids": list(BACKEND_IDS),
            "ports": backend_ports,
            "body": BODY,
            "kind": plan.backends,
            "config": backend_config,
        },
        "targets": target_results(targets),
        "half_load": half_load,
    }


class Interrupted(Exception):
    """A signal asked the benchmark to stop."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_on_signal(signum: int, _frame: Any) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    if not ensure_installed(required_tools(plan), args.install):
        return EXIT_USAGE
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_on_signal)
    try:
        results = run(plan)
    except Interrupted as e:
        print(f"\nstopped by {e}; all servers stopped", file=sys.stderr)
        return 128 + e.signum
    except StartError as e:
        print(f"cannot start {e}", file=sys.stderr)
        return EXIT_FAIL

    print()
    print(report.render_table(results["targets"]))
    report.write_json(args.output, results)
    print(f"\nresults: {args.output}")
    if args.plot:
        chart = args.output.with_suffix(".png")
        title = (
            f"{plan.connections} connections, {plan.duration:g}s x {plan.rounds} "
            f"round{'s' if plan.rounds != 1 else ''}, "
            f"{plan.users:,} users, {os.cpu_count()} CPUs"
        )
        report.write_chart(chart, results["targets"], title)
        print(f"chart: {chart}")
    failed = [t for t in results["targets"] if t["status"] == STATUS_FAILED]
    return EXIT_FAIL if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
