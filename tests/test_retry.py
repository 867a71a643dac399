"""The retry decision table (stickyproxy/dataplane/retry.py), case by case."""

import pytest

from stickyproxy.dataplane.retry import (
    CONNECT_REFUSED,
    CONNECT_TIMEOUT,
    NEXT_BACKEND,
    NO_RETRY,
    PROTOCOL,
    RESET,
    SAME_BACKEND,
    TIMEOUT,
    TLS,
    decide,
    retry_reason,
)

# kind, replayable, reused, same_tried, usable → action, budgeted
TABLE = [
    # nothing was sent: any request moves on; refused is free, a timeout is budgeted
    (CONNECT_REFUSED, False, False, False, True, NEXT_BACKEND, False),
    (CONNECT_REFUSED, True, False, True, True, NEXT_BACKEND, False),
    (CONNECT_TIMEOUT, False, False, False, True, NEXT_BACKEND, True),
    # a refused certificate: nothing sent, the next backend, budgeted like a timeout
    (TLS, False, False, False, True, NEXT_BACKEND, True),
    # a stale pooled connection: same backend, new connection, free
    (RESET, True, True, False, True, SAME_BACKEND, False),
    # ... unless that backend is no longer usable: the next one, still free
    (RESET, True, True, False, False, NEXT_BACKEND, False),
    # a new connection reset: the backend died; free, bounded by retries.attempts
    (RESET, True, False, False, True, NEXT_BACKEND, False),
    # the retry's new connection reset as well (a killed backend's kernel can still accept
    # while it is torn down): the next backend, still free
    (RESET, True, False, True, True, NEXT_BACKEND, False),
    # overload and broken backends: budgeted
    (TIMEOUT, True, True, False, True, NEXT_BACKEND, True),
    (TIMEOUT, True, False, False, True, NEXT_BACKEND, True),
    (PROTOCOL, True, False, False, True, NEXT_BACKEND, True),
    # a request that may have reached the backend and cannot be replayed: never
    (RESET, False, True, False, True, NO_RETRY, False),
    (TIMEOUT, False, False, False, True, NO_RETRY, False),
    (PROTOCOL, False, True, False, True, NO_RETRY, False),
]


@pytest.mark.parametrize("kind, replayable, reused, same_tried, usable, action, budgeted", TABLE)
def test_decide(kind, replayable, reused, same_tried, usable, action, budgeted):
    assert decide(kind, replayable, reused, same_tried, usable) == (action, budgeted)


def test_reason_labels():
    assert retry_reason(RESET, SAME_BACKEND) == "stale-connection"
    assert retry_reason(RESET, NEXT_BACKEND) == "reset"
    assert retry_reason(CONNECT_REFUSED, NEXT_BACKEND) == "connect"
