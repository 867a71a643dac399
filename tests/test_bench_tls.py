"""The TLS benchmark in the suite (bench/tls.py, `python -m bench --only tls`): its comparisons
and verdict from a small results dict, its section of docs/benchmarks.md and its chart, the
section kept by `carry_over` when it is not run, its name on the command line; and, for
real, that its figures mean what they say: the `reconnect` load makes resumed handshakes,
the `handshake` load full ones (NGINX's `$ssl_session_reused`), the TLS listeners serve the
certificate made for the run, and the smoke run fills every row without errors."""

from __future__ import annotations

import contextlib
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as suite
from bench import document, tls
from bench.dataplane import NGINX_BACKENDS, start_backends
from bench.procs import LOOPBACK, free_ports, start_server

META = {
    "command": "python -m bench --only tls",
    "started_at": "2026-12-04 22:00 UTC",
    "cpus": 2,
    "platform": "Linux",
    "tools": {"nginx": "1.22"},
    "scenarios": {"tls": {"status": "ok", "seconds": 200.0, "started_at": "2026-12-04 22:00 UTC"}},
}


def run(rnd: int, rate: float, cpu: float) -> dict[str, Any]:
    return {
        "round": rnd,
        "rate": rate,
        "count": int(rate),
        "seconds": 1.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "non_2xx": 0,
        "socket_errors": 0,
        "cpu_us": cpu,
    }


def row(mode: str, key: str | None, target: str, rates: list[float], cpu: float) -> dict[str, Any]:
    runs = [run(i + 1, r, cpu) for i, r in enumerate(rates)]
    return {
        "mode": mode,
        "key": key,
        "target": target,
        "runs": runs,
        "summary": tls.summarize(runs),
    }


def results(keepalive_sp: tuple[float, float] = (6000.0, 4000.0)) -> dict[str, Any]:
    rows = [
        row("plain", None, "nginx", [20000, 20000], 15),
        row("plain", None, "stickyproxy", [10000, 8000], 40),
        row("plain", None, "stickyproxy-pre-tls", [10000, 10000], 40),
        row("keepalive", "ecdsa", "nginx", [10000, 10000], 20),
        row("keepalive", "ecdsa", "stickyproxy", list(keepalive_sp), 50),
        row("reconnect", "ecdsa", "nginx", [2000, 2000], 300),
        row("reconnect", "ecdsa", "stickyproxy", [1000, 1000], 500),
        row("handshake", "ecdsa", "nginx", [800, 800], 400),
        row("handshake", "ecdsa", "stickyproxy", [800, 800], 800),
        row("handshake", "rsa", "nginx", [500, 500], 1000),
    ]
    by_key = {tls._row_key(r["mode"], r["key"], r["target"]): r for r in rows}
    return {
        "benchmark": "tls",
        "started_at": "2026-12-04T22:00:00+0000",
        "settings": {
            "duration_s": 5.0,
            "rounds": 2,
            "warmup_s": 2.0,
            "connections": 32,
            "handshake_clients": 4,
            "smoke": False,
        },
        "certificates": {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"},
        "negotiated": {"nginx/ecdsa": {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}},
        "tools": {"stickyproxy": "0.1.0 (interpreted)", "python_ssl": "OpenSSL 3.0"},
        "rows": rows,
        "comparisons": tls.compare(by_key, tls.MEASURES),
        "tls_over_plain": tls.tls_cost(by_key),
        "plain_over_pre_tls": tls.plain_over_pre_tls(by_key),
        "pre_tls_commit": tls.PRE_TLS_COMMIT,
        "skipped": [],
    }


# -- the figures' arithmetic (pure) ------------------------------------------------------------


def test_comparisons_are_stickyproxy_over_nginx_of_the_medians_and_of_each_round():
    by = {(c["mode"], c["key"]): c for c in results()["comparisons"]}
    # a measure with only one proxy measured has no ratio
    assert set(by) == {
        ("plain", None),
        ("keepalive", "ecdsa"),
        ("reconnect", "ecdsa"),
        ("handshake", "ecdsa"),
    }
    assert by[("plain", None)]["rate_ratio"] == pytest.approx(9000 / 20000)
    assert by[("plain", None)]["round_ratios"] == pytest.approx([0.5, 0.4])
    assert by[("keepalive", "ecdsa")]["cpu_ratio"] == pytest.approx(2.5)
    assert by[("handshake", "ecdsa")]["rate_ratio"] == pytest.approx(1.0)


def test_plain_is_compared_with_the_sources_before_tls_and_tls_with_plain():
    r = results()
    assert r["plain_over_pre_tls"]["rate_ratio"] == pytest.approx(0.9)
    assert r["plain_over_pre_tls"]["round_ratios"] == pytest.approx([1.0, 0.8])
    assert r["tls_over_plain"] == {"nginx": pytest.approx(0.5), "stickyproxy": pytest.approx(0.55)}
    assert tls.plain_over_pre_tls({}) is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "Collecting connection statistics for 1 seconds\n"
            "1853 connections in 1.00s; 1853.00 connections/user sec, bytes read 335454\n"
            "1853 connections in 4 real seconds, 181 bytes read per connection\n\n"
            "Now timing with session id reuse.\n",
            (1853, 335454),
        ),
        ("12 connections in 0.05s; 240.00 connections/user sec, bytes read 0\n", (12, 0)),
    ],
)
def test_s_time_output_gives_connections_and_bytes(output, expected):
    assert tls.parse_s_time(output) == expected


