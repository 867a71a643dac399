"""The kill drill's pure parts (bench/killdrill.py): its schedule, how it counts GETs and
names failures, how it reads each proxy's own counters; the configurations it gives each
proxy, checked by the proxy itself; and the report keeping the sections of benchmarks
whose results are absent (bench/document.py `carry_over`)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from bench import document, killdrill
from bench.killdrill import KILL, START, Plan, Step, Tally
from bench.targets import haproxy_drill_launch, nginx_drill_launch, stickyproxy_drill_launch

TOOL_TIMEOUT_S = 20


def plan(duration: float, period: float, down: float, first: float) -> Plan:
    return Plan(
        clients=1,
        users=1,
        duration=duration,
        period=period,
        down=down,
        first_kill=first,
        smoke=True,
    )


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        # the full drill: every 4 s from 2 s, each started again 2 s later, all within 30 s
        (
            killdrill.FULL,
            [
                Step(2.0, KILL, "app-1"),
                Step(4.0, START, "app-1"),
                Step(6.0, KILL, "app-2"),
                Step(8.0, START, "app-2"),
                Step(10.0, KILL, "app-3"),
                Step(12.0, START, "app-3"),
                Step(14.0, KILL, "app-1"),
                Step(16.0, START, "app-1"),
                Step(18.0, KILL, "app-2"),
                Step(20.0, START, "app-2"),
                Step(22.0, KILL, "app-3"),
                Step(24.0, START, "app-3"),
                Step(26.0, KILL, "app-1"),
                Step(28.0, START, "app-1"),
            ],
        ),
        # a start that would fall at or after the end is left out; the kill stays
        (plan(5.0, 4.0, 2.0, 3.0), [Step(3.0, KILL, "app-1")]),
        (
            plan(4.0, 2.0, 2.0, 0.0),
            [Step(0.0, KILL, "app-1"), Step(2.0, START, "app-1"), Step(2.0, KILL, "app-2")],
        ),
        # down longer than the period: the next kill comes before the last start
        (
            plan(4.0, 1.0, 1.5, 1.0),
            [
                Step(1.0, KILL, "app-1"),
                Step(2.0, KILL, "app-2"),
                Step(2.5, START, "app-1"),
                Step(3.0, KILL, "app-3"),
                Step(3.5, START, "app-2"),
            ],
        ),
        (plan(1.0, 4.0, 2.0, 2.0), []),
    ],
)
def test_schedule(p, expected):
    assert killdrill.schedule(p) == expected


def test_smoke_schedule_kills_and_starts_again_within_the_drill():
    steps = killdrill.schedule(killdrill.SMOKE)
    assert [s.action for s in steps] == [KILL, START, KILL, START]
    assert all(s.at < killdrill.SMOKE.duration for s in steps)


@pytest.mark.parametrize(
    ("status", "body", "error", "expected"),
    [
        (
            502,
            b"backend app-2 failed: connection closed before the response ended\n",
            "",
            "502 backend app-2 failed: connection closed before the response ended",
        ),
        (
            502,
            b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n",
            "",
            "502 <html> <head><title>502 Bad Gateway</title></head> <body>",
        ),
        (503, b"", "", "503"),
        (0, b"", "reset", "no response: reset"),
        (0, b"", "timeout", "no response: timeout"),
        # only the first bytes of a body name the reason
        (500, b"x" * 1000, "", "500 " + "x" * killdrill.REASON_BODY_BYTES),
        (502, b"\xff\xfe bad", "", "502 \ufffd\ufffd bad"),
    ],
)
def test_failure_reason(status, body, error, expected):
    assert killdrill.failure_reason(status, body, error) == expected


def test_tally_counts_200_as_answered_and_everything_else_as_failed():
    t = Tally(3)
    t.add(0.5, 0.001, 200, b"ok\n", "", "app-1")
    t.add(1.2, 0.002, 200, b"ok\n", "", "app-2")
    t.add(1.3, 0.003, 502, b"backend app-2 unreachable", "", "")
    t.add(2.9, 0.004, 0, b"", "reset", "")
    t.add(3.4, 0.005, 200, b"ok\n", "", "")  # ended after the drill: counted in its last second
    t.add(1.9, 0.006, 404, b"not found", "", "app-1")  # served, but not 200: failed
    t.add(2.0, 10.0, 200, b"", "timeout", "")  # an error wins over a status
    assert (t.answered, t.failed) == (3, 4)
    assert t.answered_per_second == [1, 1, 1]
    assert t.failed_per_second == [0, 2, 2]
    assert t.served_by == {"app-1": 1, "app-2": 1, "?": 1}
    assert t.served_per_second == {"app-1": [1, 0, 0], "app-2": [0, 1, 0], "?": [0, 0, 1]}
    assert t.reasons == {
        "502 backend app-2 unreachable": 1,
        "no response: reset": 1,
        "404 not found": 1,
        "no response: timeout": 1,
    }
    assert [at for at, _ in t.samples] == [1.3, 2.9, 1.9, 2.0]
    # latencies of the answered GETs only
    assert list(t.latencies) == [0.001, 0.002, 0.005]


def test_tally_keeps_only_the_first_failures_one_by_one():
    t = Tally(1)
    for i in range(killdrill.FAILURE_SAMPLES + 5):
        t.add(0.1, 0.001, 502, b"x", "", "")
    assert t.failed == killdrill.FAILURE_SAMPLES + 5
    assert len(t.samples) == killdrill.FAILURE_SAMPLES


def test_last_kill_before():
    events = [
        {"at": 2.0, "action": KILL, "backend": "app-1"},
        {"at": 4.0, "action": START, "backend": "app-1"},
        {"at": 6.0, "action": KILL, "backend": "app-2"},
    ]
    assert killdrill.last_kill_before(1.0, events) is None
    assert killdrill.last_kill_before(2.5, events) == ("app-1", 0.5)
    assert killdrill.last_kill_before(7.0, events) == ("app-2", 1.0)


METRICS = """# HELP stickyproxy_retries_total Requests retried away from a backend, by reason
# TYPE stickyproxy_retries_total counter
stickyproxy_retries_total{backend="app-1",reason="connect"} 12.0
stickyproxy_retries_total{backend="app-2",reason="connect"} 3.0
stickyproxy_retries_total{backend="app-2",reason="stale-connection"} 7.0
stickyproxy_retries_denied_total{backend="app-3",reason="budget"} 2.0
stickyproxy_retries_totally_other{reason="connect"} 99.0
stickyproxy_upstream_errors_total{backend="app-1",kind="connect"} 12.0
"""


def test_metric_by_label_sums_over_the_other_labels():
    assert killdrill.metric_by_label(METRICS, "stickyproxy_retries_total", "reason") == {
        "connect": 15.0,
        "stale-connection": 7.0,
    }
    assert killdrill.stickyproxy_counters(METRICS) == {
        "retries_total": {"connect": 15.0, "stale-connection": 7.0},
        "retries_denied_total": {"budget": 2.0},
        "upstream_errors_total": {"connect": 12.0},
    }
    assert killdrill.metric_by_label("", "stickyproxy_retries_total", "reason") == {}


def test_haproxy_counters_from_the_backend_row_of_the_stats_csv():
    csv = (
        "# pxname,svname,qcur,econ,eresp,wretr,wredis,status\n"
        "proxy,FRONTEND,,,,,,OPEN\n"
        "apps,app-1,0,0,4,9,6,UP\n"
        "apps,BACKEND,0,1,16,47,31,UP\n"
        "stats,BACKEND,0,0,0,0,0,UP\n"
    )
    assert killdrill.haproxy_counters(csv) == {
        "retries": 47,
        "redispatches": 31,
        "connection errors": 1,
        "response errors": 16,
    }
    assert killdrill.haproxy_counters("") == {}
    assert killdrill.haproxy_counters("# pxname,svname\nother,BACKEND\n") == {}


def test_nginx_counters_by_kind_from_the_error_log():
    log = "\n".join(
        [
            "2026/12/04 18:21:01 [error] 7#7: *1 connect() failed (111: Connection refused) while "
            'connecting to upstream, client: 127.0.0.1, upstream: "http://127.0.0.1:9/"',
            "2026/12/04 18:21:01 [warn] 7#7: *1 upstream server temporarily disabled while "
            "connecting to upstream",
            "2026/12/04 18:21:01 [error] 7#7: *2 recv() failed (104: Connection reset by peer) "
            "while reading response header from upstream",
            "2026/12/04 18:21:01 [error] 7#7: *3 upstream prematurely closed connection while "
            "reading response header from upstream",
            "2026/12/04 18:21:02 [error] 7#7: *4 no live upstreams while connecting to upstream",
            "2026/12/04 18:21:02 [notice] 7#7: signal process started",
        ]
    )
    assert killdrill.nginx_counters(log) == {
        "connect refused": 1,
        "server disabled (max_fails)": 1,
        "reset": 1,
        "closed before the response": 1,
        "no live upstreams": 1,
    }


# -- the configurations, as each proxy reads them ----------------------------------------------


def _check(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_accepts_its_drill_configuration(tmp_path):
    launch = nginx_drill_launch(tmp_path, 18080, [18081, 18082, 18083])
    launch.write()
    for wanted in (
        "hash $http_x_user_id consistent;",
        "max_fails=2",
        "keepalive 32;",
        "proxy_next_upstream error timeout http_502;",
        "proxy_next_upstream_tries 3;",
    ):
        assert wanted in launch.config
    out = _check(["nginx", "-t", *launch.argv[1:-2]])
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_its_drill_configuration(tmp_path):
    launch = haproxy_drill_launch(tmp_path, 18080, [18081, 18082, 18083], 18084)
    launch.write()
    for wanted in (
        "balance hdr(X-User-Id)",
        "hash-type consistent",
        "option redispatch",
        "retries 2",
        "retry-on conn-failure empty-response response-timeout",
        "check inter 500 fall 2 rise 1",
        "http-reuse always",
    ):
        assert wanted in launch.config
    out = _check(["haproxy", "-c", "-f", str(launch.config_path)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_stickyproxy_accepts_its_drill_configuration(tmp_path):
    launch = stickyproxy_drill_launch(tmp_path, 18080, [18081, 18082, 18083], 18084)
    launch.write()
    assert "[retries]" not in launch.config  # the retry settings are the defaults
    out = _check([sys.executable, "-m", "stickyproxy.cli", "check", "-c", str(launch.config_path)])
    assert out.returncode == 0, out.stdout + out.stderr


# -- the report keeps what it has no new results for -------------------------------------------

OLD = """<!-- generated -->
# Benchmarks

