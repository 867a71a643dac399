"""Light background traffic for the demo: a few simulated users shopping through the proxy,
one request at a time at a bounded rate, each answer checked for lost updates."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

USERS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
# Requests per second from all simulated users together: each user stays well under the
# shop's 60-per-minute rate limit (5 / 8 users × 60 s ≈ 38 per minute).
RATE = 5.0
# Longest a simulated request may take before it counts as failed.
REQUEST_TIMEOUT = 2.0
# Products the simulated users buy.
ITEMS = ("apple", "bread", "coffee", "milk", "tea")
# Fixed seed: the same run of actions every time.
SEED = 6
# (method, path, weight)
ACTIONS = (
    ("GET", "/cart", 4),
    ("POST", "/cart/items", 2),
    ("POST", "/counter", 3),
    ("GET", "/counter", 1),
)


@dataclass
class UserModel:
    """The highest value seen for the user's counter and each cart line. Nothing in the
    demo ever decreases them, so an answer below a value already seen is a lost update."""

    counter: int = 0
    cart: dict[str, int] = field(default_factory=dict)
    served_by: str = "-"


@dataclass
class TrafficStats:
    ok: int = 0
    failed: int = 0
    limited: int = 0
    lost: int = 0
    statuses: Counter = field(default_factory=Counter)


class Traffic:
    def __init__(
        self, base_url: str, *, rate: float = RATE, users: tuple[str, ...] = USERS
    ) -> None:
        self.base_url = base_url
        self.rate = rate
        self.users = users
        self.models = {u: UserModel() for u in users}
        self.stats = TrafficStats()
        self.rng = random.Random(SEED)
        self.lost_details: list[str] = []

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            interval = 1.0 / self.rate
            due = time.monotonic()
            turn = 0
            while True:
                user = self.users[turn % len(self.users)]
                turn += 1
                await self.step(session, user)
                due += interval
                now = time.monotonic()
                if due < now - 1.0:
                    due = now
                await asyncio.sleep(max(0.0, due - now))

    async def step(self, session: aiohttp.ClientSession, user: str) -> None:
        method, path = self._pick()
        body = None
        if path == "/cart/items":
            body = {"item": self.rng.choice(ITEMS), "qty": 1}
        try:
            async with session.request(
                method, self.base_url + path, json=body, headers={"X-User-Id": user}
            ) as r:
                self.stats.statuses[r.status] += 1
                if r.status == 429:
                    self.stats.limited += 1
                    return
                if r.status != 200:
                    self.stats.failed += 1
                    return
                answer = await r.json()
                self.models[user].served_by = r.headers.get("X-Served-By", "?")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            self.stats.failed += 1
            self.stats.statuses["error"] += 1
            return
        self.stats.ok += 1
        self._check(user, method, path, answer)

    def _pick(self) -> tuple[str, str]:
        method, path, _ = self.rng.choices(ACTIONS, weights=[w for *_, w in ACTIONS])[0]
        return method, path

    def _check(self, user: str, method: str, path: str, answer: dict) -> None:
        model = self.models[user]
        if path == "/counter":
            value = int(answer["value"])
            floor = model.counter + 1 if method == "POST" else model.counter
            self._expect(user, "counter", value, floor)
            model.counter = max(model.counter, value)
        elif path == "/cart/items":
            item, qty = answer["item"], int(answer["qty"])
            self._expect(user, f"cart[{item}]", qty, model.cart.get(item, 0) + 1)
            model.cart[item] = max(model.cart.get(item, 0), qty)
        else:
            items = answer.get("items", {})
            for item, seen in model.cart.items():
                self._expect(user, f"cart[{item}]", int(items.get(item, 0)), seen)
                model.cart[item] = max(seen, int(items.get(item, 0)))

    def _expect(self, user: str, what: str, got: int, at_least: int) -> None:
        if got < at_least:
            self.stats.lost += 1
            self.lost_details.append(f"{user} {what}: got {got}, expected at least {at_least}")

    def placement(self) -> dict[str, str]:
        """The instance that last answered each simulated user."""
        return {u: m.served_by for u, m in self.models.items()}
