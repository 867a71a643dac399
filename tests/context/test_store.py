"""ContextStore against a real redis-server: C1 local reads, C2 fencing, C3 takeovers, TTL,
LRU bounds, write-behind."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from stickyproxy.context import ConflictError, ContextStore, RecordMismatch, StoreClosed
from stickyproxy.context.scripts import record_key

from .conftest import RedisServer, eventually, released

Stores = Callable[..., Any]
WRITE_SCRIPT_COMMANDS = {"hmget", "hset", "pexpire"}


def acquisitions(store: ContextStore, reason: str) -> float:
    return store.metrics.acquisitions.labels(reason)._value.get()


def counter(metric: Any) -> float:
    return metric._value.get()


async def test_steady_state_issues_zero_redis_calls(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A")
    users = [f"user-{i}" for i in range(20)]
    for user in users:
        async with a.edit(user) as ctx:
            ctx["n"] = 1
    before = redis_server.commandstats()
    for _ in range(50):
        for user in users:
            assert (await a.get(user))["n"] == 1
            async with a.edit(user) as ctx:
                ctx["n"] = 1  # unchanged: nothing to save
    assert redis_server.store_calls(before) == {}
    assert counter(a.metrics.local_hits) >= 2000

    before = redis_server.commandstats()
    for user in users:
        async with a.edit(user) as ctx:
            ctx["n"] += 1
    calls = redis_server.store_calls(before)
    # One EVALSHA round trip per change; commandstats also counts the script's own commands.
    assert calls.pop("evalsha") == len(users)
    assert set(calls) <= WRITE_SCRIPT_COMMANDS, calls


async def test_get_is_a_read_only_copy_and_failed_edit_saves_nothing(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A")
    async with a.edit("u") as ctx:
        ctx["items"] = [1]
    view = await a.get("u")
    with pytest.raises(TypeError):
        view["items"] = []  # type: ignore[index]
    view["items"].append(2)
    assert (await a.get("u"))["items"] == [1]

    before = redis_server.commandstats()
    with pytest.raises(RuntimeError):
        async with a.edit("u") as ctx:
            ctx["items"] = ["lost"]
            raise RuntimeError("handler failed")
    assert (await a.get("u"))["items"] == [1]
    assert redis_server.store_calls(before) == {}


async def test_a_b_a_moves_lose_nothing_and_never_read_stale(stores: Stores) -> None:
    a: ContextStore = await stores("A")
    b: ContextStore = await stores("B")
    user = "mover"
    expected = 0
    for round_no in range(30):
        here, there = (a, b) if round_no % 2 == 0 else (b, a)
        assert (await here.get(user)).get("n", 0) == expected  # no stale read after the move
        async with here.edit(user) as ctx:
            ctx["n"] = ctx.get("n", 0) + 1
        expected += 1
        # C3: the previous holder drops its copy once the takeover message arrives.
        await eventually(released(there, user), deadline=2.0)
    assert (await a.get(user))["n"] == expected
    assert (await b.get(user))["n"] == expected
    assert acquisitions(a, "takeover") + acquisitions(b, "takeover") >= 29


async def test_stale_copy_write_is_fenced_and_update_retries(stores: Stores) -> None:
    a: ContextStore = await stores("A")
    b: ContextStore = await stores("B")
    user = "contested"
    async with a.edit(user) as ctx:
        ctx["n"] = 1

    with pytest.raises(ConflictError):
        async with a.edit(user) as ctx:
            await b.get(user)  # B takes over while A's edit is open
            ctx["n"] = 100
    assert counter(a.metrics.conflicts) == 1
    assert (await b.get(user))["n"] == 1

    runs = 0

    async def bump(ctx: dict[str, Any]) -> int:
        nonlocal runs
        runs += 1
        if runs == 1:
            await eventually(lambda: not b.holds(user), deadline=2.0)
            await b.get(user)  # B takes over between A's acquire and A's save
        ctx["n"] += 1
        return int(ctx["n"])

    assert await a.update(user, bump) == 2
    assert runs == 2
    assert (await b.get(user))["n"] == 2


async def test_two_instances_editing_one_user_lose_no_update(stores: Stores) -> None:
    a: ContextStore = await stores("A")
    b: ContextStore = await stores("B")
    user = "hot"
    successes = 0
    failures = 0

    def incr(ctx: dict[str, Any]) -> None:
        ctx["n"] = ctx.get("n", 0) + 1

    async def worker(store: ContextStore) -> None:
        nonlocal successes, failures
        for _ in range(40):
            try:
                await store.update(user, incr, attempts=4)
                successes += 1
            except ConflictError:
                failures += 1

    async with asyncio.timeout(60):
        await asyncio.gather(*(worker(s) for s in (a, b, a, b)))
    assert successes + failures == 160
    assert successes > 0
    final = (await a.get(user))["n"]
    assert final == successes, (final, successes, failures)
    assert (await b.get(user))["n"] == successes
    # The fence was exercised: writes from a copy that had just been taken over were rejected.
    assert counter(a.metrics.conflicts) + counter(b.metrics.conflicts) > 0


async def test_record_with_another_user_id_is_refused(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A")
    with redis_server.client() as c:
        c.hset(
            record_key("t", "alice"),
            mapping={"uid": "mallory", "epoch": 3, "owner": "X", "data": b'{"secret":1}'},
        )
    with pytest.raises(RecordMismatch):
        await a.get("alice")
    assert not a.holds("alice")

    async with a.edit("bob") as ctx:
        ctx["n"] = 1
    with redis_server.client() as c:
        c.hset(record_key("t", "bob"), "uid", "mallory")
    with pytest.raises(RecordMismatch):
        async with a.edit("bob") as ctx:
            ctx["n"] = 2
    with pytest.raises(RecordMismatch):
        await a.get("bob")  # and not served from the dropped copy


async def test_lru_bounded_by_entries(stores: Stores) -> None:
    a: ContextStore = await stores("A", max_entries=3)
    for i in range(5):
        async with a.edit(f"u{i}") as ctx:
            ctx["i"] = i
    assert [a.holds(f"u{i}") for i in range(5)] == [False, False, True, True, True]
    assert a.metrics.entries._value.get() == 3
    assert (await a.get("u0"))["i"] == 0  # evicted, rehydrated intact
    assert acquisitions(a, "revalidate") == 1


async def test_lru_bounded_by_bytes(stores: Stores) -> None:
    a: ContextStore = await stores("A", max_bytes=3000)
    for i in range(4):
        async with a.edit(f"u{i}") as ctx:
            ctx["blob"] = "x" * 1000
    assert sum(a.holds(f"u{i}") for i in range(4)) == 2
    assert a.metrics.entry_bytes._value.get() <= 3000
    async with a.edit("huge") as ctx:
        ctx["blob"] = "y" * 5000  # larger than the whole cache: saved, not cached
    assert not a.holds("huge")
    assert len((await a.get("huge"))["blob"]) == 5000


@pytest.mark.slow
async def test_idle_ttl_expires_record_and_local_copy(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A", idle_ttl="1s")
    async with a.edit("brief") as ctx:
        ctx["n"] = 1
    key = record_key("t", "brief")
    with redis_server.client() as c:
        assert 0 < c.pttl(key) <= 1000

        await eventually(lambda: not c.exists(key), deadline=3.0)
    # The local copy never outlives the record: the next use re-acquires and finds nothing.
    assert (await a.get("brief")) == {}
    assert acquisitions(a, "revalidate") == 1


@pytest.mark.slow
async def test_reads_refresh_the_ttl_before_it_runs_out(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A", idle_ttl="1s")
    async with a.edit("kept") as ctx:
        ctx["n"] = 1
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        assert (await a.get("kept"))["n"] == 1
        await asyncio.sleep(0.1)
    with redis_server.client() as c:
        assert c.exists(record_key("t", "kept"))
    assert acquisitions(a, "first") == 1 and acquisitions(a, "revalidate") == 0


async def test_delete_drops_everywhere(stores: Stores) -> None:
    a: ContextStore = await stores("A")
    b: ContextStore = await stores("B")
    async with a.edit("gone") as ctx:
        ctx["n"] = 1
    await b.delete("gone")
    await eventually(lambda: not a.holds("gone"), deadline=2.0)
    assert await a.get("gone") == {}
    assert acquisitions(a, "first") == 2  # the tombstone has no owner


async def test_write_behind_flushes_and_late_flush_after_takeover_is_fenced(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A", mode="write-behind", flush_interval="1h")
    b: ContextStore = await stores("B")
    key = record_key("t", "wb")
    async with a.edit("wb") as ctx:
        ctx["n"] = 1
    with redis_server.client() as c:
        assert c.hget(key, "data") is None  # not yet flushed
        assert a.pending_writes == 1
        assert await a.flush() == 1
        assert c.hget(key, "data") == b'{"n":1}'

        async with a.edit("wb") as ctx:
            ctx["n"] = 2  # buffered: lost if another instance takes over before the flush
        assert (await b.get("wb"))["n"] == 1
        assert await a.flush() == 0
        assert counter(a.metrics.fenced_flushes) == 1
        assert c.hget(key, "data") == b'{"n":1}'
        assert (await a.get("wb"))["n"] == 1


async def test_write_behind_flusher_runs_on_its_interval(
    redis_server: RedisServer, stores: Stores
) -> None:
    a: ContextStore = await stores("A", mode="write-behind", flush_interval="50ms")
    async with a.edit("wb2") as ctx:
        ctx["n"] = 7
    with redis_server.client() as c:
        await eventually(lambda: c.hget(record_key("t", "wb2"), "data") == b'{"n":7}', deadline=2.0)
    # Redis applies the write before the flusher reads its reply: until then it is pending
    await eventually(lambda: a.pending_writes == 0, deadline=2.0)


async def test_closed_store_refuses(make_store: Callable[..., ContextStore]) -> None:
    store = make_store("A")
    with pytest.raises(StoreClosed):
        await store.get("u")
    async with store:
        await store.get("u")
    with pytest.raises(StoreClosed):
        await store.get("u")


async def test_stores_with_own_registries_do_not_collide(stores: Stores) -> None:
    a: ContextStore = await stores("A")
    b: ContextStore = await stores("B")
    await a.get("x")
    text = a.metrics.render().decode()
    for name in (
        "stickyctx_local_hits_total",
        'stickyctx_acquisitions_total{reason="first"} 1.0',
        "stickyctx_writes_total",
        "stickyctx_conflicts_total",
        "stickyctx_takeovers_received_total",
        "stickyctx_entries 1.0",
        "stickyctx_breaker_state 0.0",
    ):
        assert name in text, name
    assert 'stickyctx_acquisitions_total{reason="first"} 0.0' in b.metrics.render().decode()


async def test_takeover_by_a_process_with_the_same_node_id_is_noticed(stores: Stores) -> None:
    # Two processes misconfigured with one node id: the takeover message is compared by epoch,
    # so the older holder still drops its copy and never serves it stale.
    a: ContextStore = await stores("same")
    b: ContextStore = await stores("same")
    async with a.edit("u") as ctx:
        ctx["n"] = 1
    async with b.edit("u") as ctx:
        ctx["n"] += 1
    await eventually(released(a, "u"), deadline=3.0)
    assert (await a.get("u"))["n"] == 2
    await eventually(released(b, "u"), deadline=3.0)
    assert counter(a.metrics.takeovers_received) >= 1
    assert counter(b.metrics.takeovers_received) >= 1


def test_default_node_ids_differ_per_store() -> None:
    ids = {ContextStore("redis://127.0.0.1:1/0").node_id for _ in range(50)}
    assert len(ids) == 50
