"""The store on a real Cluster of three masters and three replicas (fixture ``cluster_ha``):
a busy user's slot migrated under load, and kill -9 of one master while users on the others
keep working. Figures printed with ``-s`` are the ones docs/context.md quotes:
    python3 -m pytest -q -s -p no:cacheprovider tests/context/test_cluster_failures.py
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from stickyproxy.context import ConflictError, ContextStore, StoreUnavailable
from stickyproxy.context.scripts import record_key

from .conftest import ClusterHA, StaleProbe, eventually

Stores = Callable[..., Any]
WRITERS = 4
# The store's first calls open a connection per node; a loaded machine needs more than 250 ms.
TIMEOUT = "1s"
# How long a migrating key is left in the ASK state while writers hammer it.
ASK_HOLD = 1.0


@dataclass
class Load:
    acked: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    messages: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def twice(self, user: str) -> int:
        return len(self.acked[user]) - len(set(self.acked[user]))


def bump(ctx: dict[str, Any]) -> int:
    ctx["n"] = ctx.get("n", 0) + 1
    return int(ctx["n"])


async def hammer(
    store: ContextStore, users: list[str], load: Load, stop: asyncio.Event, offset: int
) -> None:
    i = offset
    while not stop.is_set():
        user = users[i % len(users)]
        i += 1
        try:
            load.acked[user].append(await store.update(user, bump))
        except (StoreUnavailable, ConflictError) as exc:
            load.errors[f"{user}:{type(exc).__name__}"] += 1
            load.messages[user][str(exc)[:60]] += 1
            if len(load.samples) < 5:
                load.samples.append(f"{user}: {exc}")
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)


def stored(cluster: ClusterHA, user: str) -> int:
    with cluster.owner(record_key("t", user)).client() as c:
        data = c.hget(record_key("t", user), "data")
    return json.loads(data)["n"] if data else 0


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_slot_migration_of_a_busy_user_fails_no_write(
    cluster_ha: ClusterHA, stores: Stores
) -> None:
    a: ContextStore = await stores("A", url=cluster_ha.url, redis_timeout=TIMEOUT)
    user = "migrant"
    key = record_key("t", user)
    load = Load()
    stop = asyncio.Event()
    others = [f"other{i}" for i in range(16)]  # keep several connections open to every node
    tasks = [asyncio.create_task(hammer(a, [user], load, stop, k)) for k in range(WRITERS)]
    tasks += [asyncio.create_task(hammer(a, others, load, stop, k)) for k in range(WRITERS * 2)]
    try:
        await eventually(lambda: len(load.acked[user]) >= 20, deadline=10.0)
        src = cluster_ha.owner(key)
        dst = next(m for m in cluster_ha.masters() if m is not src)
        src_id, dst_id = cluster_ha.node_id(src), cluster_ha.node_id(dst)
        with src.client() as s, dst.client() as d:
            slot = s.execute_command("CLUSTER", "KEYSLOT", key)
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", key)
            before = len(load.acked[user])
            await asyncio.sleep(
                ASK_HOLD
            )  # the key is on dst, the slot still src's: every call is ASKed
            during = len(load.acked[user]) - before
            for master in cluster_ha.masters():
                with master.client() as m:
                    m.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        await eventually(lambda: cluster_ha.owner(key) is dst, deadline=5.0)
        after = len(load.acked[user])
        await eventually(lambda: len(load.acked[user]) >= after + 20, deadline=10.0)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    print(
        f"\nslot migration: {len(load.acked[user])} writes acknowledged ({during} while ASKed), "
        f"errors {dict(load.errors)} {load.samples}"
    )
    assert sum(load.errors.values()) == 0, load.samples
    assert during > 0  # writes went on while the key was in the ASK state
    assert load.twice(user) == 0
    assert stored(cluster_ha, user) == max(load.acked[user]) == len(load.acked[user])


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_master_killed_isolates_its_users(cluster_ha: ClusterHA, stores: Stores) -> None:
    # The cluster runs with cluster-require-full-coverage no (see the fixture): with the
    # default, Redis itself answers CLUSTERDOWN for every slot while one is uncovered.
    a: ContextStore = await stores("A", url=cluster_ha.url, redis_timeout="250ms")
    b: ContextStore = await stores("B", url=cluster_ha.url, redis_timeout="250ms")
    users = [f"k{i}" for i in range(24)]
    load = Load()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(hammer(a, users, load, stop, k * 3)) for k in range(WRITERS * 2)]
    # B keeps taking a few other users over while A keeps reading them: A must never serve a
    # copy older than B's acknowledged writes beyond the stale-read window.
    probe = StaleProbe(b, a, [f"p{i}" for i in range(6)])
    tasks.append(asyncio.create_task(probe.run(stop)))
    try:
        await eventually(lambda: min(len(load.acked[u]) for u in users) >= 3, deadline=15.0)
        victim = cluster_ha.owner(record_key("t", users[0]))
        doomed = {u for u in users if cluster_ha.owner(record_key("t", u)) is victim}
        healthy = set(users) - doomed
        load.errors.clear()
        killed_at = time.monotonic()
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=5)
        victim.proc = None
        # Until its replica is promoted (cluster-node-timeout 1 s plus the election), the dead
        # master's users fail; everyone else's writes go on.
        acked_then = {u: len(load.acked[u]) for u in users}
        await eventually(
            lambda: all(len(load.acked[u]) > acked_then[u] for u in doomed),
            deadline=30.0,
            interval=0.05,
        )
        recovered = time.monotonic() - killed_at
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    healthy_errors = sum(n for k, n in load.errors.items() if k.split(":")[0] in healthy)
    doomed_errors = sum(n for k, n in load.errors.items() if k.split(":")[0] in doomed)
    healthy_acked = sum(len(load.acked[u]) - acked_then[u] for u in healthy)
    lost = sum(1 for u in doomed for n in set(load.acked[u]) if n > stored(cluster_ha, u))
    twice = sum(load.twice(u) for u in users)
    print(
        f"\nkill -9 of a master: {len(doomed)} of {len(users)} users on it; their writes resumed after "
        f"{recovered:.2f}s; errors: healthy-master users {healthy_errors} ({healthy_acked} writes "
        f"acknowledged meanwhile), dead-master users {doomed_errors}; lost {lost}, acknowledged twice {twice} "
        f"{load.samples[:2]}; stale-read probe: {probe.reads} reads, {len(probe.stale_ages)} stale, "
        f"oldest {max(probe.stale_ages, default=0) * 1000:.0f} ms"
    )
    healthy_messages: Counter[str] = Counter()
    for u in healthy:
        healthy_messages.update(load.messages[u])
    assert doomed and healthy
    # No breaker refusal for a healthy master's user: the dead master's breaker is its own.
    # (A few single timeouts under this machine's load are tolerated, at most 1 in 200.)
    assert not any("circuit open" in m for m in healthy_messages), healthy_messages.most_common(5)
    assert healthy_errors <= healthy_acked // 200, healthy_messages.most_common(5)
    assert healthy_acked > 0
    assert doomed_errors > 0  # the dead master's users did fail until the promotion
    assert twice == 0
    assert probe.reads > 0
    assert max(probe.stale_ages, default=0) <= a.settings.listener_liveness
