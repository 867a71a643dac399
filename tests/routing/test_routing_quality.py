"""How the router, the backend table, health and the views apply #22's pure parts: ramps
(gradual failback, slow start), the bounded-load candidates, hot-key windows and request
shares. Pure: no sockets; clocks are passed in."""

from __future__ import annotations

import pytest

from stickyproxy.config import ConfigError, loads
from stickyproxy.control import views
from stickyproxy.control.health import Health
from stickyproxy.control.metrics import RequestShare
from stickyproxy.control.observe import ControlEvents
from stickyproxy.routing.hotkeys import HotKeys, Recent, key_digest
from stickyproxy.routing.ramp import POINT_SPACE, Ramp, key_point
from stickyproxy.routing.router import has_returned
from stickyproxy.routing.table import BackendTable

KEYS = [f"user-{i}" for i in range(4000)]


def config(ids=("a", "b", "c"), **sections) -> str:
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [
            f"{k} = {v!r}"
            if isinstance(v, str)
            else f"{k} = {str(v).lower()}"
            if isinstance(v, bool)
            else f"{k} = {v}"
            for k, v in values.items()
        ]
    for i, bid in enumerate(ids):
        out += ["[[backends]]", f'id = "{bid}"', f'url = "http://127.0.0.1:{1000 + i}"']
    return "\n".join(out) + "\n"


def table(ids=("a", "b", "c"), **sections) -> BackendTable:
    return BackendTable(loads(config(ids, **sections)))


def share(point: int) -> float:
    return point / POINT_SPACE


# -- the owner ramping -----------------------------------------------------------------------


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.5, 0.9])
def test_a_ramping_owner_gets_exactly_the_keys_whose_point_is_below_the_progress(progress):
    t = table()
    r = t.router
    t.states["a"].ramp = Ramp(100.0, 10.0)
    now = 100.0 + 10.0 * progress
    owned = [k for k in KEYS if r.ring.owner(k) == "a"]
    for k in owned:
        route = r.route(k, now)
        if share(key_point(k)) < progress:
            assert (route.backend.id, route.kind) == ("a", "primary"), k
        else:
            # not returned: where it would be with a down, i.e. its next backend
            assert route.backend.id == r.ring.preference(k)[1] and route.kind == "failover", k
    back = sum(r.route(k, now).backend.id == "a" for k in owned) / len(owned)
    assert abs(back - progress) < 0.04, back


def test_keys_of_other_backends_never_move_during_a_ramp():
    t = table()
    r = t.router
    before = {k: r.route(k, 0.0).backend.id for k in KEYS}
    t.states["a"].ramp = Ramp(0.0, 10.0)
    for k in KEYS:
        if r.ring.owner(k) != "a":
            assert r.route(k, 5.0).backend.id == before[k]


def test_a_returned_key_stays_returned_and_the_ramp_is_dropped_when_it_ends():
    t = table()
    r = t.router
    st = t.states["a"]
    st.ramp = Ramp(0.0, 10.0)
    owned = [k for k in KEYS if r.ring.owner(k) == "a"][:300]
    seen: dict[str, float] = {}
    for step in range(100):
        now = step / 10
        for k in owned:
            on_a = r.route(k, now).backend.id == "a"
            if k in seen:
                assert on_a, (k, now)  # monotone: never bounces back
            elif on_a:
                seen[k] = now
    # by 9.9 s every key whose point is below 0.99, each within 0.1 s of its return time
    assert set(seen) == {k for k in owned if share(key_point(k)) < 0.99}
    assert all(0 <= t - 10.0 * share(key_point(k)) <= 0.1 + 1e-9 for k, t in seen.items())
    assert st.ramp is not None
    assert r.route(owned[0], 10.0).kind == "primary" and st.ramp is None  # ended: cleared
    assert st.state(10.0) == "up"


