"""The backend table (routing/table.py): what a reload keeps, makes anew and reports."""

import pytest

from stickyproxy.config import parse
from stickyproxy.routing.table import BackendTable


def cfg(*backends):
    return parse(
        {
            "admin": {"enabled": False},
            "backends": [{"id": i, "url": u, "weight": w} for i, u, w in backends],
        }
    )


A = ("a", "http://127.0.0.1:8001", 1)
B = ("b", "http://127.0.0.1:8002", 1)
C = ("c", "http://127.0.0.1:8003", 1)


@pytest.mark.parametrize(
    "before, after, added, removed, readdressed, reweighted, ring",
    [
        ((A, B), (A, B), (), (), (), (), False),
        ((A, B), (A, B, C), ("c",), (), (), (), True),
        ((A, B, C), (A, C), (), ("b",), (), (), True),
        ((A, B), (A, ("b", "http://127.0.0.1:9002", 1)), (), (), ("b",), (), False),
        ((A, B), (A, ("b", "http://127.0.0.1:8002", 3)), (), (), (), ("b",), True),
    ],
)
def test_apply_reports_what_changed(before, after, added, removed, readdressed, reweighted, ring):
    table = BackendTable(cfg(*before))
    diff = table.apply(cfg(*after))
    assert (diff.added, diff.removed, diff.readdressed, diff.reweighted) == (
        added,
        removed,
        readdressed,
        reweighted,
    )
    assert diff.ring_changed is ring
    assert diff.ring_after == table.router.fingerprint
    assert set(table.states) == {b[0] for b in after}


def test_a_staying_backend_keeps_its_state_and_a_moved_one_starts_afresh():
    table = BackendTable(cfg(A, B))
    a, b = table.states["a"], table.states["b"]
    a.healthy = False
    b.healthy = False
    table.states["b"].drained = True
    old_router = table.router
    table.apply(cfg(A, ("b", "http://127.0.0.1:9002", 1)))
    assert table.states["a"] is a and not a.healthy  # health history kept
    nb = table.states["b"]
    assert nb is not b and nb.healthy and nb.address == "127.0.0.1:9002"
    assert nb.drained  # the drain is the operator's decision about the id
    assert old_router.backends["b"] is b  # a request routed by the old router keeps its state
    assert table.router is not old_router