def test_s_time_output_without_figures_is_an_error():
    with pytest.raises(tls.WrkError, match="no figures"):
        tls.parse_s_time("connect: Connection refused\nconnect:errno=111\n")


@pytest.mark.parametrize(
    ("rates", "verdict", "measured"),
    [
        ((6000.0, 4000.0), document.MET, "0.50x"),
        ((4000.0, 5000.0), document.MISSED, "0.45x"),
    ],
)
def test_verdict_is_keepalive_tls_against_half_of_nginx(rates, verdict, measured):
    (v,) = document.tls_verdicts(results(rates))
    assert v.target.startswith("TLS keep-alive ≥ 0.5× NGINX")
    assert (v.verdict, v.measured) == (verdict, measured)
    assert document.tls_verdicts(None)[0].verdict == document.NOT_MEASURED
    assert v.note.endswith("; per CPU-second 0.40x")


def test_section_states_each_ratio_the_cpu_and_the_no_regression_figure(tmp_path: Path):
    images = {"tls": tmp_path / "benchmarks" / "tls.png"}
    text = document.tls_section(results(), None, images, tmp_path)
    assert text.startswith("## 8. TLS termination")
    assert (
        "| TLS, keep-alive (req/s) | 10,000 | 5,000 | 0.50x | 0.60x / 0.40x | 20 | 50 "
        "| 2.50x | 0.40x | 0.20 / 0.25 | 0 |"
    ) in text
    # RSA measured against NGINX only: its row has no ratio
    assert (
        "| TLS, full handshakes, RSA-2048 (handshakes/s) | 500 | - | - |  | 1000 | - | - "
        "| - | 0.50 | 0 |"
    ) in text
    assert "+10 µs of CPU per request to stickyproxy, +5 µs to NGINX" in text
    assert "2 interleaved rounds of 5 s" in text
    assert (
        "1.00x the CPU per request (the figure that holds when neither has a core to "
        "itself), 0.90x the req/s (rounds 1.00x, 0.80x)"
    ) in text
    # neither proxy near a core: the CPU comparison is the one to read
    assert "**Neither proxy had a core to itself** in any line (at most 0.64 of one)" in text
    assert "| TLS, full handshakes, ECDSA P-256 (handshakes/s) | 800 | 800 | 1.00x" in text
    assert "| 400 | 800 | 2.00x | 0.50x |" in text
    assert "the data-plane benchmark was not run in this invocation" in text
    assert text.rstrip().endswith("(benchmarks/tls.png)")


