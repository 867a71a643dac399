"""The demo's pure parts: the live view's layout for a terminal size, cutting a coloured line
to a width, and what the watchdog makes of the demo's messages."""

from __future__ import annotations

import pytest

from stickyproxy.demo.view import GREEN, RESET, Row, Snapshot, fit, view_lines, visible
from stickyproxy.demo.watchdog import Watch

USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
HEADER = [
    "proxy http://127.0.0.1:18080  admin http://127.0.0.1:41234",
    "redis redis://127.0.0.1:40000/0",
]
TIPS = [
    'curl -H \'X-User-Id: you\' -d \'{"item":"tea","qty":1}\' 127.0.0.1:18080/cart/items',
    "curl -si -H 'X-User-Id: you' 127.0.0.1:18080/cart    # X-Served-By",
    "curl -s '127.0.0.1:41234/route?key=you'",
]
EVENTS = [
    f"12:00:0{i} app-2 exited (pid 4321{i}, signal SIGKILL): press 2 to start it again"
    for i in range(8)
]


def snapshot() -> Snapshot:
    rows = [
        Row(
            str(n),
            f"app-{n}",
            f"http://127.0.0.1:4{n}000",
            100_000 + n,
            "running",
            "up",
            1234,
            12.5,
        )
        for n in (1, 2, 3)
    ]
    rows[1].process, rows[1].health = "killed", "connect-failed"
    return Snapshot(rows, 3725.0, 123_456, 7, 3, 0, {u: "app-3" for u in USERS})


@pytest.mark.parametrize(("width", "height"), [(80, 24), (100, 40), (80, 16), (60, 24), (200, 60)])
def test_the_view_never_wraps_or_scrolls_and_keeps_its_title(width, height):
    lines = view_lines(snapshot(), HEADER, TIPS, EVENTS, True, width, height)
    assert len(lines) <= height - 1
    assert all(len(visible(line)) <= width for line in lines)
    assert visible(lines[0]).startswith("stickyproxy demo  up 01:02:05")
    assert "q quit" in visible(lines[0])
    assert any(visible(line).startswith(" [3]  app-3") for line in lines)


def test_at_80x24_everything_is_shown():
    shown = [visible(line) for line in view_lines(snapshot(), HEADER, TIPS, EVENTS, True)]
    assert shown[4].split() == ["key", "instance", "pid", "process", "health", "users", "req/s"]
    assert TIPS[0] in shown and "events:" in shown
    assert sum(line.startswith("12:00:0") for line in shown) >= 4
    assert all(f"{u}@app-3" in " ".join(shown) for u in USERS)


def test_when_rows_run_short_events_go_first_then_tips():
    shown = [visible(line) for line in view_lines(snapshot(), HEADER, TIPS, EVENTS, True, 80, 19)]
    assert "events:" not in shown and TIPS[2] in shown
    shown = [visible(line) for line in view_lines(snapshot(), HEADER, TIPS, EVENTS, True, 80, 14)]
    assert "try:" not in shown and "events:" not in shown


def test_a_tip_too_wide_to_run_is_left_out_rather_than_cut():
    shown = [visible(line) for line in view_lines(snapshot(), HEADER, TIPS, EVENTS, True, 70, 24)]
    assert TIPS[0] not in shown and TIPS[1] in shown


@pytest.mark.parametrize(
    ("line", "width", "expected"),
    [
        ("short", 10, "short"),
        ("exactly10!", 10, "exactly10!"),
        ("a bit too long", 10, "a bit too~"),
        (f"{GREEN}up{RESET} and running", 6, f"{GREEN}up{RESET} an~"),
    ],
)
def test_fit_counts_only_what_the_terminal_shows(line, width, expected):
    out = fit(line, width)
    assert visible(out) == visible(expected)
    assert len(visible(out)) <= width


@pytest.mark.parametrize(
    ("lines", "groups", "done"),
    [
        ([], [], False),
        (["pgid 123\n", "pgid 456\n"], [123, 456], False),
        (["pgid 123\n", "bye\n"], [123], True),
        # nothing else is ever acted on: not pid 0 or 1 (every process / init), not garbage
        (["pgid 0\n", "pgid 1\n", "pgid -5\n", "pgid x\n", "kill 9\n", "\n"], [], False),
    ],
)
def test_the_watchdog_kills_only_the_groups_it_was_told_of(lines, groups, done):
    watch = Watch()
    for line in lines:
        watch.feed(line)
    assert watch.groups == groups and watch.done is done
