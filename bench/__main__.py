"""Every benchmark of stickyproxy, then docs/benchmarks.md from their results.

    python -m bench [--smoke] [--install] [--only NAMES] [--report-only]

Benchmarks, in the order they run: ring, dataplane, streams, shop, failover, killdrill,
owners, profile, skew, tls, grpc. Raw results go to bench/results/NAME.json, the report to docs/benchmarks.md
with its charts in docs/benchmarks/. ``--smoke`` runs each with tiny counts (about two minutes) to check
the harness works, writes under bench/results/smoke/ and leaves docs/ alone; where nginx,
haproxy, wrk or py-spy are missing it skips what needs them (or uses the Python load client)
and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import console, document, report
from .console import progress
from .procs import ensure_installed, missing_tools, tool_version
from .targets import REPO_ROOT, default_kinds, stickyproxy_version

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_DIR = RESULTS_DIR / "smoke"
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
IMAGES_DIR = REPO_ROOT / "docs" / "benchmarks"
META_NAME = "suite"
SCENARIOS = (
    "ring",
    "dataplane",
    "streams",
    "shop",
    "failover",
    "killdrill",
    "owners",
    "profile",
    "skew",
    "tls",
    "grpc",
)
PROXY_TOOLS = ("nginx", "haproxy", "wrk")
DRILL_TOOLS = ("nginx", "haproxy")
REDIS_TOOL = "redis-server"
FULL_WORKERS, SMOKE_WORKERS = (1, 2), (1,)
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
VERSION = re.compile(r"\d+\.\d+(\.\d+)?")


@dataclass
class Settings:
    smoke: bool
    scenarios: tuple[str, ...]
    results_dir: Path
    doc_path: Path
    images_dir: Path
    missing: set[str] = field(default_factory=set)

    def has(self, tool: str) -> bool:
        return tool not in self.missing


class SkipScenario(Exception):
    """A benchmark cannot run on this machine (a tool is missing); the message says why."""


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_on_signal(signum: int, _frame: Any) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {', '.join(unknown) or '(none)'}; known: {', '.join(SCENARIOS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny counts, about two minutes: checks the harness, never the speed; "
        "writes under bench/results/smoke/, not docs/",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="apt-get install what is missing of nginx, haproxy, wrk, redis-server",
    )
    p.add_argument(
        "--only",
        type=_names,
        default=SCENARIOS,
        help=f"comma-separated, from {','.join(SCENARIOS)} (default all)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the report from the JSON results already there",
    )
    return p


def required_tools(scenarios: Sequence[str]) -> list[str]:
    tools: list[str] = []
    if {"dataplane", "streams", "profile"} & set(scenarios):
        tools += PROXY_TOOLS
    if "killdrill" in scenarios:
        tools += DRILL_TOOLS
    if {"shop", "failover", "owners"} & set(scenarios):
        tools.append(REDIS_TOOL)
    if {"owners", "skew"} & set(scenarios):
        tools.append("wrk")
    if "tls" in scenarios:
        tools += ["nginx", "wrk", "openssl"]
    if "grpc" in scenarios:
        tools.append("nginx")  # and h2load (nghttp2-client) and grpcio, checked by bench/grpc.py
    return list(dict.fromkeys(tools))


def check_tools(settings: Settings, install: bool) -> bool:
    needed = required_tools(settings.scenarios)
    if install:
        ensure_installed(needed, install=True)
    settings.missing = set(missing_tools(needed))
    if not settings.missing:
        return True
    if settings.smoke:
        progress(
            f"not on this machine: {', '.join(sorted(settings.missing))}; "
            "smoke mode skips what needs them"
        )
        return True
    return ensure_installed(needed, install=False)


# -- the benchmarks ------------------------------------------------------------------------


def run_ring(s: Settings) -> dict[str, Any]:
    from . import ringbench

    return ringbench.run(s.smoke, progress)


def _proxy_kinds(s: Settings) -> tuple:
    wanted = default_kinds()
    kinds = tuple(k for k in wanted if k.tool is None or s.has(k.tool))
    skipped = [k.name for k in wanted if k not in kinds]
    if skipped:
        progress(f"skipping {', '.join(skipped)}: not installed")
    return kinds


def run_dataplane(s: Settings) -> dict[str, Any]:
    from . import dataplane

    backends = dataplane.NGINX_BACKENDS if s.has("nginx") else dataplane.PYTHON_BACKENDS
    if not s.has("wrk"):
        progress("wrk is not installed: no saturation runs, the half-load runs use a fixed rate")
    plan = dataplane.Plan(
        duration=dataplane.SMOKE_DURATION if s.smoke else dataplane.DEFAULT_DURATION,
        warmup=0.0 if s.smoke else dataplane.WARMUP_SECONDS,
        connections=dataplane.DEFAULT_CONNECTIONS,
        rounds=dataplane.SMOKE_ROUNDS if s.smoke else dataplane.DEFAULT_ROUNDS,
        users=dataplane.DEFAULT_USERS,
        workers=SMOKE_WORKERS if s.smoke else FULL_WORKERS,
        kinds=_proxy_kinds(s),
        smoke=s.smoke,
        use_wrk=s.has("wrk"),
        backends=backends,
        half_load=True,
        half_load_duration=(
            dataplane.SMOKE_HALF_LOAD_DURATION if s.smoke else dataplane.HALF_LOAD_DURATION
        ),
        half_load_rounds=dataplane.SMOKE_ROUNDS if s.smoke else dataplane.HALF_LOAD_ROUNDS,
    )
    result = dataplane.run(plan)
    if result["targets"] and any(t.get("summary") for t in result["targets"]):
        print(report.render_table(result["targets"]), flush=True)
    failed = [t for t in result["targets"] if t["status"] == dataplane.STATUS_FAILED]
    if failed:
        raise RuntimeError("; ".join(f"{t['label']}: {t['reason']}" for t in failed))
    return result


def run_streams(s: Settings) -> dict[str, Any]:
    from . import streams

    plan = streams.make_plan(_proxy_kinds(s), 1 if s.smoke else 3, s.smoke)
    result = streams.run(plan, progress)
    if result["failures"]:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in result["failures"].items()))
    return result


def _need_redis(s: Settings) -> None:
    if not s.has(REDIS_TOOL):
        raise SkipScenario(f"{REDIS_TOOL} is not installed (apt-get install redis-server)")


def run_shop(s: Settings) -> dict[str, Any]:
    from . import shopload

    _need_redis(s)
    if not s.has("wrk"):
        progress("wrk is not installed: the shop load comes from the Python closed-loop client")
    return shopload.run(shopload.make_plan(s.smoke, use_wrk=s.has("wrk")), progress)


def run_failover(s: Settings) -> dict[str, Any]:
    from . import failover

    _need_redis(s)
    return failover.run(failover.make_plan(s.smoke), progress)


def run_killdrill(s: Settings) -> dict[str, Any]:
    from . import killdrill

    result = killdrill.run(killdrill.make_plan(s.smoke), s.has, progress)
    failed = [t for t in result["targets"] if t["status"] == killdrill.STATUS_FAILED]
    if failed:
        raise RuntimeError("; ".join(f"{t['name']}: {t['reason']}" for t in failed))
    return result


def run_owners(s: Settings) -> dict[str, Any]:
    from . import owner_features

    _need_redis(s)
    if not s.has("wrk"):
        raise SkipScenario("wrk is not installed (apt-get install wrk)")
    return owner_features.run_suite(owner_features.make_plan(s.smoke), progress)


def run_profile(s: Settings) -> dict[str, Any]:
    from . import profiling

    return profiling.run(s.smoke, s.has("wrk"), progress)


RUNNERS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "ring": run_ring,
    "dataplane": run_dataplane,
    "streams": run_streams,
    "shop": run_shop,
    "failover": run_failover,
    "killdrill": run_killdrill,
    "owners": run_owners,
    "profile": run_profile,
    "skew": lambda s: __import__("bench.skew").skew.run_suite(s),
    "tls": lambda s: __import__("bench.tls").tls.run_suite(s, SkipScenario),
    "grpc": lambda s: __import__("bench.grpc").grpc.run_suite(s, SkipScenario),
}


# -- results and report --------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in SCENARIOS:
        path = results_dir / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def draw(results: dict[str, dict[str, Any]], images_dir: Path) -> dict[str, Path | None]:
    charts: dict[str, Path | None] = {}
    try:
        from . import plots
    except ImportError as e:
        progress(f"no charts: {e} (pip install -e '.[bench]')")
        return charts
    if "dataplane" in results:
        charts["dataplane"] = plots.dataplane(images_dir / "dataplane.png", results["dataplane"])
        charts["half_load"] = plots.half_load(images_dir / "half-load.png", results["dataplane"])
    if "streams" in results:
        charts["streams"] = plots.streams(images_dir / "streams.png", results["streams"])
    if "shop" in results:
        charts["shop"] = plots.shop(images_dir / "shop.png", results["shop"])
        charts["shop_sweep"] = plots.shop_sweep(
            images_dir / "shop-write-share.png", results["shop"]
        )
    if "failover" in results:
        charts["failover"] = plots.failover(images_dir / "failover.png", results["failover"])
    if "ring" in results:
        charts["ring"] = plots.ring(images_dir / "ring.png", results["ring"])
    if "killdrill" in results:
        charts["killdrill"] = plots.killdrill(images_dir / "killdrill.png", results["killdrill"])
    if "owners" in results:
        charts["owners"] = plots.owners(images_dir / "owners.png", results["owners"])
    return charts


def write_report(settings: Settings, meta: dict[str, Any]) -> None:
    results = load_results(settings.results_dir)
    charts = draw(results, settings.images_dir)
    text = document.render(results, charts, settings.doc_path, meta)
    if settings.doc_path.exists():
        text = document.carry_over(text, settings.doc_path.read_text(), results)
    settings.doc_path.parent.mkdir(parents=True, exist_ok=True)
    settings.doc_path.write_text(text)
    progress(f"report: {settings.doc_path} ({len(charts)} charts in {settings.images_dir})")


def tool_versions() -> dict[str, str]:
    versions = {"stickyproxy": stickyproxy_version(), "python": platform.python_version()}
    for name, argv in (
        ("nginx", ["nginx", "-v"]),
        ("haproxy", ["haproxy", "-v"]),
        ("wrk", ["wrk", "-v"]),
        ("redis", ["redis-server", "--version"]),
    ):
        found = VERSION.search(tool_version(argv))
        versions[name] = found.group(0) if found else "not installed"
    return versions


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def run_all(
    settings: Settings, argv: Sequence[str], previous: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Run the chosen benchmarks; the returned metadata keeps `previous` entries of the
    benchmarks not run this time (their results are still in the report)."""
    meta = {
        "command": "python -m bench" + "".join(" " + shlex.quote(a) for a in argv),
        "started_at": _now(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(terse=True),
        "loadavg_before": os.getloadavg(),
        "tools": tool_versions(),
        "smoke": settings.smoke,
        "scenarios": {
            k: v for k, v in previous.get("scenarios", {}).items() if k not in settings.scenarios
        },
    }
    failed = []
    for name in settings.scenarios:
        started = time.monotonic()
        progress(f"== {name} ==")
        timing = {"started_at": _now(), "loadavg_at_start": os.getloadavg()}
        try:
            result = RUNNERS[name](settings)
        except SkipScenario as e:
            progress(f"{name}: skipped: {e}")
            meta["scenarios"][name] = {"status": "skipped", "reason": str(e), **timing}
            continue
        except Interrupted:
            raise
        except Exception as e:
            traceback.print_exc()
            progress(f"{name}: FAILED: {type(e).__name__}: {e}")
            meta["scenarios"][name] = {
                "status": "failed",
                "reason": f"{type(e).__name__}: {e}",
                **timing,
            }
            failed.append(name)
            continue
        seconds = time.monotonic() - started
        write_json(settings.results_dir / f"{name}.json", result)
        meta["scenarios"][name] = {"status": "ok", "seconds": round(seconds, 1), **timing}
        progress(f"{name}: done in {seconds:.0f}s")
    meta["duration_s"] = console.elapsed()
    return meta, failed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out_dir = SMOKE_DIR if args.smoke else RESULTS_DIR
    settings = Settings(
        smoke=args.smoke,
        scenarios=args.only,
        results_dir=out_dir,
        doc_path=SMOKE_DIR / "benchmarks.md" if args.smoke else DOC_PATH,
        images_dir=SMOKE_DIR / "benchmarks" if args.smoke else IMAGES_DIR,
    )
    meta_path = out_dir / f"{META_NAME}.json"
    if args.report_only:
        if not meta_path.exists():
            print(f"no results in {out_dir}; run python -m bench first", file=sys.stderr)
            return EXIT_USAGE
        write_report(settings, json.loads(meta_path.read_text()))
        return EXIT_OK
    console.restart_clock()
    if not check_tools(settings, args.install):
        return EXIT_USAGE
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_on_signal)
    try:
        previous = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta, failed = run_all(settings, argv, previous)
    except Interrupted as e:
        print(
            f"\nstopped by {e}; every process the benchmark started has been stopped",
            file=sys.stderr,
        )
        return 128 + e.signum
    write_json(meta_path, meta)
    write_report(settings, meta)
    progress(
        f"finished in {meta['duration_s'] / 60:.1f} min"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return EXIT_FAIL if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
