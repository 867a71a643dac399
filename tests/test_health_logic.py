"""Health decisions as pure state machines, and routing through health states (P1-P3)."""

import pytest

from stickyproxy.config import Passive, loads
from stickyproxy.control.health import (
    ActiveState,
    PassiveState,
    check_ok,
    ejection_time,
    may_eject,
)
from stickyproxy.control.process import build_process
from stickyproxy.routing.router import BackendState, Router


@pytest.mark.parametrize(
    "results, rise, fall, changes",
    [
        # starts up; fall=3 consecutive failures flip it down
        ("FFF", 2, 3, [None, None, "down"]),
        ("FFSFFF", 2, 3, [None, None, None, None, None, "down"]),
        # down needs rise=2 consecutive successes
        ("FFFSS", 2, 3, [None, None, "down", None, "up"]),
        ("FFFSFSS", 2, 3, [None, None, "down", None, None, None, "up"]),
        ("S", 1, 1, [None]),
        ("FSFS", 1, 1, ["down", "up", "down", "up"]),
    ],
)
def test_active_rise_fall(results, rise, fall, changes):
    a = ActiveState()
    assert [a.record(r == "S", rise, fall) for r in results] == changes


def test_passive_ejection_grows_and_is_capped():
    cfg = Passive(consecutive_failures=3, base_ejection=10.0, max_ejection=25.0)
    p = PassiveState()
    now = 0.0
    ends = []
    for _ in range(4):
        assert p.record(False, now, cfg, True) is None
        assert p.record(False, now, cfg, True) is None
        until = p.record(False, now, cfg, True)
        ends.append(until - now)
        now = until  # the ejection ran out
    assert ends == [10.0, 20.0, 25.0, 25.0]
    assert [ejection_time(n, cfg) for n in (1, 2, 3)] == [10.0, 20.0, 25.0]


def test_passive_success_resets_and_cap_blocks():
    cfg = Passive(consecutive_failures=2, base_ejection=5.0, max_ejection=50.0)
    p = PassiveState()
    p.record(False, 0, cfg, True)
    p.record(True, 0, cfg, True)
    assert p.record(False, 0, cfg, True) is None  # the success reset the streak
    assert p.record(False, 0, cfg, False) is None  # the cap forbids ejecting
    assert p.ejections == 0


def test_a_success_between_failures_resets_the_count_through_the_observer():
    # the observer skips passive health for a success on a clean backend: the skip must
    # not swallow the success that ends a run of failures
    cfg = loads("""
[listen]
port = 0
[admin]
enabled = false
[health]
enabled = false
[passive]
consecutive_failures = 3
max_ejected_percent = 100
[[backends]]
id = "a"
url = "http://127.0.0.1:1"
""")
    proc = build_process(cfg, "worker")
    obs, health = proc.observer, proc.health
    health.reconfigure()
    st = proc.table.states["a"]
    for outcome in ["ok", "fail", "fail", "ok", "fail", "fail", "ok", "ok"]:
        if outcome == "ok":
            obs.upstream_ok(st, 200)
        else:
            obs.upstream_error(st, "reset")
        assert st.passive_clean == (outcome == "ok")
    assert st.ejected_until == 0.0  # never three failures in a row
    for _ in range(3):
        obs.upstream_error(st, "reset")
    assert st.ejected_until > 0.0


@pytest.mark.parametrize(
    "ejected, total, pct, ok",
    [
        (0, 3, 50, True),  # one of three ejected is 33% <= 50%
        (0, 4, 50, True),
        (1, 4, 50, True),
        (2, 4, 50, False),
        (0, 1, 100, True),
        (0, 0, 50, False),
        (0, 10, 10, True),
        (1, 10, 10, False),
    ],
)
def test_may_eject(ejected, total, pct, ok):
    assert may_eject(ejected, total, pct) is ok


@pytest.mark.parametrize(
    "status, ok",
    [(200, True), (399, True), (400, False), (None, False), (503, False), (100, False)],
)
def test_check_ok(status, ok):
    assert check_ok(status, (200, 399)) is ok


CFG = """
[health]
panic_threshold = 50
[[backends]]
id = "a"
url = "http://127.0.0.1:1"
[[backends]]
id = "b"
url = "http://127.0.0.1:2"
[[backends]]
id = "c"
url = "http://127.0.0.1:3"
[[backends]]
id = "d"
url = "http://127.0.0.1:4"
"""


@pytest.fixture
def router():
    cfg = loads(CFG)
    return Router(cfg, {b.id: BackendState(b) for b in cfg.backends})


KEYS = [f"user-{i}" for i in range(3000)]


def test_unusable_states_fail_over_along_the_preference_list(router):
    for setter in (
        lambda s: setattr(s, "healthy", False),
        lambda s: setattr(s, "drained", True),
        lambda s: setattr(s, "ejected_until", 1e12),
        lambda s: setattr(s, "connect_down_until", 1e12),
        lambda s: setattr(s, "failback_until", 1e12),
    ):
        st = router.backends["b"]
        setter(st)
        for k in KEYS[:500]:
            r = router.route(k, 100.0)
            pref = router.ring.preference(k)
            if pref[0] == "b":
                assert (r.kind, r.backend.id) == ("failover", pref[1])
            else:
                assert (r.kind, r.backend.id) == ("primary", pref[0])
        router.backends["b"] = BackendState(router.config.backend("b"))


def test_damped_failback_returns_users_when_the_delay_ends(router):
    st = router.backends["c"]
    st.failback_until = 50.0
    owned = [k for k in KEYS if router.ring.owner(k) == "c"]
    assert all(router.route(k, 49.0).backend.id != "c" for k in owned)
    assert all(router.route(k, 50.0).backend.id == "c" for k in owned)


def test_panic_routes_by_the_plain_ring(router):
    # 3 of 4 down: 25% usable < 50% threshold → panic: every key to its owner, except
    # an operator-drained one
    for bid in ("a", "b", "c"):
        router.backends[bid].healthy = False
    kinds = {router.route(k, 0.0).kind for k in KEYS}
    assert kinds <= {"primary", "panic"} and "panic" in kinds
    for k in KEYS:
        assert router.route(k, 0.0).backend.id == router.ring.owner(k)
    router.backends["a"].drained = True
    for k in KEYS:
        r = router.route(k, 0.0)
        if router.ring.owner(k) == "a":
            assert r.backend.id == router.ring.preference(k)[1]


def test_no_panic_above_threshold(router):
    router.backends["a"].healthy = False  # 75% usable
    assert not router.in_panic(0.0)
    assert all(router.route(k, 0.0).backend.id != "a" for k in KEYS)


def test_no_usable_backend(router):
    for st in router.backends.values():
        st.drained = True
    r = router.route("x", 0.0)
    assert r.backend is None and r.kind == "none"


def test_alternatives_follow_the_preference_list(router):
    k = "alice"
    pref = router.ring.preference(k)
    alts = [b.id for b in router.alternatives(k, {pref[0]}, 0.0)]
    assert alts == pref[1:]
    router.backends[pref[1]].healthy = False
    assert [b.id for b in router.alternatives(k, {pref[0]}, 0.0)] == pref[2:]


def test_round_robin_for_keyless_requests(router):
    seen = [router.route_keyless(None, 0.0).backend.id for _ in range(8)]
    assert sorted(set(seen)) == ["a", "b", "c", "d"]
    assert router.route_keyless(None, 0.0).kind == "no_key"
