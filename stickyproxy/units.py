"""Parsing of human-written durations ("2s", "500ms") and sizes ("64KiB"): pure."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
}


def parse_duration(text: str) -> float:
    """Seconds in a duration string such as "2s", "500ms", "1.5m", "1h", "1d".

    A bare number is refused: "30" could mean seconds or milliseconds.
    """
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f'not a duration (use e.g. "2s", "500ms", "1m", "1d"): {text!r}')
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: int | str) -> int:
    """Bytes in an integer or a size string such as "64KiB", "1MiB", "10MB"."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    m = _SIZE.match(value)
    if not m:
        raise ValueError(f'not a size (use e.g. 65536, "64KiB", "1MiB"): {value!r}')
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"
