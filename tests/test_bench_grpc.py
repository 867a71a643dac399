"""The gRPC / HTTP/2 benchmark (bench/grpc.py, `python -m bench --only grpc`): the message it
sends, the proxies' configurations (stickyproxy's accepted by its own loader, NGINX's by
`nginx -t`), the users it loads with, its ratios, its place in the suite; and, for real, that
a gRPC error answered as HTTP 200 is caught before and after load, and that the smoke run
fills every row without errors."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as suite
from bench import document
from bench import grpc as bench_grpc
from bench.procs import LOOPBACK, free_ports, start_server
from stickyproxy import config

needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx")
needs_load = pytest.mark.skipif(
    shutil.which("h2load") is None
    or shutil.which("nginx") is None
    or importlib.util.find_spec("grpc") is None,
    reason="needs h2load (nghttp2-client), nginx and grpcio",
)


def test_the_body_is_one_length_prefixed_grpc_message():
    assert bench_grpc.grpc_message(b"abc") == b"\x00\x00\x00\x00\x03abc"
    body = bench_grpc.grpc_message(bench_grpc.REQUEST_PAYLOAD)
    assert int.from_bytes(body[1:5], "big") == len(body) - 5 == len(bench_grpc.REQUEST_PAYLOAD)


def test_h2load_sends_grpc_unary_calls_as_one_user():
    plan = bench_grpc.make_plan(False)
    argv = bench_grpc.grpc_h2load_argv(8080, "u7", Path("/tmp/unary.bin"), 10.0, plan)
    assert argv[-1] == f"http://{LOOPBACK}:8080/bench.Echo/Unary"
    headers = [argv[i + 1] for i, a in enumerate(argv) if a == "-H"]
    assert headers == ["content-type: application/grpc", "te: trailers", "x-user-id: u7"]
    assert argv[argv.index("-d") + 1] == "/tmp/unary.bin"
    assert argv[argv.index("-m") + 1] == str(bench_grpc.GRPC_STREAMS)


@pytest.mark.parametrize(
    ("placement", "count", "expected"),
    [
        ({"u0": "b", "u1": "a", "u2": "a", "u3": "c"}, 3, ["u1", "u0", "u3"]),
        ({"u0": "b", "u1": "a", "u2": "a", "u3": "c"}, 4, ["u1", "u0", "u3", "u2"]),
        ({"u0": "a", "u1": "a"}, 3, ["u0", "u1"]),
    ],
)
def test_load_users_are_spread_over_the_backends(placement, count, expected):
    assert bench_grpc.pick_users(placement, count) == expected


def test_stickyproxy_speaks_h2_to_every_backend_and_its_loader_agrees(tmp_path: Path):
    launch = bench_grpc.stickyproxy_grpc_launch(tmp_path, 8080, [9001, 9002, 9003])
    assert launch.config.count('protocol = "h2"') == 3 and "h2c = true" in launch.config
    launch.write()
    cfg = config.load(launch.config_path)
    assert cfg.listen.h2c and [b.protocol for b in cfg.backends] == ["h2"] * 3
    assert str(launch.config_path) in launch.argv


def test_nginx_configurations(tmp_path: Path):
    grpc = bench_grpc.nginx_grpc_launch(tmp_path, 8080, [9001, 9002]).config
    assert f"listen {LOOPBACK}:8080 http2;" in grpc
    assert "hash $http_x_user_id consistent;" in grpc and "grpc_pass grpc://grpc_apps;" in grpc
    h2 = bench_grpc.nginx_h2_launch(tmp_path, 8081, [9001, 9002]).config
    assert f"listen {LOOPBACK}:8081 http2;" in h2 and "hash $arg_user consistent;" in h2
    assert "proxy_pass http://h2_apps;" in h2 and "proxy_http_version 1.1;" in h2
    assert "worker_processes 1;" in grpc and "worker_processes 1;" in h2


@needs_nginx
def test_nginx_t_accepts_both_configurations_and_names_what_it_refuses(tmp_path: Path):
    for launch in (
        bench_grpc.nginx_grpc_launch(tmp_path, 8080, [9001]),
        bench_grpc.nginx_h2_launch(tmp_path, 8081, [9001]),
    ):
        launch.write()
        assert bench_grpc.nginx_config_error(launch) is None
    # what a build without the grpc module says
    broken = bench_grpc.nginx_grpc_launch(tmp_path / "x", 8080, [9001])
    broken.config_path.write_text(broken.config.replace("grpc_pass", "grpc_passage"))
    assert 'unknown directive "grpc_passage"' in (bench_grpc.nginx_config_error(broken) or "")


def run(rnd: int, rate: float, cpu: float) -> dict[str, Any]:
    return {
        "round": rnd,
        "rate": rate,
        "count": int(rate),
        "failed": 0,
        "non_2xx": 0,
        "cpu_us": cpu,
    }


def test_ratios_are_stickyproxy_over_nginx_round_by_round():
    rows = {}
    for measure, target, rates, cpu in (
        ("grpc", "stickyproxy", [1000, 1200, 900], 700),
        ("grpc", "nginx", [4000, 4000, 3000], 70),
        ("h2", "stickyproxy", [3000, 3000, 3000], 300),
    ):
        runs = [run(i + 1, r, cpu) for i, r in enumerate(rates)]
        rows[f"{measure}/{target}"] = {
            "measure": measure,
            "target": target,
            "runs": runs,
            "summary": bench_grpc.summarize(runs),
        }
    (c,) = bench_grpc.compare(rows)  # h2 has no NGINX row: no ratio
    assert c["measure"] == "grpc"
    assert c["round_ratios"] == pytest.approx([0.25, 0.3, 0.3])
    assert c["rate_ratio"] == pytest.approx(0.3)
    assert c["ratio_of_medians"] == pytest.approx(1000 / 4000)
    assert c["cpu_ratio"] == pytest.approx(10.0)
    lines = bench_grpc.report_lines(
        {"rows": list(rows.values()), "comparisons": [c], "skipped": []}
    )
    assert "grpc stickyproxy/NGINX 0.30x the rate" in lines[-1]


def test_grpc_is_a_benchmark_of_the_suite_with_its_plans():
    assert "grpc" in suite.SCENARIOS and "grpc" in suite.RUNNERS
    assert suite.build_parser().parse_args(["--only", "grpc"]).only == ("grpc",)
    assert "nginx" in suite.required_tools(["grpc"])
    smoke, full = bench_grpc.make_plan(True), bench_grpc.make_plan(False)
    assert smoke.smoke and not full.smoke and smoke.warmup == 0
    assert smoke.duration < full.duration and smoke.rounds <= full.rounds
    # the full run stays under 5 minutes: per round 4 runs (2 measures x 2 proxies), and a
    # warm-up of each listener
    assert full.rounds * 4 * full.duration + 4 * full.warmup < 270


def test_source_runs_stickyproxy_from_a_revision_not_the_checkout(tmp_path: Path):
    from stickyproxy.compiled import build

    if build() != "interpreted":
        with pytest.raises(bench_grpc.Skip, match="interpreted build"):
            bench_grpc.sources_at(tmp_path, "HEAD")
        return
    tree = bench_grpc.sources_at(tmp_path, "HEAD")
    assert (tree / "stickyproxy" / "dataplane" / "h2upstream.py").exists()
    state = bench_grpc.source_state("HEAD")
    assert state["uncommitted"] == [] and state["from"] == "git archive HEAD"
    assert len(state["commit"]) >= 7 and state["commit"] != "HEAD"
    with pytest.raises(bench_grpc.Skip, match="no stickyproxy sources at no-such-rev"):
        bench_grpc.sources_at(tmp_path / "x", "no-such-rev")


# -- the report (bench/document.py) ---------------------------------------------------------------

META = {
    "command": "python -m bench --only grpc",
    "started_at": "2026-12-05 00:18 UTC",
    "cpus": 2,
    "platform": "Linux",
    "tools": {"nginx": "1.22"},
    "scenarios": {"grpc": {"status": "ok", "seconds": 212.0}},
}


def results() -> dict[str, Any]:
    rows = []
    for measure, target, rates, cpu, backend_cpu in (
        ("grpc", "nginx", [3000, 4000], 70, 400),  # its backends 1.20 cores, NGINX 0.21
        ("grpc", "stickyproxy", [750, 1000], 800, 500),
        ("h2", "nginx", [15000, 20000], 30, 15),
        ("h2", "stickyproxy", [3000, 3000], 300, 30),
    ):
        runs = [{**run(i + 1, r, cpu), "backend_cpu_us": backend_cpu} for i, r in enumerate(rates)]
        summary = bench_grpc.summarize(runs)
        rows.append({"measure": measure, "target": target, "runs": runs, "summary": summary})
    by_key = {f"{r['measure']}/{r['target']}": r for r in rows}
    return {
        "loadavg_before": [3.5, 3.0, 2.5],
        "loadavg_after": [4.25, 3.5, 3.0],
        "settings": {
            "duration_s": 10.0,
            "rounds": 2,
            "warmup_s": 2.0,
            "grpc": "3 h2load processes (one user each) x 2 connections x 16 streams",
            "grpc_request": "POST /bench.Echo/Unary, 22-byte body",
            "h2": "4 connections x 16 streams, 1000 users",
        },
        "source": {"commit": "abc1234", "from": "git archive HEAD", "uncommitted": []},
        "tools": {
            "stickyproxy": "0.1.0 (interpreted)",
            "nginx": "nginx version: nginx/1.22.1",
            "h2load": "h2load nghttp2/1.52.0",
            "grpcio": "1.85.3",
        },
        "rows": rows,
        "comparisons": bench_grpc.compare(by_key),
        "skipped": [],
    }


def test_verdicts_give_each_ratio_and_which_side_of_half_it_is():
    grpc, h2 = document.grpc_verdicts(results())
    assert grpc.target.startswith("gRPC unary calls/s against NGINX")
    assert (grpc.measured, grpc.verdict) == ("0.25x", "measured, below 0.5×")
    assert grpc.note == "rounds 0.25x, 0.25x; per CPU-second 0.09x"
    assert h2.target.startswith("HTTP/2 streams") and h2.measured == "0.17x"
    assert [v.verdict for v in document.grpc_verdicts(None)] == [document.NOT_MEASURED] * 2


def test_section_has_a_table_per_measure_and_says_what_set_the_pace():
    text = document.grpc_section(results())
    assert text.startswith("## 9. gRPC and HTTP/2")
    assert "2 interleaved rounds of 10 s after a 2 s warm-up" in text
    assert "from git archive HEAD at `abc1234`; nginx/1.22.1." in text
    assert "| NGINX | 3,500 | 3,000 / 4,000 | 70 | 0.24 | 400 | 1.40 | 0 |" in text
    assert "| stickyproxy | 875 | 750 / 1,000 | 800 | 0.70 | 500 | 0.44 | 0 |" in text
    assert "| stickyproxy ÷ NGINX | 0.25x | 0.25x / 0.25x | 11.43x |" in text
    assert "| stickyproxy ÷ NGINX | 0.17x | 0.20x / 0.15x | 10.00x |" in text
    # gRPC: NGINX's backends, not NGINX, were the busier; HTTP/2: NGINX was
    grpc_note = next(ln for ln in text.splitlines() if ln.startswith("- **gRPC unary calls**"))
    assert "NGINX's rate was set by its backends, not by NGINX" in grpc_note
    assert "the rate ratio (0.25x) understates the gap" in grpc_note
    h2_note = next(ln for ln in text.splitlines() if ln.startswith("- **HTTP/2 streams**"))
    assert "set by its backends" not in h2_note
    assert "Per request, stickyproxy spent 10.00x NGINX's CPU (0.10x" in h2_note
    assert "3.50 as the run began, 4.25 as it ended" in text
    # stickyproxy's HTTP/2 line is the busiest: 3,000 req/s x 300 µs
    assert "; stickyproxy used 0.90 of a core (HTTP/2 streams), its own limit there." in text


def test_report_has_the_section_and_carry_over_keeps_it_when_not_run(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    with_grpc = document.render({"grpc": results()}, {}, doc, META)
    summary = with_grpc[with_grpc.index("## DESIGN") : with_grpc.index("## 9.")]
    assert "| gRPC unary calls/s against NGINX (grpc_pass, 1 worker) | 0.25x" in summary
    assert "| HTTP/2 streams, req/s against NGINX (h2c, 1 worker) | 0.17x" in summary
    other = {**META, "command": "python -m bench --only ring", "scenarios": {"ring": {}}}
    kept = document.carry_over(document.render({}, {}, doc, other), with_grpc, {"ring"})
    assert kept.index("## 9. gRPC and HTTP/2") < kept.index("## Reproducing")
    rows = [ln for ln in kept.splitlines() if ln.startswith(("| gRPC unary", "| HTTP/2 streams"))]
    assert len(rows) == 2 and not any(document.NOT_MEASURED in r for r in rows)


# -- for real ---------------------------------------------------------------------------------


@needs_load
def test_grpc_errors_answered_200_fail_the_probe_and_the_count_check(tmp_path: Path):
    """A proxy whose backends are all down answers every call HTTP 200 with grpc-status
    UNAVAILABLE: h2load counts those as successes, the probe and the backends' count do not."""
    with contextlib.ExitStack() as stack:
        port, *down = free_ports(4)
        launch = bench_grpc.stickyproxy_grpc_launch(tmp_path, port, down)
        launch.write()
        server = start_server("sp", launch.argv, [port], tmp_path, stack, launch.env)
        with pytest.raises(bench_grpc.ProbeError, match="UNAVAILABLE"):
            bench_grpc.probe_grpc(port, users=3)
        data = tmp_path / "unary.bin"
        data.write_bytes(bench_grpc.grpc_message(bench_grpc.REQUEST_PAYLOAD))
        ep = bench_grpc.Endpoint("stickyproxy", bench_grpc.GRPC, server, port, ["u1"])
        with pytest.raises(RuntimeError, match="backends answered 0: some 200s were gRPC errors"):
            bench_grpc.measure(
                ep, bench_grpc.Bench(data, {}, [], {}), bench_grpc.make_plan(True), 0.5
            )


@pytest.mark.slow
@needs_load
def test_the_smoke_run_fills_every_row_without_errors():
    result = bench_grpc.run(bench_grpc.make_plan(True), True, lambda _line: None)
    assert result["skipped"] == []
    rows = {(r["measure"], r["target"]): r for r in result["rows"]}
    assert set(rows) == {(m, t) for m in bench_grpc.MEASURES for t in bench_grpc.TARGETS}
    for key, row in rows.items():
        s = row["summary"]
        assert s["count"] > 0 and s["cpu_us"] > 0 and s["backend_cpu_us"] > 0, key
        assert s["failed"] == 0 and s["non_2xx"] == 0, key
        for r in row["runs"]:
            if key[0] == bench_grpc.GRPC:
                assert r["backend_served"] >= r["succeeded"] > 0, key
                assert r["processes"] == bench_grpc.GRPC_USERS
    assert {c["measure"] for c in result["comparisons"]} == set(bench_grpc.MEASURES)
    for users in result["grpc_users"].values():
        assert len(users) == bench_grpc.GRPC_USERS
