"""Proxy configuration files for tests: ``BASE_CONFIG`` (loopback, admin and health off,
short timeouts) with per-section overrides and a list of backends, written as TOML; the
ring a config describes; and ``stickyproxy route --json`` run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from stickyproxy.config import Config
from stickyproxy.routing.ring import Member, Ring
from support.net import LOCALHOST

BASE_CONFIG: dict[str, dict[str, Any]] = {
    "listen": {"host": LOCALHOST, "port": 0},
    "admin": {"enabled": False},
    "health": {"enabled": False},
    "passive": {"connect_down": "2s"},
    "timeouts": {"connect": "1s", "response": "5s", "client_header": "5s", "shutdown": "3s"},
    "logging": {"level": "error"},
}


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def build_toml(
    backends: list[Any],
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    base: dict[str, dict[str, Any]] | None = None,
) -> str:
    """A config: BASE_CONFIG (or ``base``) with ``overrides`` merged per section."""
    sections = {k: dict(v) for k, v in (BASE_CONFIG if base is None else base).items()}
    for name, values in (overrides or {}).items():
        sections.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for b in backends:
        lines += ["[[backends]]", f"id = {toml_value(b.id)}", f"url = {toml_value(b.url)}"]
        if getattr(b, "weight", None):
            lines.append(f"weight = {b.weight}")
        if getattr(b, "protocol", "http/1.1") != "http/1.1":
            lines.append(f"protocol = {toml_value(b.protocol)}")
        lines.append("")
    return "\n".join(lines)


def ring_of(config: Config) -> Ring:
    return Ring([Member(b.id, b.weight) for b in config.backends], config.routing.vnodes)


def route_json(config_path: str | os.PathLike, *keys: str) -> dict[str, list[str]]:
    """``stickyproxy route -c FILE --json KEY...`` in a subprocess: {key: preference list}."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stickyproxy.cli",
            "route",
            "-c",
            str(config_path),
            "--json",
            "--",
            *keys,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = {}
    for line in out.stdout.splitlines():
        doc = json.loads(line)
        assert doc["backend"] == (doc["preference"][0] if doc["preference"] else None)
        result[doc["key"]] = doc["preference"]
    assert set(result) == set(keys)
    return result


def merged(*layers: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Per-section merge of override dicts (later layers win key by key)."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in (layer or {}).items():
            out.setdefault(section, {}).update(values)
    return out


# How many candidate keys ``keys_where`` tries before giving up (a 1-in-1000 predicate on a
# ring of a few backends is met well within this).
KEY_SEARCH_LIMIT = 200_000


def keys_where(
    pref: Callable[[str], list[str]],
    pred: Callable[[list[str]], bool],
    n: int = 1,
    prefix: str = "user",
) -> list[str]:
    """The first ``n`` keys ``prefix-0, prefix-1, ...`` whose preference list satisfies ``pred``."""
    out = []
    for i in range(KEY_SEARCH_LIMIT):
        k = f"{prefix}-{i}"
        if pred(pref(k)):
            out.append(k)
            if len(out) == n:
                return out
    raise AssertionError("no such key")
