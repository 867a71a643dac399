"""The owner-features benchmark in the suite (bench/owner_features.py, `python -m bench --only
owners`): its rows paired owner vs stateless, the summary's verdict, its section of
docs/benchmarks.md and its chart drawn from a small results dict, the section kept by
`carry_over` when the benchmark is not run, and its name accepted by the command line."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from bench import __main__ as suite
from bench import document, owner_features

META = {
    "command": "python -m bench --only owners",
    "started_at": "2026-12-04 19:30 UTC",
    "cpus": 2,
    "platform": "Linux",
    "tools": {"redis": "7.0"},
    "scenarios": {
        "owners": {"status": "ok", "seconds": 150.0, "started_at": "2026-12-04 19:30 UTC"}
    },
}


def cost(count: int, **by_command: float) -> dict[str, Any]:
    return {
        "count": count,
        "round_trips": sum(by_command.values()),
        "commands": sum(by_command.values()),
        "by_command": by_command,
    }


def row(
    feature: str,
    design: str,
    redis: str,
    rps: int,
    p99: float,
    commands: dict[str, int],
    requests: int = 1000,
    round_trips: int | None = None,
    costs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    sent = sum(commands.values()) if round_trips is None else round_trips
    return {
        "kind": "request",
        "network": redis,
        "variant": f"{feature}-{design}",
        "redis": redis,
        "feature": feature,
        "design": design,
        "requests": requests,
        "rps": rps,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "non_2xx": 0,
        "socket_errors": 0,
        "redis_commands_per_request": round(sum(commands.values()) / requests, 3),
        "round_trips_per_request": round(sent / requests, 3),
        "commands_sent_per_request": round(sum(commands.values()) / requests, 3),
        "commands": commands,
        "sent": commands,
        "costs": costs
        or ({"first_request": cost(1000, EVALSHA=1.0)} if design == "sticky" else {}),
    }


def follow_row(
    design: str,
    redis: str,
    updates: int,
    p50: float,
    p99: float,
    commands: dict[str, int],
    round_trips: int,
) -> dict[str, Any]:
    costs = (
        {
            "first_request": cost(200, EVALSHA=1.0),
            "job_start": cost(200, EVALSHA=1.0),
            "job_end": cost(200, EVALSHA=1.0),
        }
        if design == "sticky"
        else {}
    )
    return {
        "kind": "follow",
        "network": redis,
        "variant": f"jobfollow-{design}",
        "redis": redis,
        "feature": "jobfollow",
        "design": design,
        "followers": 200,
        "interval_ms": 100.0,
        "updates": updates,
        "updates_per_s": updates // 5,
        "offered_per_s": 2000,
        "polls": 0,
        "errors": 0,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "redis_commands_per_update": round(sum(commands.values()) / updates, 3),
        "round_trips_per_update": round(round_trips / updates, 3),
        "commands_sent_per_update": round(sum(commands.values()) / updates, 3),
        "commands": commands,
        "sent": commands,
        "costs": costs,
    }


def results(
    sticky_cache_commands: dict[str, int] | None = None, follow: bool = False
) -> dict[str, Any]:
    rows = []
    for redis, slow in (("loopback", 1), ("relay", 2)):
        rows += [
            row("ratelimit", "sticky", redis, 12000, 3.0, {}),
            row(
                "ratelimit",
                "stateless",
                redis,
                8000 // slow,
                6.0 * slow,
                {"incr": 1000, "pexpire": 1000},
                round_trips=1000,
            ),
            row(
                "revocation",
                "sticky",
                redis,
                12000,
                3.0,
                {},
                costs={
                    "first_request": cost(1000, EVALSHA=1.0),
                    "revocation": cost(100, EVALSHA=1.0),
                },
            ),
            row(
                "revocation",
                "stateless",
                redis,
                8000 // slow,
                4.0 * slow,
                {"exists": 1000, "get": 1000},
                round_trips=1000,
                costs={"revocation": cost(100, SET=1.0)},
            ),
            row(
                "cache",
                "sticky",
                redis,
                12000,
                2.0,
                (sticky_cache_commands or {}) if redis == "relay" else {},
            ),
            row("cache", "stateless", redis, 6000 // slow, 3.0 * slow, {"get": 1000}),
        ]
        if follow:
            rows += [
                follow_row("sticky", redis, 10000, 0.5, 2.0, {}, 0),
                follow_row(
                    "stateless",
                    redis,
                    10000,
                    25.0 * slow,
                    50.0 * slow,
                    {"hset": 10000, "hgetall": 9500},
                    19500,
                ),
            ]
    return {
        "settings": {
            "duration_s": 5.0,
            "warmup_s": 1.0,
            "connections": 16,
            "users": 1000,
            "followers": 200 if follow else None,
            "progress_interval_ms": 100.0,
            "rtt_ms_target": 0.5,
            "smoke": False,
        },
        "relay": {"direct_ping_ms": 0.05, "added_rtt_ms": 0.51, "ping_samples": 300},
        "rows": rows,
    }


def test_pairs_are_owner_and_stateless_of_one_feature_and_path_with_their_ratios():
    pairs = document.owner_pairs(results())
    assert [(p["feature"], p["redis"]) for p in pairs] == [
        ("ratelimit", "loopback"),
        ("ratelimit", "relay"),
        ("revocation", "loopback"),
        ("revocation", "relay"),
        ("cache", "loopback"),
        ("cache", "relay"),
    ]
    limit_relay = pairs[1]
    assert limit_relay["owner"]["design"] == "sticky"
    assert limit_relay["stateless"]["commands"] == {"incr": 1000, "pexpire": 1000}
    assert limit_relay["rps_ratio"] == pytest.approx(12000 / 4000)
    assert limit_relay["p99_ratio"] == pytest.approx(3.0 / 12.0)


@pytest.mark.parametrize(
    ("cache_commands", "verdict", "measured"),
    [
        ({}, document.MET, "0.000 in all 6 runs; stateless 1.000 to 2.000"),
        ({"hget": 20}, document.MISSED, "at most 0.020 (cache, relay); stateless 1.000 to 2.000"),
    ],
)
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
    for what in (
        "**A rate limit on every call** (`ratelimit`)",
        "**A token-revocation check on every call** (`revocation`)",
        "**A cache hit** (`cache`)",
    ):
        assert what in text
    assert "**A poll of a running job's progress** (`jobpoll`): not measured." in text
    # round trips (counted in the app: the pipeline is one), then commands (counted by Redis)
    assert (
        "| relay, +0.51 ms | 0.000 | 1.000 | 0.000 | 2.000 | 12,000 | 4,000 | 3.00x | 3.00 "
        "| 12.00 | 0.25x |"
    ) in text
    assert (
        "| loopback | 0.000 | 1.000 | 0.000 | 1.000 | 12,000 | 6,000 | 2.00x | 2.00 | 3.00 "
        "| 0.67x |"
    ) in text
    assert "stateless `INCR` 1.000, `PEXPIRE` 1.000" in text
    assert "- **In steady state** (the timed windows): none of the owner-local versions" in text
    assert (
        "- **A revocation** (a logout; one `jti`): owner 1.000 round trips, 1.000 commands "
        "(`EVALSHA` 1.000) each, over 100; stateless"
    ) in text
    assert (
        "`ratelimit` 1.000 round trips, 1.000 commands (`EVALSHA` 1.000) each, over 1,000" in text
    )
    assert "- **A rate limit's snapshot**: at most one fenced write per half burst" in text
    assert "(`jobfollow`): not measured." in text
    assert text.rstrip().endswith("(benchmarks/owners.png)")


def test_section_has_the_websocket_against_polling_table_per_update(tmp_path: Path):
    text = document.owners_section(results(follow=True), {}, tmp_path)
    assert "(`jobfollow`)\n" in text and "200 users each have a job" in text
    # round trips / update, commands / update, updates/s, p50, p99, each WebSocket then polling
    assert (
        "| loopback | 0.000 | 1.950 | 0.000 | 1.950 | 2,000 | 2,000 | 0.50 | 25.00 | 2.00 "
        "| 50.00 | 0.04x |"
    ) in text
    assert "polling `HSET` 1.000, `HGETALL` 0.950" in text
    assert (
        "- **A job's start and its outcome**: start 1.000 round trips, 1.000 commands "
        "(`EVALSHA` 1.000) each, over 200"
    ) in text
    (verdict,) = document.owners_verdicts(results(follow=True))
    assert verdict.measured == "0.000 in all 8 runs; stateless 1.000 to 2.000"


def test_section_says_plainly_where_an_owner_version_sent_commands(tmp_path: Path):
    text = document.owners_section(results({"hget": 20}), {}, tmp_path)
    assert (
        "- **In steady state** (the timed windows): owner-local versions that still sent "
        "Redis commands: cache (relay) 0.020 per request (`HGET` 0.020)."
    ) in text


def test_report_has_the_section_and_carry_over_keeps_it_when_not_run(tmp_path: Path):
    doc = tmp_path / "benchmarks.md"
    with_owners = document.render({"owners": results()}, {}, doc, META)
    assert "## 6. Owner-local features" in with_owners
    summary = with_owners[with_owners.index("## DESIGN") : with_owners.index("## 6.")]
    assert (
        "| owner-local features: zero Redis commands per request in steady state | 0.000 in "
        "all 6 runs"
    ) in summary
    other_meta = {
        **META,
        "command": "python -m bench --only ring",
        "scenarios": {"ring": {"status": "ok", "seconds": 3.0}},
    }
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
    both = plots.owners(tmp_path / "both.png", results(follow=True))
    assert both is not None and both.stat().st_size > out.stat().st_size


def test_owners_is_a_benchmark_of_the_suite_with_its_tools_and_plans():
    assert "owners" in suite.SCENARIOS
    assert suite.build_parser().parse_args(["--only", "owners"]).only == ("owners",)
    assert {"redis-server", "wrk"} <= set(suite.required_tools(["owners"]))
    assert suite.RUNNERS["owners"] is suite.run_owners
    smoke, full = owner_features.make_plan(True), owner_features.make_plan(False)
    assert smoke.smoke and not full.smoke and smoke.duration < full.duration


# -- the figures' arithmetic (pure) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (
            {"round_trips": 3, "by_command": {"EVALSHA": 3}},
            {"round_trips": 3, "by_command": {"EVALSHA": 3}},
            {"round_trips": 0, "commands": 0, "by_command": {}},
        ),
        # a pipeline of INCRBY + PEXPIRE is one round trip and two commands
        (
            {"round_trips": 0, "by_command": {}},
            {"round_trips": 1, "by_command": {"INCRBY": 1, "PEXPIRE": 1}},
            {"round_trips": 1, "commands": 2, "by_command": {"INCRBY": 1, "PEXPIRE": 1}},
        ),
        (
            {"round_trips": 5, "by_command": {"HSET": 5}},
            {"round_trips": 9, "by_command": {"HSET": 7, "HGETALL": 2}},
            {"round_trips": 4, "commands": 4, "by_command": {"HSET": 2, "HGETALL": 2}},
        ),
    ],
)
def test_tally_delta_is_what_was_sent_between_two_reads(before, after, expected):
    assert owner_features.tally_delta(before, after) == expected


def test_per_divides_by_the_operations_and_keeps_their_count():
    delta = {"round_trips": 3, "commands": 4, "by_command": {"EVALSHA": 3, "SCRIPT": 1}}
    assert owner_features.per(delta, 2) == {
        "count": 2,
        "round_trips": 1.5,
        "commands": 2.0,
        "by_command": {"EVALSHA": 1.5, "SCRIPT": 0.5},
    }
    assert owner_features.per(delta, 0)["round_trips"] == 3.0


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([7.0], 99, 7.0),
        ([3.0, 1.0, 2.0], 50, 2.0),
        (list(range(1, 101)), 99, 99),
        (list(range(1, 101)), 50, 50),
        (list(range(1, 101)), 100, 100),
    ],
)
def test_percentile_is_nearest_rank(values, q, expected):
    assert owner_features.percentile(values, q) == expected


def test_an_update_is_a_new_step_seen_inside_the_window():
    stats = owner_features.FollowStats()
    now = time.monotonic()
    last = owner_features._seen(stats, False, f"1 {now!r}", -1)
    assert (last, stats.updates) == (1, 0)  # before the window: known, not counted
    last = owner_features._seen(stats, True, f"1 {now!r}", last)
    assert stats.updates == 0  # a poll that finds no new step
    last = owner_features._seen(stats, True, f"3 {now - 0.02!r}", last)
    assert (last, stats.updates) == (3, 1) and 20 <= stats.latencies_ms[0] < 1000


# -- the apps, counted for real (a redis-server, the relay, wrk) ---------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("wrk")), reason="needs redis-server and wrk"
)
def test_counted_figures_mean_what_they_say():
    """The WebSocket follower costs Redis nothing per update while polling costs at least a
    command and a round trip; a pipeline is one round trip; a sticky check sends nothing per
    request; the one-off costs are the single fenced writes the library states."""
    plan = owner_features.Plan(
        duration=1.0,
        warmup=0.0,
        connections=2,
        rtt_ms=0.5,
        smoke=True,
        users=20,
        followers=5,
        variants=(
            "ratelimit-stateless",
            "revocation-sticky",
            "jobfollow-sticky",
            "jobfollow-stateless",
        ),
    )
    rows = {(r["variant"], r["redis"]): r for r in owner_features.run(plan, log=lambda _line: None)}
    assert len(rows) == 8
    for path in (owner_features.LOOPBACK, owner_features.RELAY):
        push, poll = rows[("jobfollow-sticky", path)], rows[("jobfollow-stateless", path)]
        assert push["updates"] > 0 and push["errors"] == 0
        assert push["redis_commands_per_update"] == 0 and push["round_trips_per_update"] == 0
        assert push["latency_p50_ms"] < owner_features.PROGRESS_INTERVAL * 1000
        assert poll["updates"] > 0 and poll["errors"] == 0
        assert poll["redis_commands_per_update"] >= 1 and poll["round_trips_per_update"] >= 1
        assert {"hset", "hgetall"} <= set(poll["commands"]) and {"HSET", "HGETALL"} <= set(
            poll["sent"]
        )
        limit = rows[("ratelimit-stateless", path)]
        assert limit["redis_commands_per_request"] == pytest.approx(2, abs=0.05)
        assert limit["round_trips_per_request"] == pytest.approx(1, abs=0.03)
        check = rows[("revocation-sticky", path)]
        assert check["redis_commands_per_request"] == 0 and check["round_trips_per_request"] == 0
        assert check["costs"]["revocation"]["by_command"].get("EVALSHA", 0) >= 1
        assert check["costs"]["first_request"]["by_command"].get("EVALSHA", 0) >= 1
        for one_off in ("job_start", "job_end"):
            assert push["costs"][one_off]["by_command"] == {"EVALSHA": 1.0}