def test_section_sets_plain_beside_the_dataplane_benchmark_of_the_run(tmp_path: Path):
    dataplane = {
        "started_at": "2026-12-04T21:50:00+0000",
        "tools": {"stickyproxy": "0.1.0 (interpreted)"},
        "targets": [
            {
                "name": "stickyproxy",
                "workers": 1,
                "label": "stickyproxy w1",
                "summary": {"rps_median": 12000.0},
                "ratio_to_nginx": {"rps": 0.47},
            }
        ],
    }
    text = document.tls_section(results(), dataplane, {}, tmp_path)
    assert (
        "here stickyproxy made 0.45x NGINX's plain req/s; the data-plane benchmark (same "
        "day, started 2026-12-04T21:50:00+0000, stickyproxy 0.1.0 (interpreted)) measured "
        "0.47x at 1 worker (12,000 req/s)"
    ) in text


def test_report_has_the_section_and_carry_over_keeps_it_when_not_run(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    with_tls = document.render({"tls": results()}, {}, doc, META)
    assert "## 8. TLS termination" in with_tls
    summary = with_tls[with_tls.index("## DESIGN") : with_tls.index("## 8.")]
    assert "| TLS keep-alive ≥ 0.5× NGINX (1 worker, same certificate) | 0.50x" in summary
    other = {
        **META,
        "command": "python -m bench --only ring",
        "scenarios": {"ring": {"status": "ok", "seconds": 3.0}},
    }
    kept = document.carry_over(document.render({}, {}, doc, other), with_tls, {"ring"})
    assert kept.index("## 8. TLS termination") < kept.index("## Reproducing")
    assert "| TLS, keep-alive (req/s) | 10,000 | 5,000 | 0.50x |" in kept
    rows = [ln for ln in kept.splitlines() if ln.startswith("| TLS keep-alive")]
    assert len(rows) == 1 and document.NOT_MEASURED not in rows[0]


def test_chart_is_drawn_from_the_rows(tmp_path: Path):
    from bench import plots

    out = plots.tls(tmp_path / "tls.png", results())
    assert out is not None and out.stat().st_size > 10_000
    assert plots.tls(tmp_path / "none.png", {"rows": [], "comparisons": []}) is None


def test_tls_is_a_benchmark_of_the_suite_with_its_plans():
    assert "tls" in suite.SCENARIOS
    assert suite.build_parser().parse_args(["--only", "tls"]).only == ("tls",)
    smoke, full = tls.make_plan(True), tls.make_plan(False)
    assert smoke.smoke and not full.smoke
    assert smoke.duration < full.duration and smoke.rounds <= full.rounds and smoke.warmup == 0
    # the full run stays under 5 minutes: per round 7 wrk runs (plain: 3 targets; keep-alive
    # and reconnect: 2) of `duration`, 4 s_time runs of up to 1 s more (they stop on a whole
    # second), and a warm-up per listener (5)
    handshakes = sum(1 for m, _ in full.measures if m == tls.HANDSHAKE) * 2
    load = full.rounds * (7 * full.duration + handshakes * (full.duration + 1)) + 5 * full.warmup
    assert load < 270


def test_a_missing_tool_skips_a_full_run_and_only_its_part_of_a_smoke_run():
    none = {"nginx": False, "wrk": False, "openssl": False}
    with pytest.raises(tls.Skip, match="nginx, openssl, wrk not installed"):
        tls.check(False, none)
    with pytest.raises(tls.Skip, match="nothing to measure"):
        tls.check(True, none)
    tls.check(True, {"nginx": False, "wrk": True, "openssl": False})


def test_stickyproxy_tls_config_serves_the_run_certificate(tmp_path: Path):
    certs = tls.CertFiles(tmp_path / "c.crt", tmp_path / "c.key", tmp_path / "ca.pem")
    launch = tls.stickyproxy_tls_launch(tmp_path, 8443, [9001, 9002, 9003], certs, "ecdsa")
    assert f'[listen.tls]\ncert = "{certs.cert}"\nkey = "{certs.key}"' in launch.config
    assert str(launch.config_path) in launch.argv and launch.argv[-1] == "1"
    plain = tls.stickyproxy_tls_launch(tmp_path, 8080, [9001], None, "plain")
    assert "[listen.tls]" not in plain.config and plain.config_path != launch.config_path


# -- for real: nginx, wrk and openssl s_time on loopback ---------------------------------------

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nginx", "wrk", "openssl")),
    reason="needs nginx, wrk and openssl",
)


