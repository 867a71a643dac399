"""ContextStore: per-user context in local memory, written through to Redis under an
epoch/owner fence, rehydrated from Redis when a user lands on this instance.

Invariants:
* A cached entry is served without Redis only while it is *verified*: the takeover listener is
  subscribed and has been continuously since the entry was last confirmed (``verified_gen``
  equals the current listener generation), and its Redis TTL cannot have run out.
* Every change reaches Redis through the fenced WRITE script with the epoch the entry was
  acquired at; Redis rejects it once any other instance has acquired the user since.
* One user's loads, commits and flushes on this instance run under that user's lock, so two
  writes of one user from this instance are never in flight at once (no reordering).
* A pending (buffered) write of a user is flushed before that user is acquired or re-read, so a
  re-acquire never overtakes this instance's own unflushed change.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar, overload

from prometheus_client import CollectorRegistry
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from .breaker import BreakerState, CircuitBreaker
from .buffer import PendingWrite, PendingWrites
from .connection import (
    PROMOTING_CHANNEL,
    SWITCH_MASTER_CHANNEL,
    RedisClients,
    build_clients,
    parse_redis_url,
)
from .errors import (
    BufferFull,
    ConfigError,
    ConflictError,
    RecordMismatch,
    StoreClosed,
    StoreUnavailable,
)
from .locks import UserLocks, UserSlot
from .lru import LruCache
from .metrics import ContextMetrics
from .record import (
    WriteOutcome,
    parse_acquire,
    parse_delete,
    parse_snapshot,
    parse_takeover,
    parse_write,
)
from .retry import Op, backoff_delay, should_retry_redis
from .scripts import (
    ACQUIRE,
    DELETE,
    FIELD_DATA,
    FIELD_EPOCH,
    FIELD_OWNER,
    FIELD_UID,
    WRITE,
    record_key,
    takeover_channel,
)
from .serializers import JsonSerializer, Serializer
from .settings import (
    DEFAULT_BREAKER_FAILURES,
    DEFAULT_BREAKER_RESET,
    DEFAULT_BUFFER_MAX,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_IDLE_TTL,
    DEFAULT_LISTENER_LIVENESS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MODE,
    DEFAULT_NAMESPACE,
    DEFAULT_ON_REDIS_DOWN,
    DEFAULT_POOL_SIZE,
    DEFAULT_REDIS_TIMEOUT,
    DEFAULT_UPDATE_ATTEMPTS,
    Mode,
    OnRedisDown,
    StoreSettings,
    default_node_id,
    parse_duration,
)

log = logging.getLogger("stickyproxy.context")

T = TypeVar("T")

# A local copy is trusted for this share of the idle TTL after Redis's TTL was last refreshed,
# so it never outlives the Redis record (whose expiry would reset the epoch).
LOCAL_EXPIRY_FRACTION = 0.9
# A read refreshes the Redis TTL (one fenced PEXPIRE) once this share of the TTL has passed.
TOUCH_FRACTION = 0.5
# Bytes charged per cached entry beyond payload and user id: the Python objects holding them.
ENTRY_OVERHEAD = 200
# The takeover listener pings this many times per ``listener_liveness``, so that on a live
# connection the newest proof is never older than a quarter of the window plus one round trip.
LISTENER_PINGS_PER_WINDOW = 4
# Listener reconnect backoff: first delay and ceiling.
LISTENER_BACKOFF_BASE = 0.05
LISTENER_BACKOFF_CAP = 2.0
# Floor of the listener's subscribe deadline (it is not on a request path).
LISTENER_MIN_DEADLINE = 1.0
# How long start() waits for the first subscription before serving with unverified entries.
START_WAIT = 1.0
# Bound on close()'s final flush and on closing a pub/sub connection.
CLOSE_DEADLINE = 5.0

# ``stickyctx_acquisitions_total`` reason of a re-acquire after Redis lost the held epoch.
LOST_REASON = "lost"
_UNVERIFIED = -1
# Replies meaning "Redis is there but cannot serve now": they count towards the breaker.
_UNAVAILABLE_REPLIES = (
    BusyLoadingError,
    ReadOnlyError,
    ClusterDownError,
    MasterDownError,
    TryAgainError,
)
_UNAVAILABLE_PREFIXES = (
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "NOREPLICAS",
)


@dataclass
class _Entry:
    payload: bytes
    epoch: int
    refreshed_at: float
    verified_gen: int


# Longest a Sentinel failover may pause Redis calls between "promotion imminent" and the
# switch announcement (measured: about 1 s; Sentinel's own failover-timeout default is 3 min).
FAILOVER_PAUSE_MAX = 10.0

# How often close() repeats the cancellation of a background task that has not ended.
CANCEL_REPEAT = 0.1


async def _cancel_and_wait(tasks: list[asyncio.Task[None]], deadline: float) -> None:
    """Cancel ``tasks`` and wait (at most ``deadline``) for them to end, cancelling again while
    they run: a cancellation that lands as a read times out can be turned into a TimeoutError
    inside the Redis client and lost. asyncio.wait neither raises the tasks' errors nor
    swallows a cancellation of the caller."""
    pending = {task for task in tasks if not task.done()}
    end = time.monotonic() + deadline
    while pending and time.monotonic() < end:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_REPEAT)
    if pending:
        log.error(
            "background tasks did not stop within %gs: %s",
            deadline,
            ", ".join(t.get_name() for t in pending),
        )


def _cancelling() -> bool:
    """Whether the current task has a cancellation pending that something below swallowed."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class NotReplicated(RedisError):
    """WAIT returned fewer confirmations than ``wait_replicas``: the change may sit on the
    master alone (or on a demoted one), so it is not acknowledged. Counts as an outage."""


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, ResponseError):
        return isinstance(exc, _UNAVAILABLE_REPLIES) or str(exc).startswith(_UNAVAILABLE_PREFIXES)
    return True


