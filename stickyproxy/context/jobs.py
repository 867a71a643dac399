"""Long-running per-user jobs at the owner: progress in memory, followed live (SSE or any
async iterator), the start, each app-given checkpoint and the outcome written through to the
user's context, so any later owner reports what happened instead of "unknown job".

Invariants:
* Progress never touches Redis; a job costs one fenced write to start (or none beyond the
  request's own save when started inside a request's context), one per checkpoint, one at
  the end.
* A job record carries its ``run`` number; :meth:`Jobs.resume` increments it, and every
  write of an older run is skipped, so a runner that outlived its user's move cannot
  overwrite the run that replaced it.
* A record says ``running`` only until ``max_runtime`` after its start; past that, an
  instance that is not running it reports it ``lost`` (with its last checkpoint).
* Records are bounded per user (``MAX_RECORDS_PER_USER``, oldest finished first) and
  finished ones are pruned after ``retention``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
)
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from .errors import ConfigError, ContextError, StoreUnavailable
from .metrics import JobMetrics
from .retry import backoff_delay
from .settings import parse_duration

log = logging.getLogger("stickyproxy.context.jobs")

# The context key holding job records: {job id: record}.
JOBS_FIELD = "__stickyctx_jobs"
RUNNING, DONE, FAILED, CANCELLED, LOST = "running", "done", "failed", "cancelled", "lost"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
# Jobs running on one instance at once (a bound on memory and tasks).
DEFAULT_MAX_RUNNING = 1_000
# Jobs running for one user at once.
DEFAULT_MAX_RUNNING_PER_USER = 10
# Finished records kept in a user's context this long.
DEFAULT_RETENTION = 86_400.0
# A record still "running" this long after its start, and not running here, is reported lost.
DEFAULT_MAX_RUNTIME = 3_600.0
# Records per user in the context; beyond, the oldest finished are dropped.
MAX_RECORDS_PER_USER = 50
# Largest encoded checkpoint or result: it travels in the user's context on every write.
MAX_STATE_BYTES = 64 * 1024
# Attempts, and backoff, of the final write when Redis is unreachable.
FINISH_ATTEMPTS = 6
FINISH_BACKOFF_BASE = 0.2
FINISH_BACKOFF_CAP = 5.0
# Longest job id accepted from a request.
MAX_JOB_ID_LENGTH = 64
# Seconds between SSE comments that keep an idle stream open through intermediaries.
SSE_KEEPALIVE = 15.0

Clock = Callable[[], float]


class JobError(ContextError):
    """Base of the job errors."""


class UnknownJob(JobError, KeyError):
    def __init__(self, user: str, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} for user {user!r}")
        self.user = user
        self.job_id = job_id

    def __str__(self) -> str:
        return str(self.args[0])


class JobsFull(JobError):
    """Too many jobs running on this instance or for this user."""


class JobNotResumable(JobError):
    """``resume`` on a job that is running here or has finished."""


def _encoded(value: Any, what: str) -> Any:
    try:
        raw = json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from exc
    if len(raw) > MAX_STATE_BYTES:
        raise ValueError(f"{what} is {len(raw)} bytes encoded; at most {MAX_STATE_BYTES}")
    return json.loads(raw)


# -- pure record logic ---------------------------------------------------------------------


def report(
    job_id: str, record: Mapping[str, Any], *, here: bool, now: float, max_runtime: float
) -> dict[str, Any]:
    """What a status call answers for a stored record (``here``: this instance runs it)."""
    state = record.get("state", LOST)
    if state == RUNNING and not here and now - float(record.get("started", 0)) > max_runtime:
        state = LOST
    return {
        "id": job_id,
        "kind": record.get("kind"),
        "state": state,
        "node": record.get("node"),
        "here": here,
        "run": record.get("run", 1),
        "started": record.get("started"),
        "finished": record.get("finished"),
        "checkpoint": record.get("checkpoint"),
        "result": record.get("result"),
        "error": record.get("error"),
        "progress": None,
    }


def pruned(records: Mapping[str, Any], now: float, retention: float) -> dict[str, Any]:
    """Records without finished ones past ``retention``, at most ``MAX_RECORDS_PER_USER``
    (oldest finished dropped first; running ones are never dropped)."""
    keep = {
        j: r
        for j, r in records.items()
        if isinstance(r, dict)
        and not (r.get("state") in FINISHED and now - float(r.get("finished") or 0) > retention)
    }
    finished = sorted(
        (float(r.get("finished") or 0), j) for j, r in keep.items() if r.get("state") in FINISHED
    )
    while len(keep) > MAX_RECORDS_PER_USER and finished:
        del keep[finished.pop(0)[1]]
    return keep


# -- the running side ----------------------------------------------------------------------


@dataclass
class _Running:
    id: str
    user: str
    kind: str
    run: int
    started: float
    checkpoint: Any = None
    progress: dict[str, Any] | None = None
    state: str = RUNNING
    result: Any = None
    error: str | None = None
    finished: float | None = None
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None

    def record(self, node: str) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "state": self.state,
            "node": node,
            "run": self.run,
            "started": self.started,
            "finished": self.finished,
            "checkpoint": self.checkpoint,
            "result": self.result,
            "error": self.error,
        }


class JobHandle:
    """Given to the job function: report progress (memory only) and save checkpoints."""

    def __init__(self, jobs: Jobs, job: _Running) -> None:
        self._jobs = jobs
        self._job = job

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def user(self) -> str:
        return self._job.user

    @property
    def checkpoint(self) -> Any:
        """The last checkpoint saved (by this run or, after :meth:`Jobs.resume`, an earlier one)."""
        return self._job.checkpoint

    async def progress(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Publish progress to followers. No Redis command."""
        job = self._job
        async with job.changed:
            job.progress = {"done": done, "total": total, "message": message}
            job.version += 1
            job.changed.notify_all()

    async def save_checkpoint(self, value: Any) -> None:
        """Write ``value`` through (one fenced write): a later owner reports it and
        :meth:`Jobs.resume` hands it to the resumed run. Raises :class:`StoreUnavailable`
        when Redis cannot take it (the job decides whether to go on)."""
        value = _encoded(value, "checkpoint")
        self._job.checkpoint = value
        await self._jobs._save(self._job, checkpoint=value)


