"""Long-running jobs at the owner: record logic (table-tested), progress and follow from memory
with no Redis command, the outcome and checkpoints written through and reported by another
store after a move or a crash, resume with the run fence, a Redis outage, bad input, and the
SSE helper on a real aiohttp server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from stickyproxy.context import (
    ConfigError,
    Jobs,
    JobsFull,
    StoreUnavailable,
    UnknownJob,
    job_events_response,
)
from stickyproxy.context.jobs import (
    DONE,
    JOBS_FIELD,
    LOST,
    MAX_RECORDS_PER_USER,
    RUNNING,
    JobHandle,
    JobNotResumable,
    pruned,
    report,
)

from .conftest import RedisServer, eventually

Stores = Callable[..., Any]


class Gate:
    """A job body that advances one step each time the test opens the gate."""

    def __init__(self, steps: int = 3) -> None:
        self.steps = steps
        self.step = asyncio.Event()
        self.handles: list[JobHandle] = []
        self.reached = 0

    async def __call__(self, handle: JobHandle) -> Any:
        self.handles.append(handle)
        start = int(handle.checkpoint or 0)
        for i in range(start + 1, self.steps + 1):
            await self.step.wait()
            self.step.clear()
            await handle.progress(i, self.steps, f"step {i}")
            if i == 2:
                await handle.save_checkpoint(i)
            self.reached = i
        return {"answer": 42, "resumed_from": start}


# -- pure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "here", "now", "state"),
    [
        ({"state": RUNNING, "started": 100}, True, 10_000, RUNNING),
        ({"state": RUNNING, "started": 100}, False, 200, RUNNING),
        ({"state": RUNNING, "started": 100}, False, 10_000, LOST),
        ({"state": DONE, "started": 100, "finished": 150}, False, 10_000, DONE),
        ({}, False, 0, LOST),
    ],
)
def test_report(record: dict[str, Any], here: bool, now: float, state: str) -> None:
    assert report("j", record, here=here, now=now, max_runtime=3600)["state"] == state


def test_pruned_drops_old_and_excess_finished_never_running() -> None:
    records = {
        f"d{i}": {"state": DONE, "finished": 1000 + i} for i in range(MAX_RECORDS_PER_USER + 5)
    }
    records["old"] = {"state": DONE, "finished": 1}
    records["run"] = {"state": RUNNING, "started": 1}
    kept = pruned(records, now=2000, retention=1500)
    assert "old" not in kept and "run" in kept and len(kept) == MAX_RECORDS_PER_USER
    assert "d0" not in kept and f"d{MAX_RECORDS_PER_USER + 4}" in kept


# -- on one store --------------------------------------------------------------------------


async def test_progress_follow_and_result(stores: Stores, redis_server: RedisServer) -> None:
    store = await stores("A")
    jobs = Jobs(store)
    gate = Gate()
    await store.update("u", lambda c: c.update(warm=True))  # the scripts are loaded
    before = redis_server.commandstats()
    started = await jobs.start("u", gate, kind="export")
    assert redis_server.store_calls(before).get("evalsha") == 1  # the start, written through
    assert started["state"] == RUNNING and started["here"] and started["kind"] == "export"
    seen: list[dict[str, Any]] = []

    async def follower() -> None:
        async for status in jobs.follow("u", started["id"]):
            seen.append(status)

    task = asyncio.create_task(follower())
    await eventually(lambda: len(seen) == 1)
    before = redis_server.commandstats()
    gate.step.set()
    await eventually(lambda: len(seen) == 2)
    assert seen[-1]["progress"] == {"done": 1, "total": 3, "message": "step 1"}
    assert redis_server.store_calls(before) == {}  # progress is memory only
    gate.step.set()
    await eventually(lambda: len(seen) == 3)
    gate.step.set()
    async with asyncio.timeout(5):
        await task
    assert seen[-1]["state"] == DONE and seen[-1]["result"] == {"answer": 42, "resumed_from": 0}
    await eventually(lambda: jobs.running() == 0)
    final = await jobs.status("u", started["id"])
    assert final["state"] == DONE and not final["here"] and final["checkpoint"] == 2


async def test_bad_input(stores: Stores) -> None:
    store = await stores("A")
    with pytest.raises(ConfigError, match="max_running_per_user: must be a positive integer"):
        Jobs(store, max_running_per_user=0)
    with pytest.raises(ConfigError, match="retention"):
        Jobs(store, retention=-1)
    jobs = Jobs(store, max_running_per_user=1)
    with pytest.raises(UnknownJob, match="no job 'nope' for user 'u'"):
        await jobs.status("u", "nope")
    gate = Gate()
    job = await jobs.start("u", gate)
    with pytest.raises(JobsFull, match="for this user"):
        await jobs.start("u", gate)
    with pytest.raises(UnknownJob):
        await jobs.status("mallory", job["id"])  # another user's job does not exist for them
    with pytest.raises(JobNotResumable):
        await jobs.resume("u", job["id"], gate)

    async def bad_checkpoint(handle: JobHandle) -> None:
        await handle.save_checkpoint({1, 2})

    other = Jobs(await stores("B"), registry=None)
    failed = await other.start("v", bad_checkpoint)
    await eventually(lambda: other.running() == 0)
    status = await other.status("v", failed["id"])
    assert status["state"] == "failed" and "JSON-serialisable" in status["error"]
    assert await jobs.cancel("u", job["id"]) is True
    assert (await jobs.status("u", job["id"]))["state"] == "cancelled"


# -- moves and crashes ---------------------------------------------------------------------


async def test_outcome_reported_by_the_next_owner(stores: Stores) -> None:
    a, b = await stores("A"), await stores("B")
    on_a, on_b = Jobs(a), Jobs(b)
    gate = Gate(steps=1)
    job = await on_a.start("u", gate)
    gate.step.set()
    await eventually(lambda: on_a.running() == 0)
    status = await on_b.status("u", job["id"])  # B acquires the user, and the record with it
    assert status["state"] == DONE and status["node"] == "A" and status["result"]["answer"] == 42


async def test_crashed_owner_job_is_reported_then_lost_then_resumed_from_its_checkpoint(
    stores: Stores,
) -> None:
    a, b = await stores("A"), await stores("B")
    clock = [time.time()]
    on_a, on_b = Jobs(a), Jobs(b, max_runtime="1m", clock=lambda: clock[0])
    gate_a = Gate()
    job = await on_a.start("u", gate_a)
    for step in (1, 2):
        gate_a.step.set()
        await eventually(lambda: gate_a.reached == step)  # noqa: B023 - awaited in the loop
    assert gate_a.handles[0].checkpoint == 2
    # A stops answering (its runner hangs at step 3); the user is served by B from now on.
    status = await on_b.status("u", job["id"])
    assert (status["state"], status["node"], status["here"], status["checkpoint"]) == (
        RUNNING,
        "A",
        False,
        2,
    )
    clock[0] += 61
    assert (await on_b.status("u", job["id"]))["state"] == LOST
    gate_b = Gate()
    resumed = await on_b.resume("u", job["id"], gate_b)
    assert resumed["run"] == 2 and resumed["here"]
    gate_b.step.set()
    await eventually(lambda: on_b.running() == 0)
    done = await on_b.status("u", job["id"])
    assert (
        done["state"] == DONE
        and done["result"] == {"answer": 42, "resumed_from": 2}
        and done["node"] == "B"
    )
    # The old runner finishes after all: its writes belong to run 1 and are skipped.
    gate_a.step.set()
    await eventually(lambda: on_a.running() == 0)
    record = (await b.get("u"))[JOBS_FIELD][job["id"]]
    assert record["run"] == 2 and record["node"] == "B"


# -- Redis outage --------------------------------------------------------------------------


async def test_redis_outage_progress_continues_and_the_outcome_is_saved_when_back(
    stores: Stores, redis_server: RedisServer
) -> None:
    store = await stores("A", redis_timeout="100ms", breaker_reset="100ms")
    jobs = Jobs(store)
    gate = Gate(steps=1)
    job = await jobs.start("u", gate)
    seen: list[dict[str, Any]] = []

    async def follower() -> None:
        async for status in jobs.follow("u", job["id"]):
            seen.append(status)

    task = asyncio.create_task(follower())
    await eventually(lambda: len(seen) == 1)
    redis_server.kill()
    gate.step.set()
    async with asyncio.timeout(5):
        await task
    assert seen[-1]["state"] == DONE  # followers see the end without Redis
    assert jobs.running() == 1  # the outcome's write is being retried
    redis_server.start()  # empty: no persistence

    async def saved() -> bool:
        try:
            record = (await store.get("u")).get(JOBS_FIELD, {}).get(job["id"])
        except StoreUnavailable:
            return False
        return record is not None and record["state"] == DONE

    await eventually(saved, deadline=15.0, interval=0.1)


# -- SSE -----------------------------------------------------------------------------------


async def test_sse_follows_a_job_to_its_end(stores: Stores) -> None:
    store = await stores("A")
    jobs = Jobs(store)
    gate = Gate(steps=2)

    async def start(request: web.Request) -> web.Response:
        return web.json_response(
            await jobs.start(request.headers["X-Sticky-Key"], gate), status=202
        )

    async def events(request: web.Request) -> web.StreamResponse:
        return await job_events_response(
            request, jobs, request.headers["X-Sticky-Key"], request.match_info["id"]
        )

    app = web.Application()
    app.router.add_post("/jobs", start)
    app.router.add_get("/jobs/{id}/events", events)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    alice = {"X-Sticky-Key": "alice"}
    try:
        async with ClientSession() as http:
            async with http.post(server.make_url("/jobs"), headers=alice) as r:
                job = await r.json()
            async with http.get(server.make_url(f"/jobs/{job['id']}/events"), headers=alice) as r:
                assert r.headers["Content-Type"] == "text/event-stream"
                gate.step.set()
                events_seen = []
                async with asyncio.timeout(5):
                    async for line in r.content:
                        if line.startswith(b"event: "):
                            events_seen.append(line[7:].strip().decode())
                            gate.step.set()
                        elif line.startswith(b"data: "):
                            last = json.loads(line[6:])
            async with http.get(
                server.make_url(f"/jobs/{job['id']}/events"), headers={"X-Sticky-Key": "bob"}
            ) as r:
                assert r.status == 404
            async with http.get(
                server.make_url("/jobs/" + "x" * 65 + "/events"), headers=alice
            ) as r:
                assert r.status == 400
    finally:
        await server.close()
    assert events_seen[-1] == "done" and set(events_seen[:-1]) == {"progress"}
    assert last["result"]["answer"] == 42


async def test_sse_stream_under_starlette(stores: Stores) -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    from stickyproxy.context import sse_stream

    jobs = Jobs(await stores("A"))
    gate = Gate(steps=1)
    gate.step.set()
    job = await jobs.start("dora", gate)

    async def events(request: Request) -> StreamingResponse | PlainTextResponse:
        stream = sse_stream(jobs, "dora", request.path_params["id"])
        try:
            first = await stream.__anext__()
        except UnknownJob:
            return PlainTextResponse("no such job", status_code=404)

        async def body() -> Any:
            yield first
            async for chunk in stream:
                yield chunk

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/jobs/{id}/events", events)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        async with asyncio.timeout(5):
            r = await client.get(f"/jobs/{job['id']}/events")
            missing = await client.get("/jobs/nope/events")
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "event: done" in r.text and '"answer":42' in r.text
    assert missing.status_code == 404