Written by `python -m bench` on 2026-11-26 12:42 UTC; tools A. When each benchmark ran:

| benchmark | started | took | load average at start |
|---|---|---:|---:|
| ring | 2026-11-26 12:42 UTC | 3 seconds | 0.72 |
| failover | 2026-11-26 12:52 UTC | 52 seconds | 3.81 |

Reading notes.

## DESIGN.md §8, target by target

| target | measured | verdict |
|---|---|---|
| ring lookup ≥ 500k keys/s in one process | 900,000 keys/s | met |
| kill one of three: zero failed idempotent requests | 0 of 9,000 | met |
| kill one of three: zero lost context updates | 0 of 2,000 | met |

## 3. Failover drill

Old failover text.

## 4. The ring

Old ring text.

## Reproducing

old commands
"""

NEW = """<!-- generated -->
# Benchmarks

Written by `python -m bench --only ring,killdrill` on 2026-12-04 18:00 UTC; tools B. When each benchmark ran:

| benchmark | started | took | load average at start |
|---|---|---:|---:|
| ring | 2026-12-04 18:00 UTC | 3 seconds | 1.0 |
| killdrill | 2026-12-04 18:01 UTC | 2 minutes | 2.0 |

Reading notes.

## DESIGN.md §8, target by target

| target | measured | verdict |
|---|---|---|
| ring lookup ≥ 500k keys/s in one process | 950,000 keys/s | met |
| kill one of three under load | - | not measured |
| kill one of three every 4 s under load, beside NGINX and HAProxy: zero failed GETs | 0 of 9 | met |

