"""Store settings: defaults declared once, durations parsed, everything validated at construction."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Literal

from .. import units
from .errors import ConfigError

Mode = Literal["write-through", "write-behind"]
OnRedisDown = Literal["fail", "buffer"]

DEFAULT_NAMESPACE = "stickyctx"
# A user untouched for a day is forgotten by Redis and by the instance.
DEFAULT_IDLE_TTL = 86_400.0
# Bounds of the local cache; whichever is reached first evicts the least recently used user.
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MODE: Mode = "write-through"
# Write-behind loses at most this much on a crash; also how often buffered writes are retried.
DEFAULT_FLUSH_INTERVAL = 1.0
DEFAULT_ON_REDIS_DOWN: OnRedisDown = "fail"
# Users whose latest change may wait for Redis at once (one payload each).
DEFAULT_BUFFER_MAX = 10_000
# Longest any call waits on Redis, pool wait included: a request path cannot afford seconds.
DEFAULT_REDIS_TIMEOUT = 0.25
DEFAULT_BREAKER_FAILURES = 5
# How long the breaker stays open before one probe call is let through.
DEFAULT_BREAKER_RESET = 1.0
# Connections per Redis node; callers beyond it wait (up to the timeout) for a free one.
DEFAULT_POOL_SIZE = 32
# The stale window: a copy is served from memory only while the takeover listener proved, no
# longer ago than this, that every takeover published before then had reached this instance.
DEFAULT_LISTENER_LIVENESS = 1.0
# Below this a loaded event loop alone would make every copy unverified.
MIN_LISTENER_LIVENESS = 0.05
# Share of redis_timeout a WAIT may block, so its reply arrives before the call's deadline.
WAIT_SHARE = 0.8
# Re-acquire-and-rerun rounds of ``ContextStore.update`` before the conflict is raised.
DEFAULT_UPDATE_ATTEMPTS = 3


def parse_duration(value: float | int | str, *, name: str) -> float:
    """Seconds from a number of seconds (Python's convention) or a string such as
    ``"500ms"``, ``"2s"``, ``"1d"``, parsed as the proxy's configuration parses them
    (units.parse_duration: a string without a unit is refused, "30" could be s or ms)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: not a duration: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = units.parse_duration(value)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
    else:
        raise ConfigError(f"{name}: not a duration: {value!r}")
    if not seconds > 0:
        raise ConfigError(f"{name}: must be positive, got {value!r}")
    return seconds


def default_node_id() -> str:
    """Unique per process: host name, pid and a random suffix (a restarted process is a new node)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class StoreSettings:
    redis_url: str
    node_id: str
    namespace: str = DEFAULT_NAMESPACE
    idle_ttl: float = DEFAULT_IDLE_TTL
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_bytes: int = DEFAULT_MAX_BYTES
    mode: Mode = DEFAULT_MODE
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    on_redis_down: OnRedisDown = DEFAULT_ON_REDIS_DOWN
    buffer_max: int = DEFAULT_BUFFER_MAX
    redis_timeout: float = DEFAULT_REDIS_TIMEOUT
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_reset: float = DEFAULT_BREAKER_RESET
    pool_size: int = DEFAULT_POOL_SIZE
    cluster: bool = False
    listener_liveness: float = DEFAULT_LISTENER_LIVENESS
    # Replicas that must confirm each acquire, write and delete before it is acknowledged.
    wait_replicas: int = 0

    def __post_init__(self) -> None:
        if not self.node_id or any(c in self.node_id for c in "\r\n"):
            raise ConfigError("node_id: must be non-empty and hold no line breaks")
        if not self.namespace or any(c in self.namespace for c in "{}\r\n"):
            raise ConfigError("namespace: must be non-empty and hold no braces or line breaks")
        if self.mode not in ("write-through", "write-behind"):
            raise ConfigError(f"mode: must be 'write-through' or 'write-behind', got {self.mode!r}")
        if self.on_redis_down not in ("fail", "buffer"):
            raise ConfigError(
                f"on_redis_down: must be 'fail' or 'buffer', got {self.on_redis_down!r}"
            )
        for name in ("max_entries", "max_bytes", "buffer_max", "breaker_failures", "pool_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("idle_ttl", "flush_interval", "redis_timeout", "breaker_reset"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive")
        if (
            not isinstance(self.wait_replicas, int)
            or isinstance(self.wait_replicas, bool)
            or self.wait_replicas < 0
        ):
            raise ConfigError(
                f"wait_replicas: must be a non-negative integer, got {self.wait_replicas!r}"
            )
        if self.listener_liveness < MIN_LISTENER_LIVENESS:
            raise ConfigError(
                f"listener_liveness: must be at least {MIN_LISTENER_LIVENESS * 1000:.0f}ms"
            )
        if self.idle_ttl < 1.0:
            raise ConfigError(
                "idle_ttl: must be at least 1s (Redis expiry has millisecond, not finer, precision)"
            )

    @property
    def wait_ms(self) -> int:
        """WAIT's timeout: never 0, which would make it block forever."""
        return max(1, int(self.redis_timeout * WAIT_SHARE * 1000))

    @property
    def idle_ttl_ms(self) -> int:
        return int(self.idle_ttl * 1000)

    @property
    def buffers_writes(self) -> bool:
        return self.mode == "write-behind" or self.on_redis_down == "buffer"
