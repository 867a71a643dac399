"""SignalLatch: a signal that arrives before start-up finishes is kept, not lost or fatal."""

from __future__ import annotations

import pytest

from stickyproxy.control.signals import SignalLatch


@pytest.mark.parametrize(
    ("events", "calls"),
    [
        ([], 0),
        (["arm"], 0),  # arming alone does nothing
        (["sig", "arm"], 1),  # held, then acted on once armed
        (["sig", "sig", "arm"], 1),  # two during start-up are one reload
        (["arm", "sig", "sig"], 2),  # once armed, each signal acts
        (["sig", "arm", "sig"], 2),
    ],
)
def test_latch(events, calls):
    seen = []
    latch = SignalLatch(lambda: seen.append(1))
    for e in events:
        latch() if e == "sig" else latch.arm()
    assert len(seen) == calls