## 4. The ring

New ring text.

## 5. Backends killed under load, beside NGINX and HAProxy

New drill text.

## Reproducing

new commands
"""


def test_carry_over_keeps_the_sections_rows_and_runs_of_benchmarks_not_measured():
    out = document.carry_over(NEW, OLD, {"ring", "killdrill"})
    # the failover section, kept in its place; the ring's new section replaces the old
    assert out.index("## 3. Failover drill\n\nOld failover text.") < out.index("## 4. The ring")
    assert "New ring text." in out and "Old ring text." not in out
    assert out.index("## 4. The ring") < out.index("## 5. Backends") < out.index("## Repro")
    assert "new commands" in out and "old commands" not in out
    # its summary rows replace "not measured", where the new table had them
    summary = out[out.index("## DESIGN") : out.index("## 3.")]
    assert [line.split(" | ")[0] for line in summary.splitlines() if line.startswith("| ")][1:] == [
        "| ring lookup ≥ 500k keys/s in one process",
        "| kill one of three: zero failed idempotent requests",
        "| kill one of three: zero lost context updates",
        "| kill one of three every 4 s under load, beside NGINX and HAProxy: zero failed GETs",
    ]
    assert "not measured" not in out
    # its run in the header table, before the new ones; the header names the earlier run
    header = out[: out.index("## DESIGN")]
    assert [r.split(" | ")[0] for r in header.splitlines() if r.startswith("| ")][1:] == [
        "| failover",
        "| ring",
        "| killdrill",
    ]
    assert (
        "tools B. The sections of the benchmarks not run by that command are kept from the "
        "report before, written by `python -m bench` on 2026-11-26 12:42 UTC; tools A. "
        "When each benchmark ran"
    ) in header


def test_carry_over_again_names_the_same_earlier_run():
    once = document.carry_over(NEW, OLD, {"ring", "killdrill"})
    assert document.carry_over(NEW, once, {"ring", "killdrill"}) == once


def test_carry_over_keeps_nothing_when_every_old_section_was_measured_again():
    assert document.carry_over(NEW, OLD, {"ring", "killdrill", "failover"}) == NEW
    assert document.carry_over(NEW, "", {"ring", "killdrill"}) == NEW


# -- the report's section --------------------------------------------------------------------


def _target(name: str, answered: int, failed: int, **extra) -> dict:
    return {
        "name": name,
        "status": "ok",
        "answered": answered,
        "failed": failed,
        "gets_per_s": answered / 30,
        "failure_reasons": {},
        "served_by": {},
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p999": 4.0, "max": 5.0},
        "failure_samples": [],
        "events": [{"at": 2.0, "action": KILL, "backend": "app-1"}],
        "timeline": {"answered": [answered], "failed": [failed]},
        "proxy_counters": {},
        **extra,
    }


def _result(*targets: dict) -> dict:
    settings = {
        "clients": 24,
        "users": 500,
        "duration_s": 30.0,
        "period_s": 4.0,
        "down_s": 2.0,
        "first_kill_s": 2.0,
        "request_timeout_s": 10.0,
        "failure_samples_kept": 40,
        "health": {"interval_ms": 500, "fall": 2, "rise": 1},
        "nginx": {"tries": 3, "max_fails": 2, "fail_timeout": "1s", "keepalive": 32},
        "haproxy": {"retries": 2},
    }
    return {"benchmark": "killdrill", "settings": settings, "targets": list(targets)}


def test_report_section_and_verdict_from_a_drill_with_failures():
    reason = "502 backend app-3 failed: connection closed | before the response ended"
    ours = _target(
        "stickyproxy",
        1000,
        3,
        failure_reasons={reason: 3},
        failure_samples=[{"at": 22.005, "reason": reason, "after_kill": ["app-3", 0.005]}] * 3,
        proxy_counters={
            "retries_total": {"connect": 9.0},
            "retries_denied_total": {"budget": 3.0},
            "upstream_errors_total": {"connect": 9.0},
        },
    )
    haproxy = _target(
        "haproxy",
        900,
        0,
        latency_ms={"p50": 1.0, "p99": 3.0, "p999": 1004.0, "max": 1017.0},
        proxy_counters={"retries": 47, "redispatches": 31},
    )
    k = _result(_target("nginx", 1200, 0), haproxy, ours)
    text = document.killdrill_section(k, {}, document.Path("docs"))
    assert "| stickyproxy | 1,000 | **3** | 33 |" in text
    assert "| NGINX | 1,200 | **0** |" in text and "| HAProxy | 900 | **0** |" in text
    assert "closed \\| before" in text  # a | in a reason does not split the row
    assert "| stickyproxy | `stickyproxy_retries_denied_total` by reason | budget 3 |" in text
    assert "| HAProxy | stats of backend `apps`" in text and "retries 47, redispatches 31" in text
    assert "| stickyproxy | app-3 at 22.0 s | 3 | 5 |" in text
    assert "HAProxy's slowest GETs (1,017 ms at most)" in text
    (verdict,) = document.killdrill_verdicts(k)
    assert verdict.measured == "3 of 1,003 (NGINX 0, HAProxy 0)"
    assert verdict.verdict == document.MISSED


def test_report_verdict_when_stickyproxy_failed_none_or_was_not_measured():
    (met,) = document.killdrill_verdicts(_result(_target("stickyproxy", 500, 0)))
    assert (met.measured, met.verdict) == ("0 of 500", document.MET)
    skipped = {"name": "nginx", "status": "skipped", "reason": "nginx is not installed"}
    text = document.killdrill_section(
        _result(skipped, _target("stickyproxy", 500, 0)), {}, document.Path("docs")
    )
    assert "Not measured: NGINX: skipped: nginx is not installed." in text
    assert "HAProxy's slowest" not in text and "failed GETs (the first" not in text
    (none,) = document.killdrill_verdicts(None)
    assert none.verdict == document.NOT_MEASURED
