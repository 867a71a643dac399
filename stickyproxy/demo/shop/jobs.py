"""Long-running jobs whose progress a user follows over a WebSocket.

A job is ``steps`` steps of simulated work. Progress is a dict
``{"id", "step", "steps", "state"}`` with state ``running`` then ``done``.

``LocalJobs`` keeps jobs in this process: the WebSocket that follows a job must reach the
instance running it, which sticky routing guarantees (the proxy pins the user, so the
tunnel goes where the job is). ``RedisJobs`` is the stateless design: the runner writes each
step to Redis and any instance polls Redis to follow a job.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

# Jobs one instance keeps (running and finished) before refusing new ones.
MAX_JOBS = 1000
# Seconds a finished job stays visible.
JOB_RETENTION = 600.0
# Polls without progress after which a follower of a Redis job gives up (its runner died).
STALL_POLLS = 20
RUNNING, DONE, STALLED = "running", "done", "stalled"


class JobsFull(Exception):
    """Too many jobs on this instance."""


class Jobs(Protocol):
    async def start(self, user: str) -> dict[str, Any]: ...
    async def status(self, user: str, job_id: str) -> dict[str, Any] | None: ...
    def follow(self, user: str, job_id: str) -> AsyncIterator[dict[str, Any]]: ...
    def running(self) -> int: ...
    async def close(self) -> None: ...


def new_job_id() -> str:
    return secrets.token_urlsafe(9)


@dataclass
class _Job:
    id: str
    user: str
    steps: int
    step: int = 0
    state: str = RUNNING
    finished_at: float = 0.0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def progress(self) -> dict[str, Any]:
        return {"id": self.id, "step": self.step, "steps": self.steps, "state": self.state}

    def moved_from(self, step: int) -> bool:
        return self.step != step


class LocalJobs:
    def __init__(self, steps: int, step_seconds: float, *, max_jobs: int = MAX_JOBS,
                 retention: float = JOB_RETENTION) -> None:
        self.steps = steps
        self.step_seconds = step_seconds
        self.max_jobs = max_jobs
        self.retention = retention
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def running(self) -> int:
        return len(self._tasks)

    async def start(self, user: str) -> dict[str, Any]:
        self._prune(time.monotonic())
        if len(self._jobs) >= self.max_jobs:
            raise JobsFull
        job = _Job(new_job_id(), user, self.steps)
        self._jobs[job.id] = job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job.progress()

    async def _run(self, job: _Job) -> None:
        for step in range(1, job.steps + 1):
            await asyncio.sleep(self.step_seconds)
            async with job.changed:
                job.step = step
                if step == job.steps:
                    job.state = DONE
                    job.finished_at = time.monotonic()
                job.changed.notify_all()

    def _find(self, user: str, job_id: str) -> _Job | None:
        job = self._jobs.get(job_id)
        return job if job is not None and job.user == user else None

    async def status(self, user: str, job_id: str) -> dict[str, Any] | None:
        job = self._find(user, job_id)
        return job.progress() if job is not None else None

    async def follow(self, user: str, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """Each step once, from the current one, until the job is done."""
        job = self._find(user, job_id)
        if job is None:
            return
        seen = -1
        while True:
            async with job.changed:
                await job.changed.wait_for(partial(job.moved_from, seen))
                seen = job.step
                progress = job.progress()
            yield progress
            if progress["state"] == DONE:
                return

    def _prune(self, now: float) -> None:
        for job_id in [j.id for j in self._jobs.values()
                       if j.state == DONE and now - j.finished_at > self.retention]:
            del self._jobs[job_id]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with suppress(asyncio.CancelledError):
                await task


def job_key(namespace: str, job_id: str) -> str:
    return f"{namespace}:job:{job_id}"


class RedisJobs:
    def __init__(self, redis: Any, namespace: str, steps: int, step_seconds: float, *,
                 max_jobs: int = MAX_JOBS, retention: float = JOB_RETENTION) -> None:
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
        return {"id": job_id, "step": int(raw[b"step"]), "steps": int(raw[b"steps"]),
                "state": raw[b"state"].decode()}

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