def test_a_ramping_failover_target_takes_a_key_only_once_it_has_returned():
    t = table(("a", "b", "c", "d"))
    r = t.router
    t.states["a"].healthy = False
    keys = [k for k in KEYS if r.ring.owner(k) == "a"]
    for k in keys[:200]:
        pref = r.ring.preference(k)
        second, third = t.states[pref[1]], pref[2]
        second.ramp = Ramp(0.0, 10.0)
        got = r.route(k, 5.0)
        want = pref[1] if share(key_point(k)) < 0.5 else third
        assert (got.backend.id, got.kind) == (want, "failover"), k
        # retries: the ramping backend the key has not returned to comes last
        assert [b.id for b in r.alternatives(k, (), 5.0)] == (
            pref[1:] if want == pref[1] else [pref[2], pref[3], pref[1]]
        )
        second.ramp = None


def test_a_key_with_only_ramping_backends_left_is_still_routed():
    t = table(("a", "b"))
    r = t.router
    t.states["a"].healthy = False
    t.states["b"].ramp = Ramp(0.0, 10.0)
    k = next(k for k in KEYS if r.ring.owner(k) == "a" and share(key_point(k)) > 0.5)
    got = r.route(k, 1.0)
    assert got.backend.id == "b" and got.kind == "failover"


def test_a_ramp_waits_for_failback_delay_then_runs():
    t = table(health={"failback_delay": "2s", "failback_ramp": "10s"})
    h = Health(t, ControlEvents(t), active=False)
    st = t.states["a"]
    h.set_health(st, False, "test")
    h.set_health(st, True, "test")
    ramp = st.ramp
    assert ramp is not None and ramp.duration == 10.0
    assert abs(ramp.start - st.failback_until) < 1e-9  # the delay first, then the ramp
    assert st.state(ramp.start - 0.5) == "failback-wait"
    assert st.state(ramp.start + 0.5) == "ramping"
    h.set_health(st, False, "test")
    assert st.ramp is None and st.failback_until == 0.0


def test_a_ramp_reaches_another_process_relative_to_the_message():
    t1 = table(health={"failback_delay": "1s", "failback_ramp": "30s"})
    t2 = table(health={"failback_delay": "1s", "failback_ramp": "30s"})
    h1 = Health(t1, ControlEvents(t1), active=False)
    h2 = Health(t2, ControlEvents(t2), active=False)
    a1, a2 = t1.states["a"], t2.states["a"]
    h1.set_health(a1, False, "x")
    h1.set_health(a1, True, "x")
    import time

    now = time.monotonic()
    data = h1.ramp_state(a1, now)
    assert data is not None and data["ramp"] == 30.0
    h2.follow_ramp(a2, data)
    # same monotonic clock here: the two agree to within the time between the two calls
    assert abs(a2.ramp.start - a1.ramp.start) < 0.05
    assert abs(a2.failback_until - a1.failback_until) < 0.05
    h2.follow_ramp(a2, None)
    assert a2.ramp is None and a2.failback_until == 0.0
    assert h1.ramp_state(t1.states["b"], now) is None


def test_no_ramp_without_failback_ramp():
    t = table()
    h = Health(t, ControlEvents(t), active=False)
    st = t.states["a"]
    h.set_health(st, False, "x")
    h.set_health(st, True, "x")
    assert st.ramp is None and st.failback_until == 0.0


# -- slow start on reload ----------------------------------------------------------------------


@pytest.mark.parametrize("ramp,expect", [("0s", False), ("20s", True)])
def test_a_backend_added_by_a_reload_ramps_only_when_configured(ramp, expect):
    t = table(("a", "b"), health={"failback_ramp": ramp})
    assert all(st.ramp is None for st in t.states.values())  # first config: no ramp
    diff = t.apply(loads(config(("a", "b", "c"), health={"failback_ramp": ramp})))
    assert diff.added == ("c",)
    assert (t.states["c"].ramp is not None) is expect
    assert t.states["a"].ramp is None and t.states["b"].ramp is None
    if expect:
        assert t.states["c"].ramp.duration == 20.0
        assert t.ramps(t.states["c"].ramp.start + 5.0)["c"] == pytest.approx(0.25)


# -- bounded load's candidates ---------------------------------------------------------------


