"""The owner-features benchmark in the suite (bench/owner_features.py, `python -m bench --only
owners`): its rows paired owner vs stateless, the summary's verdict, its section of
docs/benchmarks.md and its chart drawn from a small results dict, the section kept by
`carry_over` when the benchmark is not run, and its name accepted by the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as suite
from bench import document, owner_features

META = {"command": "python -m bench --only owners", "started_at": "2026-12-04 19:30 UTC",
        "cpus": 2, "platform": "Linux", "tools": {"redis": "7.0"},
        "scenarios": {"owners": {"status": "ok", "seconds": 150.0,
                                 "started_at": "2026-12-04 19:30 UTC"}}}


def row(feature: str, design: str, redis: str, rps: int, p99: float,
        commands: dict[str, int], requests: int = 1000) -> dict[str, Any]:
    return {"network": redis, "variant": f"{feature}-{design}", "redis": redis,
            "feature": feature, "design": design, "requests": requests, "rps": rps,
            "p50_ms": p99 / 2, "p99_ms": p99, "non_2xx": 0, "socket_errors": 0,
            "redis_commands_per_request": round(sum(commands.values()) / requests, 3),
            "commands": commands}


def results(sticky_cache_commands: dict[str, int] | None = None) -> dict[str, Any]:
    rows = []
    for redis, slow in (("loopback", 1), ("relay", 2)):
        rows += [row("ratelimit", "sticky", redis, 12000, 3.0, {}),
                 row("ratelimit", "stateless", redis, 8000 // slow, 6.0 * slow,
                     {"incr": 1000, "pexpire": 1000}),
                 row("revocation", "sticky", redis, 12000, 3.0, {}),
                 row("revocation", "stateless", redis, 8000 // slow, 4.0 * slow,
                     {"exists": 1000, "get": 1000}),
                 row("cache", "sticky", redis, 12000, 2.0,
                     (sticky_cache_commands or {}) if redis == "relay" else {}),
                 row("cache", "stateless", redis, 6000 // slow, 3.0 * slow, {"get": 1000})]
    return {"settings": {"duration_s": 5.0, "warmup_s": 1.0, "connections": 16, "users": 1000,
                         "rtt_ms_target": 0.5, "smoke": False},
            "relay": {"direct_ping_ms": 0.05, "added_rtt_ms": 0.51, "ping_samples": 300},
            "rows": rows}


def test_pairs_are_owner_and_stateless_of_one_feature_and_path_with_their_ratios():
    pairs = document.owner_pairs(results())
    assert [(p["feature"], p["redis"]) for p in pairs] == [
        ("ratelimit", "loopback"), ("ratelimit", "relay"), ("revocation", "loopback"),
        ("revocation", "relay"), ("cache", "loopback"), ("cache", "relay")]
    limit_relay = pairs[1]
    assert limit_relay["owner"]["design"] == "sticky"
    assert limit_relay["stateless"]["commands"] == {"incr": 1000, "pexpire": 1000}
    assert limit_relay["rps_ratio"] == pytest.approx(12000 / 4000)
    assert limit_relay["p99_ratio"] == pytest.approx(3.0 / 12.0)


@pytest.mark.parametrize(("cache_commands", "verdict", "measured"), [
    ({}, document.MET, "0.000 in all 6 runs; stateless 1.000 to 2.000"),
    ({"hget": 20}, document.MISSED, "at most 0.020 (cache, relay); stateless 1.000 to 2.000"),
])
def test_verdict_is_met_only_when_no_owner_row_sent_a_command(cache_commands, verdict, measured):
    (v,) = document.owners_verdicts(results(cache_commands))
    assert v.target.startswith("owner-local features")
    assert (v.verdict, v.measured) == (verdict, measured)


def test_verdict_without_results_is_not_measured():
    assert [v.verdict for v in document.owners_verdicts(None)] == [document.NOT_MEASURED]


def test_section_has_a_table_per_feature_with_both_paths_and_the_chart(tmp_path: Path):
    images = {"owners": tmp_path / "benchmarks" / "owners.png"}
    text = document.owners_section(results(), images, tmp_path)
    assert text.startswith("## 6. Owner-local features")
    assert "(median of 300 `PING`s; 0.050 ms direct)" in text
    for what in ("**A rate limit on every call** (`ratelimit`)",
                 "**A token-revocation check on every call** (`revocation`)",
                 "**A cache hit** (`cache`)"):
        assert what in text
    assert "**A poll of a running job's progress** (`jobpoll`): not measured." in text
    assert ("| relay, +0.51 ms | 0.000 | 2.000 | 12,000 | 4,000 | 3.00x | 3.00 | 12.00 | 0.25x |"
            in text)
    assert "| loopback | 0.000 | 1.000 | 12,000 | 6,000 | 2.00x | 2.00 | 3.00 | 0.67x |" in text
    assert "stateless `INCR` 1.000, `PEXPIRE` 1.000" in text
    assert "none of the owner-local versions sent Redis a command" in text
    assert text.rstrip().endswith("(benchmarks/owners.png)")


def test_section_says_plainly_where_an_owner_version_sent_commands(tmp_path: Path):
    text = document.owners_section(results({"hget": 20}), {}, tmp_path)
    assert ("Owner-local versions that still sent Redis commands in steady state: cache (relay) "
            "0.020 per request (`HGET` 0.020).") in text


def test_report_has_the_section_and_carry_over_keeps_it_when_not_run(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    with_owners = document.render({"owners": results()}, {}, doc, META)
    assert "## 6. Owner-local features" in with_owners
    summary = with_owners[with_owners.index("## DESIGN"):with_owners.index("## 6.")]
    assert ("| owner-local features: zero Redis commands per request in steady state | 0.000 in "
            "all 6 runs") in summary
    other_meta = {**META, "command": "python -m bench --only ring",
                  "scenarios": {"ring": {"status": "ok", "seconds": 3.0}}}
    without = document.render({}, {}, doc, other_meta)
    kept = document.carry_over(without, with_owners, {"ring"})
    assert kept.index("## 6. Owner-local features") < kept.index("## Reproducing")
    assert "| 0.000 | 2.000 | 12,000 | 4,000 | 3.00x |" in kept
    owner_rows = [ln for ln in kept.splitlines() if ln.startswith("| owner-local features")]
    assert len(owner_rows) == 1 and document.NOT_MEASURED not in owner_rows[0]


def test_chart_is_drawn_from_the_rows(tmp_path: Path):
    from bench import plots
    out = plots.owners(tmp_path / "owners.png", results())
    assert out is not None and out.stat().st_size > 10_000
    assert plots.owners(tmp_path / "none.png", {"rows": []}) is None


def test_owners_is_a_benchmark_of_the_suite_with_its_tools_and_plans():
    assert "owners" in suite.SCENARIOS
    assert suite.build_parser().parse_args(["--only", "owners"]).only == ("owners",)
    assert {"redis-server", "wrk"} <= set(suite.required_tools(["owners"]))
    assert suite.RUNNERS["owners"] is suite.run_owners
    smoke, full = owner_features.make_plan(True), owner_features.make_plan(False)
    assert smoke.smoke and not full.smoke and smoke.duration < full.duration
