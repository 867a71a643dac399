"""Request counts kept in native integers per backend and folded into Stats when read."""

import pytest

from stickyproxy.control.metrics import Tally, code_class


@pytest.mark.parametrize(
    "statuses, folded",
    [
        ([], {}),
        ([200, 204, 299], {("a", "2xx"): 3}),
        (
            [101, 301, 404, 503, 599],
            {("a", "1xx"): 1, ("a", "3xx"): 1, ("a", "4xx"): 1, ("a", "5xx"): 2},
        ),
        ([0, 0], {("a", "aborted"): 2}),
        ([99, 600, 999], {("a", "other"): 3}),
    ],
)
def test_counts_fold_into_the_requests_counter(statuses, folded):
    t = Tally("a")
    for s in statuses:
        t.count(s)
    requests: dict = {}
    t.fold(requests)
    assert requests == folded
    # the classes agree with the one the rest of the metrics use
    for s in statuses:
        assert ("a", code_class(s) if s else "aborted") in requests


def test_fold_adds_to_what_is_there_and_starts_again():
    t = Tally("a")
    requests = {("a", "2xx"): 5.0, ("b", "2xx"): 1.0}
    t.count(200)
    t.fold(requests)
    t.fold(requests)  # nothing new: nothing added
    t.count(500)
    t.fold(requests)
    assert requests == {("a", "2xx"): 6.0, ("b", "2xx"): 1.0, ("a", "5xx"): 1}
    assert t.labels == ("a",)
