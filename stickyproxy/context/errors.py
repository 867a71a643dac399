"""Errors raised by the context library. Every one derives from :class:`ContextError`."""

from __future__ import annotations


class ContextError(Exception):
    """Base class of every error the context library raises."""


class ConfigError(ContextError, ValueError):
    """A store setting or Redis URL is invalid."""


class StoreClosed(ContextError):
    """The store is not started, or has been closed."""


class StoreUnavailable(ContextError):
    """Redis could not be reached in time, or the circuit breaker is open.

    ``op`` names the Redis operation that failed (``acquire``, ``write``, ...).
    """

    def __init__(self, message: str, *, op: str) -> None:
        super().__init__(message)
        self.op = op


class BufferFull(StoreUnavailable):
    """Redis is unreachable and the bounded write buffer has no room for another user."""


class ConflictError(ContextError):
    """Another instance took the user over: the write was rejected by the epoch/owner fence.

    The local copy has been dropped; the next use re-acquires the user from Redis.
    """

    def __init__(self, user: str) -> None:
        super().__init__(f"context of user {user!r} was taken over by another instance")
        self.user = user


class RecordMismatch(ContextError):
    """Redis returned a record whose stored user id is not the one asked for; it is never served."""

    def __init__(self, user: str, stored: str) -> None:
        super().__init__(f"record for user {user!r} holds user id {stored!r}")
        self.user = user
        self.stored = stored


class SerializationError(ContextError, ValueError):
    """A context could not be encoded, or a stored payload could not be decoded to a mapping."""


class MissingUserKey(ContextError):
    """A handler needed a user context but the request carried no user key."""

    def __init__(self, header: str) -> None:
        super().__init__(f"missing {header} header")
        self.header = header
