"""The skew benchmark (bench/skew.py) in its smoke size: the figures it reports mean what they
say. The simulation is pure (no sockets, about a second); the measured part runs the real
proxy, backends and wrk (about 20 s, marked slow)."""

from __future__ import annotations

import json

import pytest

from bench import skew


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return skew.run(True, lambda _msg: None, tmp_path_factory.mktemp("skew"), measure=False)


def test_result_is_json_with_a_chart(result):
    json.dumps(result)
    if result["chart"] is None:
        pytest.importorskip("matplotlib")
    else:
        assert result["chart"].endswith("skew.png")


def test_balance_factor_trades_moves_for_a_lower_peak(result):
    runs = {r["factor"]: r for r in result["balance"]["runs"]}
    assert runs[None]["off_owner_share"] == 0 and runs[None]["user_moves"] == 0
    for r in runs.values():
        assert sum(r["share"].values()) == pytest.approx(1.0)
    # a tighter factor: more requests off their owner, a lower busiest-backend peak
    assert 0 < runs[1.5]["off_owner_share"] < runs[1.25]["off_owner_share"]
    assert runs[1.5]["user_moves"] < runs[1.25]["user_moves"]
    assert runs[1.25]["busiest_over_mean"]["p99"] < runs[None]["busiest_over_mean"]["p99"]
    assert runs[1.25]["max_share_over_mean"] < runs[None]["max_share_over_mean"]


def test_ramp_spreads_the_rehydrations_of_a_recovered_backend(result):
    fb = result["failback"]
    no_ramp, with_ramp = fb["per_second"]["no_ramp"], fb["per_second"]["ramp"]
    first = int(fb["recovery_at"])
    assert sum(no_ramp[:first]) == sum(with_ramp[:first]) == 0
    assert no_ramp[first] == max(no_ramp)  # all at once, the moment it is back
    assert with_ramp[first] < no_ramp[first] / 5
    assert max(with_ramp) < max(no_ramp)
    assert fb["summary"]["ramp"]["first_5_seconds"] < fb["summary"]["no_ramp"]["first_5_seconds"]


def test_report_renders_the_skew_section_from_its_results(result, tmp_path):
    from bench import document

    doc = tmp_path / "benchmarks.md"
    text = document.skew_section(result, {}, doc.parent)
    assert text.startswith("## 7. Skewed users")
    # one row per balance factor, the off row first, shares as the results say
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")][
        1 : 1 + len(result["balance"]["runs"])
    ]
    assert [r.split(" | ")[0] for r in rows] == ["| off", "| 2", "| 1.5", "| 1.25"]
    first = result["balance"]["runs"][0]["share"]["app-1"]
    assert f"{first * 100:.1f}%" in rows[0]
    s = result["failback"]["summary"]
    assert f"| no ramp | {s['no_ramp']['rehydrations']} | {s['no_ramp']['peak_per_s']} |" in text
    # the section is one of the report's, kept when a later run measures others only
    assert document._section_owner(text) == "skew"


# -- measured through the real proxy -----------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import shutil

    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    return skew.run(True, lambda _msg: None, tmp_path_factory.mktemp("skew-real"))


@pytest.mark.slow
def test_measured_counts_are_the_proxys_and_agree_with_the_backends(measured):
    real = measured["real"]
    json.dumps(measured)
    for r in real["balance"]["runs"]:
        assert r["load"]["non_2xx"] == 0 and r["load"]["socket_errors"] == 0
        # wrk stops with at most one request per connection unanswered or uncounted
        slack = real["balance"]["connections"]
        assert abs(r["requests"] - r["load"]["requests"]) <= slack
        for b in skew.BACKENDS:
            assert abs(r["backend_requests"][b] - r["share"][b] * r["requests"]) <= slack
        assert sum(r["route_decisions"].values()) == pytest.approx(r["requests"], abs=slack)
        assert r["inflight_samples"] > 0


@pytest.mark.slow
def test_measured_balance_factor_spills_within_the_bound(measured):
    runs = {r["factor"]: r for r in measured["real"]["balance"]["runs"]}
    off, bounded = runs[None], runs[1.25]
    # off: every request to its owner, so no user is served by two backends
    assert off["spill_share"] == 0 and off["spills"] == 0
    assert off["users_on_two_backends"] == 0
    # on: spills, each counted as a decision and by the backend moved off, and each user
    # that moved served by a second backend
    assert bounded["spills"] > 0
    assert bounded["route_decisions"]["spill"] == bounded["spills"]
    assert 0 < bounded["users_on_two_backends"] <= bounded["spills"]
    # no backend held more than the bound: ceil(1.25 x (total + 1) / 3), total <= connections
    cap = -(-5 * (measured["real"]["balance"]["connections"] + 1) // 12)
    assert max(bounded["backend_peak_inflight"].values()) <= cap
    # the hottest user's owner gives up some of its share
    hot = measured["balance"]["hottest_user_owner"]
    assert bounded["share"][hot] < off["share"][hot]


@pytest.mark.slow
def test_measured_ramp_spreads_the_rehydrations_of_a_recovered_backend(measured):
    fb = measured["real"]["failback"]
    no_ramp, with_ramp = fb["runs"]["no_ramp"], fb["runs"]["ramp"]
    for r in (no_ramp, with_ramp):
        assert r["load"]["non_2xx"] == 0 and r["load"]["socket_errors"] == 0
        assert r["rehydrations"] == sum(r["per_second"]) > 0
    # without a ramp the users come back at once; with one, a slice at a time
    assert no_ramp["first_second"] == no_ramp["peak_per_s"]
    assert with_ramp["first_second"] < no_ramp["first_second"] / 2
    assert with_ramp["median_s"] > no_ramp["median_s"]
    assert fb["peak_reduction"] > 1


@pytest.mark.slow
def test_report_renders_the_measured_part(measured, tmp_path):
    from bench import document

    text = document.skew_section(measured, {}, tmp_path)
    assert "### Measured through the proxy" in text
    off = measured["real"]["balance"]["runs"][0]
    shares = " / ".join(f"{off['share'][b] * 100:.1f}%" for b in skew.BACKENDS)
    assert f"| off | {off['load']['rps']:,.0f} | {shares} |" in text
    nr = measured["real"]["failback"]["runs"]["no_ramp"]
    assert f"| no ramp | {nr['rehydrations']} | {nr['peak_per_s']} | {nr['first_second']} |" in text
