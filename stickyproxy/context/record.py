"""Decoding of Redis replies into records, with the user-id check. Pure, no I/O.

Every reply that carries a stored user id is checked against the user asked for; a mismatch
raises :class:`RecordMismatch` and the reply is never served.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import ContextError, RecordMismatch


class ProtocolError(ContextError):
    """A script reply did not have the documented shape."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return str(value)


def _check_user(user: str, stored: Any) -> None:
    stored_text = _text(stored)
    if stored_text is not None and stored_text != user:
        raise RecordMismatch(user, stored_text)


@dataclass(frozen=True)
class Acquired:
    user: str
    epoch: int
    payload: bytes | None
    previous_owner: str | None


def parse_acquire(reply: Any, user: str) -> Acquired:
    if not isinstance(reply, list) or not reply:
        raise ProtocolError(f"acquire reply: {reply!r}")
    if reply[0] == 0:
        _check_user(user, reply[1])
        raise ProtocolError(f"acquire refused without a user mismatch: {reply!r}")
    if reply[0] != 1 or len(reply) < 3:
        raise ProtocolError(f"acquire reply: {reply!r}")
    stored = _text(reply[1])
    if stored != user:
        raise RecordMismatch(user, str(stored))
    payload = reply[3] if len(reply) > 3 else None
    previous = _text(reply[4]) if len(reply) > 4 else None
    return Acquired(
        user=user, epoch=int(reply[2]), payload=payload or None, previous_owner=previous or None
    )


class WriteOutcome(Enum):
    """What a fenced write found. Every value but COMMITTED means nothing was written; the
    value says why, so a dropped change is logged and counted truthfully."""

    COMMITTED = "committed"
    TAKEN_OVER = "taken_over"  # another acquire (any node id) moved the epoch or owner on
    DELETED = "deleted"  # the user was deleted (tombstone: owner "")
    LOST = "record_lost"  # no record: it expired, or Redis lost it (restart, failover)
    # This node re-acquired the user since (a re-acquire whose reply was cancelled): the
    # change is still the newest acknowledged one, to be written at the current epoch.
    OWN_LATER = "own_later_acquire"

    @property
    def fenced(self) -> bool:
        return self is not WriteOutcome.COMMITTED


def classify_fence(epoch: Any, owner: Any, node_id: str | None = None) -> WriteOutcome:
    """Why a write was fenced off, from the record's epoch and owner as the script saw them.
    Node ids are unique per process, so a record owned by ``node_id`` at another epoch was
    re-acquired by this very process."""
    if epoch is None or epoch is False:
        return WriteOutcome.LOST
    current = _text(owner)
    if current in (None, ""):
        return WriteOutcome.DELETED
    if node_id is not None and current == node_id:
        return WriteOutcome.OWN_LATER
    return WriteOutcome.TAKEN_OVER


def parse_write(reply: Any, user: str, node_id: str | None = None) -> WriteOutcome:
    if not isinstance(reply, list) or not reply:
        raise ProtocolError(f"write reply: {reply!r}")
    if reply[0] == -1:
        _check_user(user, reply[1])
        raise ProtocolError(f"write refused without a user mismatch: {reply!r}")
    if reply[0] == 0:
        # Lua false arrives as nil; a reply from the older script has no fields at all.
        epoch = reply[1] if len(reply) > 1 else b"?"
        owner = reply[2] if len(reply) > 2 else b"?"
        return classify_fence(epoch, owner, node_id)
    if reply[0] == 1:
        return WriteOutcome.COMMITTED
    raise ProtocolError(f"write reply: {reply!r}")


def parse_delete(reply: Any, user: str) -> int:
    """The tombstone's epoch."""
    if not isinstance(reply, list) or not reply:
        raise ProtocolError(f"delete reply: {reply!r}")
    if reply[0] == 0:
        _check_user(user, reply[1])
        raise ProtocolError(f"delete refused without a user mismatch: {reply!r}")
    if reply[0] != 1 or len(reply) < 2:
        raise ProtocolError(f"delete reply: {reply!r}")
    return int(reply[1])


@dataclass(frozen=True)
class Snapshot:
    """A plain read of a record: HMGET uid epoch owner data."""

    epoch: int | None
    owner: str | None
    payload: bytes | None

    def owned_by(self, node_id: str, epoch: int) -> bool:
        return self.epoch == epoch and self.owner == node_id


def parse_snapshot(reply: Any, user: str) -> Snapshot:
    if not isinstance(reply, list) or len(reply) != 4:
        raise ProtocolError(f"read reply: {reply!r}")
    uid, epoch, owner, data = reply
    _check_user(user, uid)
    return Snapshot(
        epoch=None if epoch is None else int(epoch),
        owner=_text(owner),
        payload=data or None,
    )


@dataclass(frozen=True)
class Takeover:
    user: str
    epoch: int
    owner: str


def parse_takeover(message: Any) -> Takeover | None:
    """Decode ``<epoch>\\n<owner>\\n<user>``; None if malformed (it is ignored, never trusted)."""
    if isinstance(message, str):
        message = message.encode("utf-8", errors="surrogateescape")
    if not isinstance(message, bytes):
        return None
    parts = message.split(b"\n", 2)
    if len(parts) != 3:
        return None
    try:
        epoch = int(parts[0])
    except ValueError:
        return None
    return Takeover(
        user=parts[2].decode("utf-8", errors="surrogateescape"),
        epoch=epoch,
        owner=parts[1].decode("utf-8", errors="surrogateescape"),
    )
