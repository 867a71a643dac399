"""The file source: a JSON or TOML list of backends written by anything (a sidecar, a
deploy tool, a Kubernetes ConfigMap), looked at every ``interval``.

Invariants:
- The file is found through ``os.stat`` on its path, which follows symlinks: an atomic
  rename (new inode) and a ConfigMap update (``..data`` re-pointed to a new ``..<timestamp>``
  directory) change the (device, inode, size, mtime) signature and are read; a touch that
  leaves the content unchanged is recognised by its SHA-256 and not parsed again.
- A file that is missing, unreadable, too large, not valid JSON/TOML or whose entries fail
  validation (a half-written file, a typo) is a failure: logged with the file's name and
  every problem, the current set kept, the file looked at again next interval.
- Entries are validated exactly as ``[[backends]]`` are (``config._backends``).
- Reads happen in a worker thread (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import tomllib
from collections.abc import Callable
from typing import Any

from ..config import Backend, ConfigError, _backends
from .settings import DiscoverySettings, FileSettings
from .source import Poll, Source

# Largest backends file read: a list of thousands of backends fits in far less.
MAX_FILE_BYTES = 4 << 20


def parse_backends(data: bytes, path: str) -> tuple[Backend, ...]:
    """A backends file's members; ConfigError naming the file and each problem.

    JSON: ``[{"id": ..., "url": ..., "weight": ...}, ...]`` or ``{"backends": [...]}``.
    TOML: ``[[backends]]`` tables. ``.json``/``.toml`` decide; any other name is JSON when
    its first character is ``[`` or ``{``. An empty list is an empty set (never applied)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8: {e.reason} at byte {e.start}"], path) from None
    ext = os.path.splitext(path)[1].lower()
    is_json = ext == ".json" or (ext != ".toml" and text.lstrip()[:1] in ("[", "{"))
    raw: Any
    if is_json:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError([f"JSON syntax error: {e}"], path) from None
        if isinstance(raw, dict):
            unknown = sorted(k for k in raw if k != "backends")
            if unknown:
                raise ConfigError([f"{k}: unknown key (known: backends)" for k in unknown], path)
            raw = raw.get("backends")
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"TOML syntax error: {e}"], path) from None
        unknown = sorted(k for k in doc if k != "backends")
        if unknown:
            raise ConfigError([f"{k}: unknown key (known: backends)" for k in unknown], path)
        raw = doc.get("backends")
    if raw is None:
        raise ConfigError(["backends: missing (a list of {id, url, weight})"], path)
    if isinstance(raw, list) and not raw:
        return ()
    errors: list[str] = []
    out = _backends(raw, errors)
    if errors:
        raise ConfigError(errors, path)
    return out


Signature = tuple[int, int, int, int]


def read_if_changed(
    path: str,
    last: Signature | None,
) -> tuple[Signature, bytes | None]:
    """The file's signature, and its bytes when the signature differs from ``last``.
    OSError when it cannot be had; ValueError when it is too large."""
    st = os.stat(path)  # follows symlinks (ConfigMap ..data swaps)
    sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if sig == last:
        return sig, None
    if st.st_size > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes ({st.st_size})")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    return sig, data


class FileSource(Source):
    kind = "file"

    def __init__(
        self,
        settings: DiscoverySettings,
        current: tuple[Backend, ...] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings, current, clock=clock)
        assert settings.file is not None
        self.file: FileSettings = settings.file
        self._sig: Signature | None = None
        self._digest = b""
        self._parsed: tuple[Backend, ...] | None = None
        self._error = ""

    @property
    def min_delay(self) -> float:
        return self.file.interval

    def describe(self) -> str:
        return f"file {self.file.path}"

    async def poll(self) -> Poll:
        path = self.file.path
        every = self.file.interval
        try:
            sig, data = await asyncio.to_thread(read_if_changed, path, self._sig)
        except OSError as e:
            self._sig = None
            return Poll(None, every, error=f"{path}: cannot read: {e.strerror or e}")
        except ValueError as e:
            self._sig = None
            return Poll(None, every, error=f"{path}: {e}")
        if data is not None:
            digest = hashlib.sha256(data).digest()
            if digest != self._digest or self._parsed is None:
                try:
                    parsed = parse_backends(data, path)
                except ConfigError as e:
                    # Not remembered: a half-written file is read again once it changes.
                    self._sig, self._digest, self._parsed = sig, b"", None
                    self._error = f"refused: {e}"
                    return Poll(None, every, error=self._error)
                self._digest, self._parsed = digest, parsed
            self._sig = sig
        if self._parsed is None:
            return Poll(None, every, error=self._error)
        return Poll(self._parsed, every)