def test_spill_order_is_the_preference_list_without_unusable_or_unreturned_backends():
    t = table(("a", "b", "c", "d"))
    r = t.router
    k = next(k for k in KEYS if share(key_point(k)) > 0.5)
    pref = r.ring.preference(k)
    first = t.states[pref[0]]
    assert [b.id for b in r.spill_order(k, first, 0.0)] == pref
    t.states[pref[1]].healthy = False
    t.states[pref[2]].ramp = Ramp(0.0, 10.0)  # k has not returned at 1.0
    assert [b.id for b in r.spill_order(k, first, 1.0)] == [pref[0], pref[3]]
    # a failover target first: it leads, the others follow in preference order
    assert [b.id for b in r.spill_order(k, t.states[pref[3]], 1.0)] == [pref[3], pref[0]]


@pytest.mark.parametrize("factor,pct", [(0, 0), (1.25, 125), (2, 200), (10, 1000)])
def test_balance_factor_reaches_the_router_as_a_percentage(factor, pct):
    assert table(routing={"balance_factor": factor}).router.balance_pct == pct


@pytest.mark.parametrize("bad", [0.5, 0.99, 10.5, 125, -1, True, "1.25"])
def test_a_bad_balance_factor_is_refused_with_its_key_path(bad):
    with pytest.raises(ConfigError) as e:
        loads(config(routing={"balance_factor": bad}))
    assert "routing.balance_factor:" in e.value.render()


@pytest.mark.parametrize(
    "section,bad",
    [
        ({"max_keys": 2}, "hotkeys.max_keys:"),
        ({"sample_every": 0}, "hotkeys.sample_every:"),
        ({"window": "10ms"}, "hotkeys.window:"),
        ({"windows": "1m"}, "hotkeys.windows: unknown key"),
    ],
)
def test_bad_hotkeys_settings_are_refused_with_their_key_path(section, bad):
    with pytest.raises(ConfigError) as e:
        loads(config(hotkeys=section))
    assert bad in e.value.render()


# -- hot keys ----------------------------------------------------------------------------------


def test_the_table_keeps_its_hot_keys_across_reloads_unless_their_settings_change():
    t = table()
    hot = t.hotkeys
    assert hot is not None and t.router.hotkeys is hot and not hot.raw
    t.apply(loads(config(("a", "b"))))
    assert t.hotkeys is hot and t.router.hotkeys is hot
    t.apply(loads(config(("a", "b"), logging={"access_key": "raw"})))
    assert t.hotkeys is not hot and t.hotkeys.raw
    t.apply(loads(config(("a", "b"), hotkeys={"enabled": False})))
    assert t.hotkeys is None and t.router.hotkeys is None


# (now, expected keys with their counts in the view) after offers at 0..9 s of "x" and at
# 10..14 s of "y" (those up to ``now``), windows of 10 s, sampling every request
@pytest.mark.parametrize(
    "now,expect",
    [
        (9.5, {"x": 10}),
        (14.5, {"x": 10, "y": 5}),  # previous window (x) and the current one (y)
        (25.0, {"y": 5}),  # x's window is two windows old
        (40.0, {}),  # nothing for more than a window: both dropped
    ],
)
def test_hot_keys_are_counted_over_the_last_one_to_two_windows(now, expect):
    rec = Recent(max_keys=8, sample_every=1, raw=True, window=10.0, now=0.0)
    for s in range(15):
        if s <= now:
            rec.sampled("x" if s < 10 else "y", float(s))
    view = rec.view(now)
    assert {h.key: h.requests for h in view.top(10)} == expect


def test_hot_keys_sample_and_hash_unless_raw():
    rec = Recent(max_keys=8, sample_every=4, window=60.0)
    for _ in range(10):  # ten sampled requests, each standing for four
        rec.sampled("alice", 1.0)
    top = rec.view(1.0).top(1)
    assert top[0].key == key_digest("alice") and top[0].requests == 40