JobFn = Callable[[JobHandle], Awaitable[Any]]


class Jobs:
    """Per-user jobs on the owner. See docs/context.md."""

    def __init__(
        self,
        store: Any,
        *,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_running_per_user: int = DEFAULT_MAX_RUNNING_PER_USER,
        retention: float | str = DEFAULT_RETENTION,
        max_runtime: float | str = DEFAULT_MAX_RUNTIME,
        registry: CollectorRegistry | None = None,
        clock: Clock = time.time,
    ) -> None:
        for name, value in (
            ("max_running", max_running),
            ("max_running_per_user", max_running_per_user),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        self.store = store
        self.max_running = max_running
        self.max_running_per_user = max_running_per_user
        self.retention = parse_duration(retention, name="retention")
        self.max_runtime = parse_duration(max_runtime, name="max_runtime")
        self.metrics = JobMetrics(registry if registry is not None else store.metrics.registry)
        self.metrics.running.set_function(self.running)
        self._clock = clock
        self._running: dict[str, _Running] = {}

    @property
    def node(self) -> str:
        return str(self.store.node_id)

    def running(self) -> int:
        return len(self._running)

    def _local(self, user: str, job_id: str) -> _Running | None:
        job = self._running.get(job_id)
        return job if job is not None and job.user == user else None

    # -- starting ------------------------------------------------------------------------

    async def start(
        self,
        user: str,
        fn: JobFn,
        *,
        kind: str = "job",
        context: MutableMapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Start ``fn(handle)`` for ``user``; returns its status. The start is recorded
        through the store (one fenced write) or, given the user's ``context`` (a handler under
        the context middleware), in it (saved with the request)."""
        return await self._launch(
            user, secrets.token_urlsafe(9), fn, kind=kind, run=1, checkpoint=None, context=context
        )

    async def resume(
        self, user: str, job_id: str, fn: JobFn, *, context: MutableMapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run again, on this instance, a job whose record says it was running elsewhere (or
        is lost); ``fn`` sees the last checkpoint as ``handle.checkpoint``. Writes of the
        replaced run are skipped from now on."""
        status = await self.status(user, job_id)
        if status["here"] or status["state"] in FINISHED:
            raise JobNotResumable(
                f"job {job_id!r} is {status['state']}{' here' if status['here'] else ''}"
            )
        return await self._launch(
            user,
            job_id,
            fn,
            kind=str(status["kind"] or "job"),
            run=int(status["run"]) + 1,
            checkpoint=status["checkpoint"],
            context=context,
        )

    async def _launch(
        self,
        user: str,
        job_id: str,
        fn: JobFn,
        *,
        kind: str,
        run: int,
        checkpoint: Any,
        context: MutableMapping[str, Any] | None,
    ) -> dict[str, Any]:
        if len(self._running) >= self.max_running:
            raise JobsFull(f"{self.max_running} jobs running on this instance")
        if sum(1 for j in self._running.values() if j.user == user) >= self.max_running_per_user:
            raise JobsFull(f"{self.max_running_per_user} jobs running for this user")
        job = _Running(job_id, user, kind, run, self._clock(), checkpoint=checkpoint)
        record = job.record(self.node)
        if context is not None:
            self._put(context, job_id, record, run)
        else:
            await self.store.update(user, lambda ctx: self._put(ctx, job_id, record, run))
        self._running[job_id] = job
        job.task = asyncio.create_task(self._run(job, fn), name=f"stickyctx-job-{job_id}")
        self.metrics.started.inc()
        return self._report_local(job)

    async def _run(self, job: _Running, fn: JobFn) -> None:
        try:
            result = await fn(JobHandle(self, job))
            job.result, job.state = _encoded(result, "result"), DONE
        except asyncio.CancelledError:
            job.state, job.error = CANCELLED, "cancelled"
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the cancellation was the job's; its outcome is still saved
        except Exception as exc:  # noqa: BLE001 - a job's failure is its outcome, recorded
            job.state, job.error = FAILED, f"{type(exc).__name__}: {exc}"
        job.finished = self._clock()
        self.metrics.finished.labels(job.state).inc()
        async with job.changed:
            job.version += 1
            job.changed.notify_all()
        try:
            await self._save_final(job)
        finally:
            self._running.pop(job.id, None)

    async def _save_final(self, job: _Running) -> None:
        for attempt in range(1, FINISH_ATTEMPTS + 1):
            try:
                await self._save(
                    job,
                    state=job.state,
                    finished=job.finished,
                    result=job.result,
                    error=job.error,
                    checkpoint=job.checkpoint,
                )
                return
            except StoreUnavailable as exc:
                if attempt == FINISH_ATTEMPTS:
                    self.metrics.unsaved.inc()
                    log.error("outcome of job %r of user %r not saved: %s", job.id, job.user, exc)
                    return
                await asyncio.sleep(backoff_delay(attempt, FINISH_BACKOFF_BASE, FINISH_BACKOFF_CAP))
            except ContextError as exc:
                # Conflicts on every attempt, a closed store, a record of another user.
                self.metrics.unsaved.inc()
                log.error("outcome of job %r of user %r not saved: %s", job.id, job.user, exc)
                return

    async def _save(self, job: _Running, **changes: Any) -> None:
        record = job.record(self.node)

        def apply(ctx: dict[str, Any]) -> None:
            current = (ctx.get(JOBS_FIELD) or {}).get(job.id)
            base = dict(current) if isinstance(current, dict) else record
            if int(base.get("run", 1)) > job.run:
                return  # a resumed run replaced this one
            self._put(ctx, job.id, {**base, **changes, "node": self.node, "run": job.run}, job.run)

        await self.store.update(job.user, apply)

    def _put(
        self, ctx: MutableMapping[str, Any], job_id: str, record: dict[str, Any], run: int
    ) -> None:
        records = ctx.get(JOBS_FIELD)
        records = dict(records) if isinstance(records, dict) else {}
        current = records.get(job_id)
        if isinstance(current, dict) and int(current.get("run", 1)) > run:
            return
        records[job_id] = record
        ctx[JOBS_FIELD] = pruned(records, self._clock(), self.retention)

    # -- reading -------------------------------------------------------------------------

    def _report_local(self, job: _Running) -> dict[str, Any]:
        status = report(
            job.id,
            job.record(self.node),
            here=True,
            now=self._clock(),
            max_runtime=self.max_runtime,
        )
        status["progress"] = dict(job.progress) if job.progress else None
        return status

    def status_in(self, user: str, context: Mapping[str, Any], job_id: str) -> dict[str, Any]:
        """The job's status from a context the caller holds; :class:`UnknownJob` if none."""
        job = self._local(user, job_id)
        if job is not None:
            return self._report_local(job)
        records = context.get(JOBS_FIELD)
        record = records.get(job_id) if isinstance(records, dict) else None
        if not isinstance(record, dict):
            raise UnknownJob(user, job_id)
        return report(job_id, record, here=False, now=self._clock(), max_runtime=self.max_runtime)

    async def status(self, user: str, job_id: str) -> dict[str, Any]:
        """Progress from memory if the job runs here, else its record from the user's
        context (memory in steady state). :class:`UnknownJob` if there is none."""
        job = self._local(user, job_id)
        if job is not None:
            return self._report_local(job)
        return self.status_in(user, await self.store.get(user), job_id)

    async def follow(self, user: str, job_id: str) -> AsyncIterator[dict[str, Any]]:
        """The status now, then at every change, until the job ends. A job not running here
        yields its recorded status once."""
        job = self._local(user, job_id)
        if job is None:
            yield await self.status(user, job_id)
            return
        seen = -1
        while True:
            async with job.changed:
                await job.changed.wait_for(lambda: job.version != seen)
                seen = job.version
                status = self._report_local(job)
            yield status
            if status["state"] != RUNNING:
                return

    async def cancel(self, user: str, job_id: str) -> bool:
        """Cancel a job running here (its outcome ``cancelled`` is saved). False if it is not."""
        job = self._local(user, job_id)
        if job is None or job.task is None:
            return False
        job.task.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.shield(job.task)
        return True

    async def close(self) -> None:
        """Cancel every running job; each records ``cancelled`` if Redis takes it in time."""
        tasks = [j.task for j in self._running.values() if j.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task


# -- following over Server-Sent Events -----------------------------------------------------


def sse_event(status: Mapping[str, Any]) -> bytes:
    """One SSE event (WHATWG HTML, "Server-sent events"): ``event: <state>``, JSON data."""
    event = "progress" if status["state"] == RUNNING else str(status["state"])
    return f"event: {event}\ndata: {json.dumps(status, separators=(',', ':'))}\n\n".encode()


async def sse_stream(jobs: Jobs, user: str, job_id: str) -> AsyncGenerator[bytes, None]:
    """The job's events as SSE bytes, for any framework's streaming response (Starlette:
    ``StreamingResponse(sse_stream(...), media_type="text/event-stream")``). Raises
    :class:`UnknownJob` before the first event for a job the user does not have. A comment
    line is sent after ``SSE_KEEPALIVE`` seconds without an event."""
    updates = jobs.follow(user, job_id).__aiter__()
    next_update: asyncio.Task[dict[str, Any]] | None = None
    try:
        while True:
            if next_update is None:
                next_update = asyncio.ensure_future(updates.__anext__())
            done, _ = await asyncio.wait({next_update}, timeout=SSE_KEEPALIVE)
            if not done:
                yield b": keepalive\n\n"
                continue
            try:
                status = next_update.result()
            except StopAsyncIteration:
                return
            next_update = None
            yield sse_event(status)
    finally:
        if next_update is not None and not next_update.done():
            next_update.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await next_update


def job_id_problem(job_id: str) -> str | None:
    if not job_id or len(job_id) > MAX_JOB_ID_LENGTH:
        return f"job id must be 1 to {MAX_JOB_ID_LENGTH} characters"
    return None


async def job_events_response(
    request: web.Request, jobs: Jobs, user: str, job_id: str
) -> web.StreamResponse:
    """An aiohttp response streaming the job's events (``text/event-stream``); 404 for a job
    the user does not have, 400 for an unusable id, 503 if its record cannot be read."""
    problem = job_id_problem(job_id)
    if problem is not None:
        return web.Response(status=400, text=problem + "\n")
    stream = sse_stream(jobs, user, job_id)
    try:
        first = await stream.__anext__()
    except UnknownJob as exc:
        return web.Response(status=404, text=str(exc) + "\n")
    except StoreUnavailable:
        return web.Response(
            status=503, text="job records unavailable\n", headers={"Retry-After": "1"}
        )
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        await response.write(first)
        async for chunk in stream:
            await response.write(chunk)
    except ConnectionResetError:
        pass
    finally:
        await stream.aclose()
    return response