class ContextStore:
    """Per-user context held in memory and fenced in Redis. See docs/context.md."""

    def __init__(
        self,
        redis_url: str,
        *,
        node_id: str | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        idle_ttl: float | str = DEFAULT_IDLE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        mode: Mode = DEFAULT_MODE,
        flush_interval: float | str = DEFAULT_FLUSH_INTERVAL,
        on_redis_down: OnRedisDown = DEFAULT_ON_REDIS_DOWN,
        buffer_max: int = DEFAULT_BUFFER_MAX,
        redis_timeout: float | str = DEFAULT_REDIS_TIMEOUT,
        breaker_failures: int = DEFAULT_BREAKER_FAILURES,
        breaker_reset: float | str = DEFAULT_BREAKER_RESET,
        pool_size: int = DEFAULT_POOL_SIZE,
        cluster: bool = False,
        listener_liveness: float | str = DEFAULT_LISTENER_LIVENESS,
        wait_replicas: int = 0,
        serializer: Serializer | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._target = parse_redis_url(redis_url, cluster=cluster)
        if wait_replicas and self._target.kind == "cluster":
            raise ConfigError("wait_replicas: not supported with a Cluster (use 0)")
        self.settings = StoreSettings(
            redis_url=redis_url,
            node_id=node_id or default_node_id(),
            namespace=namespace,
            idle_ttl=parse_duration(idle_ttl, name="idle_ttl"),
            max_entries=max_entries,
            max_bytes=max_bytes,
            mode=mode,
            flush_interval=parse_duration(flush_interval, name="flush_interval"),
            on_redis_down=on_redis_down,
            buffer_max=buffer_max,
            redis_timeout=parse_duration(redis_timeout, name="redis_timeout"),
            breaker_failures=breaker_failures,
            breaker_reset=parse_duration(breaker_reset, name="breaker_reset"),
            pool_size=pool_size,
            cluster=cluster,
            listener_liveness=parse_duration(listener_liveness, name="listener_liveness"),
            wait_replicas=wait_replicas,
        )
        self._serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        self._empty = self._serializer.dumps({})
        self.metrics = ContextMetrics(registry)
        self._cache: LruCache[_Entry] = LruCache(max_entries, max_bytes)
        self._pending = PendingWrites(buffer_max)
        # Buffered changes taken out of ``_pending`` whose write is in flight.
        self._flushing = 0
        self._locks = UserLocks()
        # One breaker per Redis node: in a Cluster a dead master refuses calls for its own slots
        # only. Single server and Sentinel use the one breaker under "".
        self._breakers: dict[str, CircuitBreaker] = {"": self._new_breaker()}
        self._channel = takeover_channel(namespace)
        self._clients: RedisClients | None = None
        self._acquire_script: Any = None
        self._write_script: Any = None
        self._delete_script: Any = None
        self._gen = 0
        self._listener_up = False
        # Monotonic time at which the newest proof of the listener's liveness was *sent*: every
        # takeover published before it has been delivered to this instance.
        self._proof_at = float("-inf")
        self._switched_to: list[str] = []
        # Sentinel: set while a promotion is imminent; Redis calls are refused until then.
        self._failover_pause_until: float | None = None
        self._listener_ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "new"

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def listener_connected(self) -> bool:
        return self._listener_up

    @property
    def breaker_state(self) -> BreakerState:
        """The worst state of any node's breaker (the only one outside a Cluster)."""
        states = [b.state for b in self._breakers.values()]
        if BreakerState.OPEN in states:
            return BreakerState.OPEN
        if BreakerState.HALF_OPEN in states:
            return BreakerState.HALF_OPEN
        return BreakerState.CLOSED

    def _new_breaker(self) -> CircuitBreaker:
        return CircuitBreaker(self.settings.breaker_failures, self.settings.breaker_reset)

    def _breaker_for(self, key: str) -> CircuitBreaker:
        """The breaker of the node serving ``key`` (Cluster), else the store's one breaker."""
        if self._target.kind != "cluster" or self._clients is None:
            return self._breakers[""]
        try:
            node = self._clients.command.get_node_from_key(key)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - slots not known yet: the shared breaker decides
            node = None
        name = "" if node is None else str(node.name)
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = self._new_breaker()
        return breaker

    @property
    def pending_writes(self) -> int:
        """Changes acknowledged but not yet in Redis (buffered or being flushed)."""
        return len(self._pending) + self._flushing

    @property
    def redis(self) -> Any:
        """The command client (``redis.asyncio.Redis`` or ``RedisCluster``); for diagnostics."""
        if self._clients is None:
            raise StoreClosed("store is not started")
        return self._clients.command

    def holds(self, user: str) -> bool:
        """Whether ``user`` is in local memory (verified or not)."""
        return user in self._cache

    def epoch_of(self, user: str) -> int | None:
        """The epoch of ``user``'s copy held here (verified or not), or None. It changes
        whenever any instance acquires or deletes the user, so state derived from the user
        under one epoch can be recognised as older than a move."""
        entry = self._cache.peek(user)
        return None if entry is None else entry.epoch

    async def start(self) -> None:
        """Create clients, start the takeover listener (and the flusher when writes can be
        buffered), and wait briefly for the first subscription. Does not fail if Redis is down:
        the listener keeps retrying and Redis calls fail with ``StoreUnavailable`` meanwhile."""
        if self._state != "new":
            raise StoreClosed(f"store is {self._state}; create a new one")
        self._state = "running"
        self._clients = build_clients(
            self._target, timeout=self.settings.redis_timeout, pool_size=self.settings.pool_size
        )
        command = self._clients.command
        self._acquire_script = command.register_script(ACQUIRE)
        self._write_script = command.register_script(WRITE)
        self._delete_script = command.register_script(DELETE)
        self._listener_ready = asyncio.Event()
        self._tasks.append(
            asyncio.create_task(self._listen(), name=f"stickyctx-listener-{self.node_id}")
        )
        if self.settings.buffers_writes:
            self._tasks.append(
                asyncio.create_task(self._flush_loop(), name=f"stickyctx-flusher-{self.node_id}")
            )
        if self._target.kind == "sentinel":
            self._tasks.append(
                asyncio.create_task(
                    self._clients.watch_master_switches(self._on_master_switch),
                    name=f"stickyctx-sentinel-{self.node_id}",
                )
            )
        with suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT):
                await self._listener_ready.wait()

    async def close(self) -> None:
        """Stop background tasks, flush buffered writes (bounded), close connections."""
        if self._state != "running":
            self._state = "closed"
            return
        self._state = "closing"
        await _cancel_and_wait(self._tasks, CLOSE_DEADLINE)
        self._tasks.clear()
        # A flush the cancellation interrupted has put its change back (see _flush_user).
        if len(self._pending):
            with suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_DEADLINE):
                    await self.flush()
            if len(self._pending):
                lost = len(self._pending)
                self.metrics.dropped_changes.labels("closed").inc(lost)
                log.error(
                    "closing with %d buffered context changes not in Redis (users %s); they are lost",
                    lost,
                    ", ".join(repr(u) for u in self._pending.users()[:10]),
                )
        assert self._clients is not None
        with suppress(Exception):
            await self._clients.aclose()
        self._cache.clear()
        self._listener_up = False
        self._state = "closed"
        self._update_gauges()

    async def __aenter__(self) -> ContextStore:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_running(self) -> None:
        if self._state != "running":
            raise StoreClosed(f"store is {self._state}")

    # -- public API ------------------------------------------------------------------------

    async def get(self, user: str) -> Mapping[str, Any]:
        """A read-only copy of ``user``'s context (empty if none). No Redis call in steady state."""
        self._check_running()
        entry = self._cache.get(user)
        if entry is not None and self._fresh(entry, time.monotonic()):
            self.metrics.local_hits.inc()
            return MappingProxyType(self._serializer.loads(entry.payload))
        async with self._locks.hold(user) as slot:
            entry = await self._load(user, slot)
            return MappingProxyType(self._serializer.loads(entry.payload))

    @asynccontextmanager
    async def edit(self, user: str) -> AsyncIterator[dict[str, Any]]:
        """A mutable copy of ``user``'s context; saved when the block exits, only if changed.

        Nothing is saved if the block raises. Write-through: when the block exits, the change
        is in Redis. Raises :class:`ConflictError` if another instance took the user over (the
        local copy is dropped; use :meth:`update` to retry) and :class:`StoreUnavailable` if
        Redis cannot take the write and it cannot be buffered.
        """
        self._check_running()
        async with self._locks.hold(user) as slot:
            entry = await self._load(user, slot)
            context = self._serializer.loads(entry.payload)
            yield context
            payload = self._serializer.dumps(context)
            if payload != entry.payload:
                await self._commit(user, slot, entry, payload)

    @overload
    async def update(
        self, user: str, fn: Callable[[dict[str, Any]], Awaitable[T]], *, attempts: int = ...
    ) -> T: ...

    @overload
    async def update(
        self, user: str, fn: Callable[[dict[str, Any]], T], *, attempts: int = ...
    ) -> T: ...

    async def update(
        self,
        user: str,
        fn: Callable[[dict[str, Any]], Any],
        *,
        attempts: int = DEFAULT_UPDATE_ATTEMPTS,
    ) -> Any:
        """Apply ``fn`` to ``user``'s context and save it; on a conflict, re-acquire and run
        ``fn`` again, up to ``attempts`` times. Returns what ``fn`` returned."""
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        for attempt in range(1, attempts + 1):
            try:
                async with self.edit(user) as context:
                    result = fn(context)
                    if inspect.isawaitable(result):
                        result = await result
                return result
            except ConflictError:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    async def delete(self, user: str) -> None:
        """Forget ``user`` everywhere: Redis keeps an empty tombstone (so epochs never go back)
        and every instance holding the user drops it."""
        self._check_running()
        async with self._locks.hold(user):
            dropped = self._pending.pop(user)
            key = record_key(self.settings.namespace, user)
            try:
                reply = await self._redis(
                    Op.DELETE,
                    key,
                    lambda: self._replicated(
                        self._delete_script, [key], [user, self.settings.idle_ttl_ms, self._channel]
                    ),
                )
            except (StoreUnavailable, asyncio.CancelledError):
                # Outcome unknown: keep the buffered change (if the delete landed, its flush is
                # fenced off as "deleted") and re-read the copy before trusting it.
                if dropped is not None:
                    self._pending.restore(user, dropped)
                entry = self._cache.peek(user)
                if entry is not None:
                    entry.verified_gen = _UNVERIFIED
                raise
            finally:
                self._update_gauges()
            self._forget(user)
            if dropped is not None:
                self._drop(user, "deleted", "the user was deleted")
            parse_delete(reply, user)

    async def flush(self) -> int:
        """Write every buffered change now (fenced). Returns how many reached Redis; a change
        whose write fails stays buffered."""
        if self._state not in ("running", "closing"):
            raise StoreClosed(f"store is {self._state}")
        written = 0
        for user in self._pending.users():
            async with self._locks.hold(user) as slot:
                try:
                    if await self._flush_user(user, slot):
                        written += 1
                except StoreUnavailable:
                    # Left buffered; other users may live on other (Cluster) nodes, and once
                    # this node's breaker opens their calls fail without waiting.
                    continue
                except RecordMismatch:
                    continue
        return written

    # -- loading ---------------------------------------------------------------------------

    def _verified(self, entry: _Entry, now: float) -> bool:
        """The stale-read rule (C3): a copy is served without asking Redis only if it was
        confirmed on the current subscription and the listener proved within
        ``listener_liveness`` that every takeover published before the proof reached us. Whether
        Redis is reachable, or the breaker open, plays no part."""
        return (
            entry.verified_gen == self._gen
            and now - self._proof_at <= self.settings.listener_liveness
        )

    def _fresh(self, entry: _Entry, now: float) -> bool:
        return (
            self._verified(entry, now)
            and now - entry.refreshed_at < self.settings.idle_ttl * TOUCH_FRACTION
        )

    async def _load(self, user: str, slot: UserSlot) -> _Entry:
        entry = self._cache.get(user)
        if entry is None:
            return await self._acquire(user, slot, reason=None)
        age = time.monotonic() - entry.refreshed_at
        if age >= self.settings.idle_ttl * LOCAL_EXPIRY_FRACTION:
            self._forget(user)
            return await self._acquire(user, slot, reason="revalidate")
        if not self._verified(entry, time.monotonic()):
            return await self._revalidate(user, slot, entry)
        if age >= self.settings.idle_ttl * TOUCH_FRACTION:
            return await self._touch(user, slot, entry)
        self.metrics.local_hits.inc()
        return entry

    def _current_gen(self) -> int:
        return self._gen if self._listener_up else _UNVERIFIED

    async def _acquire(self, user: str, slot: UserSlot, *, reason: str | None) -> _Entry:
        await self._flush_user(user, slot)
        key = record_key(self.settings.namespace, user)
        gen = self._current_gen()
        started = time.monotonic()
        reply = await self._redis(
            Op.ACQUIRE,
            key,
            lambda: self._replicated(
                self._acquire_script,
                [key],
                [self.node_id, user, self.settings.idle_ttl_ms, self._channel],
            ),
        )
        acquired = parse_acquire(reply, user)
        if reason is None:
            if acquired.previous_owner is None:
                reason = "first"
            elif acquired.previous_owner == self.node_id:
                reason = "revalidate"
            else:
                reason = "takeover"
        self.metrics.acquisitions.labels(reason).inc()
        entry = _Entry(acquired.payload or self._empty, acquired.epoch, started, gen)
        self._install(user, slot, entry)
        return entry

    async def _revalidate(self, user: str, slot: UserSlot, entry: _Entry) -> _Entry:
        key = record_key(self.settings.namespace, user)
        try:
            await self._flush_user(user, slot)
            if self._cache.peek(user) is not entry:
                return await self._acquire(user, slot, reason="revalidate")
            gen = self._current_gen()
            reply = await self._redis(
                Op.READ,
                key,
                lambda: self._command.hmget(key, FIELD_UID, FIELD_EPOCH, FIELD_OWNER, FIELD_DATA),
            )
        except StoreUnavailable:
            # Unverified and Redis unreachable from here: another instance may still reach it
            # and have taken the user over, so the copy is not served (C3 over C5).
            self.metrics.unverified_refusals.inc()
            raise
        try:
            snapshot = parse_snapshot(reply, user)
        except RecordMismatch:
            self._forget(user)
            raise
        if snapshot.owned_by(self.node_id, entry.epoch):
            # Under this epoch only this instance writes, so Redis's data is the newest.
            confirmed = replace(entry, payload=snapshot.payload or self._empty, verified_gen=gen)
            self._install(user, slot, confirmed)
            return confirmed
        self._forget(user)
        if snapshot.epoch is None or snapshot.epoch < entry.epoch:
            self._report_lost(user, entry.epoch, snapshot.epoch)
            return await self._acquire(user, slot, reason=LOST_REASON)
        return await self._acquire(user, slot, reason="revalidate")

    @staticmethod
    def _report_lost(user: str, held: int, found: int | None) -> None:
        """Epochs only grow while a record lives, and a held copy never outlives its record's
        TTL: finding no record, or a lower epoch, means Redis lost what it had acknowledged
        (restart without persistence, promotion of a node that never had it). Nothing here
        can restore it safely (a newer owner's copy may be lost too); the loss is made loud."""
        log.error(
            "redis lost acknowledged context of user %r: this instance held epoch %d, redis has %s; "
            "continuing from what redis holds",
            user,
            held,
            "no record" if found is None else f"epoch {found}",
        )

    async def _touch(self, user: str, slot: UserSlot, entry: _Entry) -> _Entry:
        key = record_key(self.settings.namespace, user)
        started = time.monotonic()
        try:
            reply = await self._redis(
                Op.TOUCH,
                key,
                lambda: self._write_script(
                    keys=[key], args=[self.node_id, user, entry.epoch, self.settings.idle_ttl_ms]
                ),
            )
        except StoreUnavailable:
            return entry
        try:
            outcome = parse_write(reply, user)
        except RecordMismatch:
            self._forget(user)
            raise
        if outcome is WriteOutcome.LOST:
            self._forget(user)
            self._report_lost(user, entry.epoch, None)
            return await self._acquire(user, slot, reason=LOST_REASON)
        if outcome.fenced:
            self._forget(user)
            return await self._acquire(user, slot, reason="takeover")
        entry.refreshed_at = started
        return entry

    # -- writing ---------------------------------------------------------------------------

    async def _commit(self, user: str, slot: UserSlot, entry: _Entry, payload: bytes) -> None:
        change = PendingWrite(entry.epoch, payload)
        if self.settings.mode == "write-behind":
            if self._pending.put(user, change):
                self._install(user, slot, replace(entry, payload=payload))
                self._update_gauges()
                return
        superseded = self._pending.pop(user)
        started = time.monotonic()
        try:
            outcome = await self._write(user, change)
        except StoreUnavailable as exc:
            if self.settings.on_redis_down == "buffer":
                if self._pending.put(user, change):
                    self._install(user, slot, replace(entry, payload=payload))
                    self._update_gauges()
                    log.warning(
                        "redis unavailable; change of user %r buffered (%d buffered)",
                        user,
                        len(self._pending),
                    )
                    return
                self._unsettled(user, entry, superseded)
                raise BufferFull(
                    f"redis unavailable and write buffer full ({self.settings.buffer_max} users)",
                    op=exc.op,
                ) from exc
            self._unsettled(user, entry, superseded)
            raise
        except asyncio.CancelledError:
            # The write may have reached Redis before the cancellation: neither the old nor the
            # new payload is known to be Redis's, so the copy is re-read before it is trusted.
            self._unsettled(user, entry, superseded)
            raise
        except RecordMismatch:
            self._forget(user)
            raise
        finally:
            self._update_gauges()
        if outcome.fenced:
            self.metrics.conflicts.inc()
            self._forget(user)
            if outcome is WriteOutcome.LOST:
                self._report_lost(user, entry.epoch, None)
            raise ConflictError(user)
        self.metrics.writes.inc()
        self._install(user, slot, replace(entry, payload=payload, refreshed_at=started))

    def _unsettled(self, user: str, entry: _Entry, superseded: PendingWrite | None) -> None:
        """A write of ``user`` ended without a verdict (failure, timeout or cancellation): its
        outcome in Redis is unknown. The copy becomes unverified, so it is re-read (after any
        buffered change is flushed) before it is served again; an older acknowledged buffered
        change it would have replaced goes back to the buffer, never silently away."""
        entry.verified_gen = _UNVERIFIED
        if superseded is not None:
            self._pending.restore(user, superseded)

    async def _write(self, user: str, change: PendingWrite) -> WriteOutcome:
        key = record_key(self.settings.namespace, user)
        reply = await self._redis(
            Op.WRITE,
            key,
            lambda: self._replicated(
                self._write_script,
                [key],
                [self.node_id, user, change.epoch, self.settings.idle_ttl_ms, change.payload],
            ),
        )
        return parse_write(reply, user, self.node_id)

    async def _flush_user(self, user: str, slot: UserSlot) -> bool:
        """Write ``user``'s buffered change, if any (caller holds the user's lock). True if it
        committed. A change is never dropped silently: a failed, timed-out or cancelled flush
        puts it back; a fenced-off one is counted and logged with the reason."""
        change = self._pending.pop(user)
        if change is None:
            return False
        started = time.monotonic()
        self._flushing += 1
        try:
            outcome = await self._write(user, change)
            if outcome in (WriteOutcome.LOST, WriteOutcome.OWN_LATER):
                # No record at all: nobody took the user over, Redis forgot it (restart without
                # persistence, failover to a lagging replica, expiry). Or this process itself
                # re-acquired it since (that re-acquire's reply was cancelled). Either way the
                # change is the newest acknowledged state: acquire afresh and write it there.
                self._forget(user)
                fresh = await self._acquire(user, slot, reason="revalidate")
                change = PendingWrite(fresh.epoch, change.payload)
                started = time.monotonic()
                outcome = await self._write(user, change)
                if outcome is WriteOutcome.COMMITTED:
                    self._install(
                        user, slot, replace(fresh, payload=change.payload, refreshed_at=started)
                    )
                    log.warning(
                        "buffered change of user %r re-written at epoch %d (%s)",
                        user,
                        change.epoch,
                        outcome.value,
                    )
        except (StoreUnavailable, asyncio.CancelledError):
            self._pending.restore(user, change)
            raise
        except RecordMismatch:
            self._forget(user)
            self._drop(user, "record_mismatch", "the record holds another user id")
            raise
        finally:
            self._flushing -= 1
            self._update_gauges()
        entry = self._cache.peek(user)
        if outcome.fenced:
            self.metrics.fenced_flushes.inc()
            why = {
                WriteOutcome.TAKEN_OVER: "another instance took the user over",
                WriteOutcome.DELETED: "the user was deleted",
                WriteOutcome.LOST: "its record was gone from Redis and could not be re-created",
                WriteOutcome.OWN_LATER: "it could not be re-written after this instance's own re-acquire",
            }[outcome]
            self._drop(user, outcome.value, why)
            if entry is not None and entry.epoch == change.epoch:
                self._forget(user)
            return False
        self.metrics.writes.inc()
        if entry is not None and entry.epoch == change.epoch:
            entry.refreshed_at = started
        return True

    def _drop(self, user: str, reason: str, why: str) -> None:
        self.metrics.dropped_changes.labels(reason).inc()
        log.warning("buffered change of user %r dropped: %s", user, why)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            if not len(self._pending) or not self._breaker_may_pass():
                continue
            try:
                await self.flush()
            except Exception:
                log.exception("flushing buffered context changes failed")

    def _breaker_may_pass(self) -> bool:
        """Whether any node's breaker would let a call through now."""
        now = time.monotonic()
        for breaker in self._breakers.values():
            if breaker.state is BreakerState.OPEN:
                if now - breaker.opened_at >= breaker.reset_after:
                    return True
            elif not (breaker.state is BreakerState.HALF_OPEN and breaker.probe_in_flight):
                return True
        return False

    # -- cache bookkeeping -----------------------------------------------------------------

    def _install(self, user: str, slot: UserSlot, entry: _Entry) -> None:
        if slot.fence_epoch > entry.epoch:
            # Another instance took the user over while this call was in flight.
            self._forget(user)
            return
        size = len(entry.payload) + len(user.encode("utf-8", "surrogateescape")) + ENTRY_OVERHEAD
        self._cache.put(user, entry, size)
        self._update_gauges()

    def _forget(self, user: str) -> None:
        self._cache.pop(user)
        self._update_gauges()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.entries.set(len(self._cache))
        m.entry_bytes.set(self._cache.bytes)
        m.buffered_writes.set(self.pending_writes)
        m.breaker_state.set(int(self.breaker_state))
        m.listener_up.set(1 if self._listener_up else 0)

    # -- Redis calls -----------------------------------------------------------------------

    @property
    def _command(self) -> Any:
        assert self._clients is not None
        return self._clients.command

    async def _replicated(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run ``script``; with ``wait_replicas``, pipeline ``WAIT n ms`` behind it on the same
        connection (one round trip) and acknowledge only if enough replicas confirmed. A
        write confirmed by a replica survives its master's loss when Sentinel promotes that
        replica; a write on a master already demoted is never confirmed (its replica stopped
        following it), so two instances can never both have writes acknowledged."""
        n = self.settings.wait_replicas
        if not n:
            return await script(keys=keys, args=args)
        for _ in range(2):
            pipe = self._command.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.execute_command("WAIT", n, self.settings.wait_ms)
            reply, confirmed = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):
                # The script did not run (first call on this server, or after a restart).
                await self._command.script_load(script.script)
                continue
            if isinstance(reply, BaseException):
                raise reply
            if isinstance(confirmed, BaseException):
                raise confirmed
            if int(confirmed) < n:
                raise NotReplicated(
                    f"{confirmed} of {n} replicas confirmed within {self.settings.wait_ms}ms"
                )
            return reply
        raise NoScriptError("script not loaded after SCRIPT LOAD")

    async def _redis(self, op: Op, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call through the breaker, bounded by ``redis_timeout`` in total
        (pool wait and any retry included), retrying only idempotent operations."""
        pause = self._failover_pause_until
        if pause is not None:
            if time.monotonic() < pause:
                self.metrics.redis_errors.labels(op.value).inc()
                raise StoreUnavailable(
                    f"redis failover in progress; {op.value} not attempted", op=op.value
                )
            self._failover_pause_until = None
        breaker = self._breaker_for(key)
        if not breaker.allow(time.monotonic()):
            self.metrics.breaker_rejections.inc()
            self._update_gauges()
            raise StoreUnavailable(
                f"redis unavailable (circuit open); {op.value} not attempted", op=op.value
            )
        deadline = time.monotonic() + self.settings.redis_timeout
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        result = await call()
                except (RedisError, OSError, TimeoutError) as exc:
                    if not _is_outage(exc):
                        breaker.record_success()
                        self.metrics.redis_errors.labels(op.value).inc()
                        raise StoreUnavailable(
                            f"redis rejected {op.value}: {exc}", op=op.value
                        ) from exc
                    if should_retry_redis(op, attempt, deadline - time.monotonic()):
                        continue
                    breaker.record_failure(time.monotonic())
                    self.metrics.redis_errors.labels(op.value).inc()
                    reason = (
                        "timed out"
                        if isinstance(exc, TimeoutError)
                        else f"failed: {exc or type(exc).__name__}"
                    )
                    raise StoreUnavailable(f"redis {op.value} {reason}", op=op.value) from exc
                breaker.record_success()
                return result
        except asyncio.CancelledError:
            breaker.abandon()
            raise
        finally:
            self._update_gauges()

    # -- takeover listener -----------------------------------------------------------------

    def _on_takeover(self, data: Any) -> None:
        # Compared by epoch, never by owner name: a message names a newer epoch than a cached
        # copy exactly when someone (whatever its node id) acquired or deleted the user since.
        # This instance's own acquire publishes the epoch it installs, which is not newer.
        takeover = parse_takeover(data)
        if takeover is None:
            return
        slot = self._locks.peek(takeover.user)
        if slot is not None:
            slot.fence_epoch = max(slot.fence_epoch, takeover.epoch)
        entry = self._cache.peek(takeover.user)
        if entry is not None and entry.epoch < takeover.epoch:
            self._cache.pop(takeover.user)
            self.metrics.takeovers_received.inc()
            self._update_gauges()

    async def _on_master_switch(self, channel: str, announcement: str) -> None:
        """Sentinel failover events.

        Promotion imminent (``+failover-state-send-slaveof-noone``): the current master is about
        to stop being replicated, so anything acknowledged by it from now on could be lost.
        Every connection to it is closed and Redis calls are refused (``StoreUnavailable``) until
        the switch is announced, the failover aborts, or ``FAILOVER_PAUSE_MAX`` passes.

        New master (``+switch-master``): nothing the listener proved on the old master counts
        any more (a takeover on the new one is not published there), so every copy is
        unverified at once; every connection to the old master is closed, so the next call and
        the listener's next subscription resolve the new master."""
        assert self._clients is not None
        if channel == PROMOTING_CHANNEL:
            if self._failover_pause_until is None:
                log.warning(
                    "redis failover: promotion of a replica imminent (%s); writes paused",
                    announcement,
                )
            self._failover_pause_until = time.monotonic() + FAILOVER_PAUSE_MAX
            await self._clients.drop_master_connections()
            return
        if channel != SWITCH_MASTER_CHANNEL:
            if self._failover_pause_until is not None:
                log.warning("redis failover aborted (%s %s); writes resumed", channel, announcement)
            self._failover_pause_until = None
            return
        self._failover_pause_until = None
        new_master = announcement.split(" ")[3:5]
        if new_master == self._switched_to:
            return  # the same switch, announced by another sentinel
        self._switched_to = new_master
        self._proof_at = float("-inf")
        self._gen += 1
        self.metrics.master_switches.inc()
        log.warning(
            "redis master switched (%s): reconnecting, every cached copy is re-checked",
            announcement,
        )
        assert self._clients is not None
        await self._clients.drop_master_connections()

    def _set_listener(self, up: bool, proof_at: float | None = None) -> None:
        # A new subscription starts a new generation: entries confirmed under an older one may
        # have missed a takeover between the subscriptions and are revalidated on next use.
        # Losing the subscription changes nothing at once: entries stay servable until the last
        # proof is ``listener_liveness`` old, exactly as if the connection had died silently.
        self._listener_up = up
        assert self._listener_ready is not None
        if up:
            self._gen += 1
            self._proof_at = proof_at if proof_at is not None else time.monotonic()
            self._listener_ready.set()
        else:
            self._listener_ready.clear()
            if self._state == "running":
                self.metrics.listener_reconnects.inc()
        self._update_gauges()

    async def _listen(self) -> None:
        assert self._clients is not None
        deadline = max(self.settings.redis_timeout * 4, LISTENER_MIN_DEADLINE)
        failures = 0
        while True:
            pubsub = None
            try:
                pubsub = await self._clients.new_pubsub()
                sent = time.monotonic()
                async with asyncio.timeout(deadline):
                    await pubsub.subscribe(self._channel)
                    while True:
                        message = await pubsub.get_message(timeout=deadline)
                        if message is not None and message["type"] == "subscribe":
                            break
                self._set_listener(True, proof_at=sent)
                failures = 0
                await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _cancelling():
                    raise asyncio.CancelledError from exc
                log.warning("takeover listener disconnected: %s", exc or type(exc).__name__)
            finally:
                if self._listener_up:
                    self._set_listener(False)
                if pubsub is not None:
                    with suppress(Exception):
                        async with asyncio.timeout(CLOSE_DEADLINE):
                            await pubsub.aclose()  # type: ignore[no-untyped-call]
            failures += 1
            await asyncio.sleep(
                backoff_delay(failures, LISTENER_BACKOFF_BASE, LISTENER_BACKOFF_CAP)
            )

    async def _pump(self, pubsub: Any) -> None:
        """Deliver takeover messages and keep the liveness proof fresh: one PING in flight at a
        time, sent every ``listener_liveness / LISTENER_PINGS_PER_WINDOW``. Redis answers a
        PING after every message it queued before it, so its PONG proves that every takeover
        published before the PING was sent has been handled. No PONG within the window: the
        connection is declared dead (entries already stopped being served when it expired)."""
        liveness = self.settings.listener_liveness
        interval = liveness / LISTENER_PINGS_PER_WINDOW
        ping_sent: float | None = None
        next_ping = self._proof_at + interval
        while True:
            if _cancelling():
                raise asyncio.CancelledError
            now = time.monotonic()
            if ping_sent is None and now >= next_ping:
                await pubsub.ping()
                ping_sent = now
            if ping_sent is not None:
                if now - ping_sent > liveness:
                    raise ConnectionError(
                        f"takeover listener: no reply to PING within {liveness:g}s"
                    )
                wait = ping_sent + liveness - now
            else:
                wait = next_ping - now
            message = await pubsub.get_message(timeout=max(0.0, wait))
            if message is None:
                continue
            if message["type"] == "pong" and ping_sent is not None:
                self._proof_at = ping_sent
                next_ping = ping_sent + interval
                ping_sent = None
            elif message["type"] == "message":
                self._on_takeover(message["data"])