@pytest.mark.parametrize(
    "sample_every, offered, sampled_positions",
    [
        (1, 3, [1, 2, 3]),
        (4, 10, [4, 8]),
        (16, 15, []),
        (16, 32, [16, 32]),
    ],
)
def test_the_router_samples_one_request_in_n_by_a_counter(sample_every, offered, sampled_positions):
    t = table(hotkeys={"sample_every": sample_every}, logging={"access_key": "raw"})
    for i in range(1, offered + 1):
        t.router.count_key(f"k{i}", 1.0)
    h = t.router.hotkeys.current
    assert sorted(e.key for e in h.top(100)) == sorted(f"k{i}" for i in sampled_positions)
    assert h.total == sample_every * len(sampled_positions)
    assert all(e.requests == sample_every for e in h.top(100))


def test_the_hot_keys_view_ranks_and_names_owners_of_raw_keys():
    t = table(logging={"access_key": "raw"})
    sketch = HotKeys(16, 1, raw=True)
    for key, n in (("hot", 30), ("warm", 10)):
        sketch.add(key, n)
    doc = views.hotkeys_view(sketch, 1, t.router)
    assert doc["hashed"] is False and doc["requests"] == 40
    assert doc["keys"] == [
        {
            "key": "hot",
            "requests": 30,
            "upper": 30,
            "share": 0.75,
            "owner": t.router.ring.owner("hot"),
        }
    ]
    assert views.hotkeys_view(None, 5, t.router) == {"enabled": False, "keys": []}


# -- request share -----------------------------------------------------------------------------


def test_request_share_is_over_the_requests_since_the_previous_read():
    rs = RequestShare()
    assert rs.update({("a", "2xx"): 30, ("b", "2xx"): 10, ("none", "5xx"): 5}) == {
        ("a",): 0.75,
        ("b",): 0.25,
    }
    assert rs.update({("a", "2xx"): 30, ("b", "2xx"): 20, ("b", "5xx"): 10}) == {
        ("a",): 0.0,
        ("b",): 1.0,
    }
    assert rs.update({("a", "2xx"): 30, ("b", "2xx"): 20, ("b", "5xx"): 10}) == {}


# -- the views ---------------------------------------------------------------------------------


def test_route_view_says_whether_and_when_a_key_returns():
    t = table(health={"failback_ramp": "10s"})
    r = t.router
    st = t.states["a"]
    st.ramp = Ramp(100.0, 10.0)
    late = next(k for k in KEYS if r.ring.owner(k) == "a" and share(key_point(k)) > 0.6)
    doc = views.route_view(r, late, 103.0)
    assert doc["route"] == "failover" and doc["chosen"] == r.ring.preference(late)[1]
    assert doc["states"]["a"] == "ramping"
    ramp = doc["ramps"]["a"]
    assert ramp["returned"] is False and ramp["progress"] == pytest.approx(0.3)
    assert ramp["returns_in"] == pytest.approx(10.0 * share(key_point(late)) - 3.0, abs=1e-3)
    later = views.route_view(r, late, 100.0 + 10.0 * share(key_point(late)) + 0.01)
    assert later["route"] == "primary" and later["ramps"]["a"]["returned"] is True
    assert "ramps" not in views.route_view(r, late, 111.0)  # ended
    assert has_returned(st, late, 111.0) and st.ramp is None


def test_route_command_says_when_a_key_returns(tmp_path, capsys):
    from stickyproxy import cli

    path = tmp_path / "p.toml"
    path.write_text(config(health={"failback_delay": "2s", "failback_ramp": "30s"}))
    assert cli.main(["route", "-c", str(path), "--json", "alice"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    at = share(key_point("alice"))
    assert doc["returns"] == {"at_progress": round(at, 6), "after": round(2 + 30 * at, 3)}
    assert cli.main(["route", "-c", str(path), "alice"]) == 0
    line = capsys.readouterr().out
    assert f"returns {round(2 + 30 * at, 3):g}s after its backend recovers" in line
    # without a ramp the output is as it always was
    path.write_text(config())
    assert cli.main(["route", "-c", str(path), "--json", "alice"]) == 0
    assert "returns" not in json.loads(capsys.readouterr().out)