@pytest.mark.slow
@needs_tools
def test_reconnects_are_resumed_handshakes_and_s_time_makes_full_ones(tmp_path: Path):
    """NGINX logs `$ssl_session_reused` ("r" or ".") for each TLS request: the `reconnect`
    load resumes almost every connection after the first per wrk connection, the
    `handshake` load never does; and the certificate served is the run's, by its CA."""
    log = tmp_path / "reuse.log"
    with contextlib.ExitStack() as stack:
        certs = tls.make_certificates(tmp_path, [tls.ECDSA])
        backend_ports, _, _ = start_backends(tmp_path, stack, NGINX_BACKENDS)
        plain, port = free_ports(2)
        launch = tls.nginx_tls_launch(
            tmp_path, plain, {tls.ECDSA: port}, certs, backend_ports, access_log=log
        )
        launch.write()
        server = start_server("nginx-tls", launch.argv, [plain, port], tmp_path, stack)
        negotiated = tls.probe(port, tls.client_context(certs[tls.ECDSA].ca))
        assert negotiated["version"] in ("TLSv1.2", "TLSv1.3")
        with pytest.raises(tls.ProbeError, match="CERTIFICATE_VERIFY_FAILED"):
            tls.probe(port, ssl.create_default_context())  # not the system store's
        log.write_text("")
        wrk = tls.run_wrk(f"https://{LOOPBACK}:{port}/", 1.0, 4, tls.RECONNECT_SCRIPT, 100, server)
        reconnect = log.read_text().split()[::2]
        log.write_text("")
        hs = tls.run_handshakes(port, 1.0, 2, server)
        handshakes = log.read_text().split()[::2]
    assert wrk["count"] > 20 and wrk["socket_errors"] == 0 and wrk["non_2xx"] == 0
    assert len(reconnect) >= wrk["count"]
    assert reconnect.count("r") >= 0.9 * len(reconnect)
    assert hs["count"] > 10 and hs["cpu_us"] and hs["bytes_per_connection"] > 50
    assert len(handshakes) == hs["count"] and set(handshakes) == {"."}


@pytest.mark.slow
@needs_tools
def test_the_smoke_run_fills_every_row_without_errors(tmp_path: Path):
    result = tls.run(tls.make_plan(True), tls.available_tools(), lambda _line: None, tmp_path)
    rows = {(r["mode"], r["key"], r["target"]): r["summary"] for r in result["rows"]}
    for mode, key in tls.MEASURES:
        for target in (tls.NGINX, tls.STICKYPROXY):
            s = rows[(mode, key, target)]
            assert s["count"] > 0 and s["cpu_us"] > 0, (mode, key, target)
            assert s["non_2xx"] == 0 and s["socket_errors"] == 0, (mode, key, target)
    assert len(result["comparisons"]) == len(tls.MEASURES)
    assert set(v["version"] for v in result["negotiated"].values()) == {"TLSv1.3"}
    assert result["chart"] and Path(result["chart"]).exists()
    # the interpreted build is measured beside its sources before TLS; a compiled one is not
    from stickyproxy.compiled import build

    assert (result["plain_over_pre_tls"] is not None) == (build() == "interpreted")
