"""What the demo shows once a second: gathered from the admin API (``GET /backends``), the
proxy's ``/metrics`` and each app's ``/metrics``, drawn with plain ANSI escapes or printed
as one status line.

The live view fits the terminal it is drawn on, down to 80x24: no line is wider than the
terminal (a wider one would wrap and push the title off the top), and it never writes to
the last row (a newline there would scroll). The title and the key help are the first line
and always stay; when rows run short, events go first, then the tips.
"""

from __future__ import annotations

import asyncio
import re
import textwrap
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Bound on each look-up of one refresh, so a stopped instance never delays the view.
POLL_TIMEOUT = 0.8
# Events kept on screen.
EVENT_LINES = 6
# Lines for where the simulated users are served (eight users need two at 80 columns).
USER_LINES = 2
# The smallest terminal the live view is laid out for (the classic VT100 size).
MIN_WIDTH, MIN_HEIGHT = 80, 24

CSI = "\x1b["
ENTER_SCREEN = CSI + "?1049h" + CSI + "?25l"  # alternate screen, cursor hidden
LEAVE_SCREEN = CSI + "?25h" + CSI + "?1049l"
HOME, CLEAR_EOL, CLEAR_BELOW = CSI + "H", CSI + "K", CSI + "J"
BOLD, DIM, RESET = CSI + "1m", CSI + "2m", CSI + "0m"
GREEN, RED, YELLOW = CSI + "32m", CSI + "31m", CSI + "33m"
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Row:
    key: str
    id: str
    url: str
    pid: int | None
    process: str
    health: str = "?"
    users: int | None = None
    rate: float = 0.0


@dataclass
class Snapshot:
    rows: list[Row]
    elapsed: float
    ok: int = 0
    failed: int = 0
    limited: int = 0
    lost: int = 0
    placement: dict[str, str] = field(default_factory=dict)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((s.labels, s.value))
    return out


class Poller:
    """Reads the admin API and the metrics; keeps the previous request counts for rates."""

    def __init__(self, session: aiohttp.ClientSession, admin_url: str) -> None:
        self.session = session
        self.admin_url = admin_url
        self._last: tuple[float, dict[str, float]] | None = None

    async def _text(self, url: str) -> str | None:
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT)
            ) as r:
                return await r.text() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _json(self, url: str) -> dict | None:
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT)
            ) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def fill(self, rows: list[Row]) -> None:
        """Health, users held and requests/s into ``rows`` (in place)."""
        backends, proxy_metrics, *app_metrics = await asyncio.gather(
            self._json(self.admin_url + "/backends"),
            self._text(self.admin_url + "/metrics"),
            *(self._text(r.url + "/metrics") if r.process == "running" else _none() for r in rows),
        )
        health = {b["id"]: b["state"] for b in (backends or {}).get("backends", [])}
        now = time.monotonic()
        counts: dict[str, float] = {}
        for labels, value in samples(proxy_metrics or "", "stickyproxy_requests_total"):
            counts[labels.get("backend", "")] = counts.get(labels.get("backend", ""), 0.0) + value
        last = self._last
        self._last = (now, counts)
        for row, text in zip(rows, app_metrics):
            row.health = health.get(row.id, "?")
            entries = samples(text, "stickyctx_entries") if text else []
            row.users = int(entries[0][1]) if entries else None
            if last is not None and now > last[0]:
                row.rate = max(0.0, counts.get(row.id, 0.0) - last[1].get(row.id, 0.0)) / (
                    now - last[0]
                )


async def _none() -> None:
    return None


def _health_colour(state: str) -> str:
    return (
        GREEN
        if state == "up"
        else RED
        if state in ("down", "ejected", "connect-failed")
        else YELLOW
    )


def status_line(s: Snapshot) -> str:
    parts = []
    for r in s.rows:
        if r.process != "running":
            parts.append(f"{r.id} {r.process} ({r.health})")
        else:
            users = "-" if r.users is None else str(r.users)
            parts.append(f"{r.id} {r.health}, users {users}, {r.rate:.1f} req/s")
    return (
        f"[{s.elapsed:5.0f}s] "
        + " | ".join(parts)
        + f" | traffic {s.ok} ok {s.failed} failed {s.lost} lost"
    )


def visible(text: str) -> str:
    """``text`` without its escape sequences: what the terminal shows."""
    return ESCAPE.sub("", text)


def fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters (escape sequences kept, colour reset
    after a cut), so it never wraps."""
    if len(visible(line)) <= width:
        return line
    out, shown, pos = [], 0, 0
    limit = max(0, width - 1)
    while pos < len(line) and shown < limit:
        m = ESCAPE.match(line, pos)
        if m:
            out.append(m.group())
            pos = m.end()
            continue
        out.append(line[pos])
        shown += 1
        pos += 1
    return "".join(out) + "~" + RESET


def view_lines(
    s: Snapshot,
    header: list[str],
    tips: list[str],
    events: list[str],
    keys_enabled: bool,
    width: int = MIN_WIDTH,
    height: int = MIN_HEIGHT,
) -> list[str]:
    """The live view's lines for a ``width`` x ``height`` terminal: at most ``height - 1``
    lines, none wider than ``width``."""
    up = time.strftime("%H:%M:%S", time.gmtime(s.elapsed))
    keys = "keys: 1 2 3 stop/start an instance, q quit" if keys_enabled else "Ctrl-C quits"
    if len(f"stickyproxy demo  up {up}  {keys}") > width:
        keys = "1 2 3 stop/start, q quit" if keys_enabled else "Ctrl-C quits"
    top = [f"{BOLD}stickyproxy demo{RESET}  up {up}  {keys}", *header, ""]
    top.append(f"{DIM} key  instance  pid      process   health          users  req/s{RESET}")
    for r in s.rows:
        pid = str(r.pid) if r.pid and r.process == "running" else "-"
        users = "-" if r.users is None else str(r.users)
        proc_colour = GREEN if r.process == "running" else RED
        top.append(
            f" [{r.key}]  {r.id:<8}  {pid:<7}  {proc_colour}{r.process:<8}{RESET}  "
            f"{_health_colour(r.health)}{r.health:<14}{RESET}  {users:>5}  {r.rate:5.1f}"
        )
    top.append("")
    placed = " ".join(f"{u}@{b}" for u, b in s.placement.items())
    top += textwrap.wrap(f"users: {placed}", width, subsequent_indent="       ")[:USER_LINES]
    lost_colour = GREEN if s.lost == 0 else RED
    top.append(
        f"answers: {s.ok} ok, {s.failed} failed, {s.limited} rate-limited;  "
        f"{lost_colour}lost updates: {s.lost}{RESET}"
    )
    room = height - 1 - len(top)
    fitting_tips = [t for t in tips if len(t) <= width]
    bottom: list[str] = []
    if fitting_tips and room >= 2 + 1:
        bottom += ["", "try:", *fitting_tips[: room - 2]]
    left = room - len(bottom)
    if left >= 3:
        bottom += (
            ["", "events:", *events[-min(EVENT_LINES, left - 2) :]]
            if events
            else ["", "events: none yet"]
        )
    return [fit(line, width) for line in (top + bottom)[: max(1, height - 1)]]


def screen(
    s: Snapshot,
    header: list[str],
    tips: list[str],
    events: list[str],
    keys_enabled: bool,
    width: int = MIN_WIDTH,
    height: int = MIN_HEIGHT,
) -> str:
    """The whole live view, drawn over the previous one."""
    lines = view_lines(s, header, tips, events, keys_enabled, width, height)
    return HOME + "".join(line + CLEAR_EOL + "\n" for line in lines) + CLEAR_BELOW
