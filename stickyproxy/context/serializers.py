"""Pluggable encodings of a user's context (a mapping) to the bytes stored in Redis."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .errors import SerializationError


@runtime_checkable
class Serializer(Protocol):
    """Encodes a context mapping to bytes and back.

    ``dumps`` must be deterministic for equal mappings: the store decides whether an edit
    changed anything by comparing encoded bytes.
    """

    def dumps(self, value: Mapping[str, Any]) -> bytes: ...

    def loads(self, payload: bytes) -> dict[str, Any]: ...


class JsonSerializer:
    """Compact UTF-8 JSON with sorted keys (deterministic, so equal contexts encode equally)."""

    def dumps(self, value: Mapping[str, Any]) -> bytes:
        try:
            return json.dumps(
                value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"context is not JSON-serialisable: {exc}") from exc

    def loads(self, payload: bytes) -> dict[str, Any]:
        try:
            value = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SerializationError(f"stored context is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise SerializationError(f"stored context is a {type(value).__name__}, not an object")
        return value
