"""Long-running jobs whose progress a user follows over a WebSocket.

A job is ``steps`` steps of simulated work. Progress is a dict
``{"id", "step", "steps", "state"}`` with state ``running`` then ``done``.

``StickyJobs`` runs jobs with the context library's ``Jobs``: progress in this process, the
WebSocket that follows a job reaching the instance running it, which sticky routing
guarantees (the proxy pins the user, so the tunnel goes where the job is); the outcome is
written to the user's context, so another instance can report it. ``RedisJobs`` is the stateless design: the runner writes each
step to Redis and any instance polls Redis to follow a job.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any, Protocol

from stickyproxy.context import ContextStore, JobHandle, Jobs, UnknownJob
from stickyproxy.context import JobsFull as LibraryJobsFull

# Jobs one instance keeps (running and finished) before refusing new ones.
MAX_JOBS = 1000
# Seconds a finished job stays visible.
JOB_RETENTION = 600.0
# Polls without progress after which a follower of a Redis job gives up (its runner died).
STALL_POLLS = 20
RUNNING, DONE, STALLED = "running", "done", "stalled"
# A sticky job still recorded as running this many times its expected length after its start
# is reported lost by an instance that is not running it.
STALL_FACTOR = 10


class JobsFull(Exception):
    """Too many jobs on this instance."""


class ShopJobs(Protocol):
    async def start(self, user: str) -> dict[str, Any]: ...
    async def status(self, user: str, job_id: str) -> dict[str, Any] | None: ...
    def follow(self, user: str, job_id: str) -> AsyncIterator[dict[str, Any]]: ...
    def running(self) -> int: ...
    async def close(self) -> None: ...


def new_job_id() -> str:
    return secrets.token_urlsafe(9)


def _shop_progress(status: dict[str, Any], steps: int) -> dict[str, Any]:
    """The library's job status in the shop's format (a finished job's own step count is in
    its result: the instance reporting it may be configured differently)."""
    progress = status.get("progress") or {}
    result = status.get("result")
    if isinstance(result, dict) and isinstance(result.get("steps"), int):
        steps = result["steps"]
    step = steps if status["state"] == DONE else int(progress.get("done") or 0)
    return {"id": status["id"], "step": step, "steps": steps, "state": status["state"]}


class StickyJobs:
    """The context library's jobs: progress in this instance's memory, followed over the
    WebSocket that sticky routing brings here; the start and the outcome written to the
    user's context, so the instance that takes the user over reports a finished job as
    done (and an interrupted one as running elsewhere, then lost) instead of unknown."""

    def __init__(
        self,
        store: ContextStore,
        steps: int,
        step_seconds: float,
        *,
        max_jobs: int = MAX_JOBS,
        retention: float = JOB_RETENTION,
    ) -> None:
        self.steps = steps
        self.step_seconds = step_seconds
        self.jobs = Jobs(
            store,
            max_running=max_jobs,
            retention=retention,
            max_runtime=max(1.0, steps * step_seconds * STALL_FACTOR),
        )

    def running(self) -> int:
        return self.jobs.running()

    async def _work(self, handle: JobHandle) -> dict[str, Any]:
        # The last step's progress is the outcome itself, so each step is reported once.
        for step in range(1, self.steps):
            await asyncio.sleep(self.step_seconds)
            await handle.progress(step, self.steps)
        await asyncio.sleep(self.step_seconds)
        return {"steps": self.steps}

    async def start(self, user: str) -> dict[str, Any]:
        try:
            status = await self.jobs.start(user, self._work, kind="simulated")
        except LibraryJobsFull:
            raise JobsFull from None
        return _shop_progress(status, self.steps)

    async def status(self, user: str, job_id: str) -> dict[str, Any] | None:
        try:
            return _shop_progress(await self.jobs.status(user, job_id), self.steps)
        except UnknownJob:
            return None

    async def follow(self, user: str, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Each step once, from the current one, until the job ends."""
        try:
            async for status in self.jobs.follow(user, job_id):
                yield _shop_progress(status, self.steps)
        except UnknownJob:
            return

    async def close(self) -> None:
        await self.jobs.close()


def job_key(namespace: str, job_id: str) -> str:
    return f"{namespace}:job:{job_id}"


class RedisJobs:
    def __init__(
        self,
        redis: Any,
        namespace: str,
        steps: int,
        step_seconds: float,
        *,
        max_jobs: int = MAX_JOBS,
        retention: float = JOB_RETENTION,
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self.steps = steps
        self.step_seconds = step_seconds
        self.max_jobs = max_jobs
        self.retention_ms = int(retention * 1000)
        self._tasks: set[asyncio.Task[None]] = set()

    def running(self) -> int:
        return len(self._tasks)

    async def start(self, user: str) -> dict[str, Any]:
        if len(self._tasks) >= self.max_jobs:
            raise JobsFull
        job_id = new_job_id()
        key = job_key(self.namespace, job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={"user": user, "step": 0, "steps": self.steps, "state": RUNNING})
            pipe.pexpire(key, self.retention_ms)
            await pipe.execute()
        task = asyncio.create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"id": job_id, "step": 0, "steps": self.steps, "state": RUNNING}

    async def _run(self, key: str) -> None:
        for step in range(1, self.steps + 1):
            await asyncio.sleep(self.step_seconds)
            fields: dict[str, Any] = {"step": step}
            if step == self.steps:
                fields["state"] = DONE
            await self.redis.hset(key, mapping=fields)

    async def status(self, user: str, job_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(job_key(self.namespace, job_id))
        if not raw or raw.get(b"user", b"").decode() != user:
            return None
        return {
            "id": job_id,
            "step": int(raw[b"step"]),
            "steps": int(raw[b"steps"]),
            "state": raw[b"state"].decode(),
        }

    async def follow(self, user: str, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Polls Redis once per step interval; yields each change until the job is done, or
        ``stalled`` once it made no progress for ``STALL_POLLS`` polls."""
        seen, idle = -1, 0
        while True:
            progress = await self.status(user, job_id)
            if progress is None:
                return
            if progress["step"] != seen:
                seen, idle = progress["step"], 0
                yield progress
                if progress["state"] == DONE:
                    return
            else:
                idle += 1
                if idle >= STALL_POLLS:
                    yield {**progress, "state": STALLED}
                    return
            await asyncio.sleep(self.step_seconds)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(asyncio.CancelledError):
                await task
