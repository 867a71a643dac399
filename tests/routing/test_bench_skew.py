"""The skew benchmark's simulation (bench/skew.py) in its smoke size: the figures it reports
mean what they say. Pure: no sockets, about a second."""

from __future__ import annotations

import json

import pytest

from bench import skew


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return skew.run(True, lambda _msg: None, tmp_path_factory.mktemp("skew"))


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
    assert no_ramp[first] == max(no_ramp)          # all at once, the moment it is back
    assert with_ramp[first] < no_ramp[first] / 5
    assert max(with_ramp) < max(no_ramp)
    assert fb["summary"]["ramp"]["first_5_seconds"] < fb["summary"]["no_ramp"]["first_5_seconds"]


def test_report_renders_the_skew_section_from_its_results(result, tmp_path):
    from bench import document
    doc = tmp_path / "benchmarks.md"
    text = document.skew_section(result, {}, doc.parent)
    assert text.startswith("## 7. Skewed users")
    # one row per balance factor, the off row first, shares as the results say
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")][1:1 + len(
        result["balance"]["runs"])]
    assert [r.split(" | ")[0] for r in rows] == ["| off", "| 2", "| 1.5", "| 1.25"]
    first = result["balance"]["runs"][0]["share"]["app-1"]
    assert f"{first * 100:.1f}%" in rows[0]
    s = result["failback"]["summary"]
    assert f"| no ramp | {s['no_ramp']['rehydrations']} | {s['no_ramp']['peak_per_s']} |" in text
    # the section is one of the report's, kept when a later run measures others only
    assert document._section_owner(text) == "skew"
