"""Start-up checks: refuse to run on a pure-Python parser, below a dependency floor, or on a
compiled module built from other source. ``stickyproxy run`` and ``stickyproxy demo`` both
apply them before serving."""

from __future__ import annotations

import os
from importlib import metadata

# Floors that matter for correctness or safety (pyproject.toml states the same).
FLOORS = {
    "aiohttp": (3, 14, 1),  # parser fixes the control plane relies on
    "uhashring": (2, 5),  # 2.4 leaves ghost points after a weight change
    "httptools": (0, 6, 4),  # llhttp 9 strict parsing
}

# Set to 1 to allow aiohttp's pure-Python HTTP parser (slow; for debugging only).
ALLOW_PY_PARSER_ENV = "STICKYPROXY_ALLOW_PY_PARSER"


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def check_runtime() -> list[str]:
    """Problems that must stop the proxy from starting (empty when all is well)."""
    problems = []
    for dist, floor in FLOORS.items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            problems.append(f"{dist} is not installed")
            continue
        if _version_tuple(have) < floor:
            problems.append(f"{dist} {have} is below the required {'.'.join(map(str, floor))}")
    try:
        import httptools.parser.parser  # noqa: F401  (the C extension over llhttp)
    except ImportError:
        problems.append("httptools' C parser is not importable")
    if os.environ.get(ALLOW_PY_PARSER_ENV) != "1":
        try:
            import aiohttp._http_parser  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            problems.append(
                "aiohttp's C HTTP parser is missing (pure-Python fallback); set "
                f"{ALLOW_PY_PARSER_ENV}=1 to run anyway"
            )
        if os.environ.get("AIOHTTP_NO_EXTENSIONS"):
            problems.append(
                "AIOHTTP_NO_EXTENSIONS is set: aiohttp would use its pure-Python "
                f"parser; unset it or set {ALLOW_PY_PARSER_ENV}=1"
            )
    from ..compiled import build, stale_problem

    if build() == "mixed":
        problems.append(
            "the data plane is partly compiled (a broken build): reinstall "
            "stickyproxy, or set STICKYPROXY_COMPILE=0 for a pure-Python one"
        )
    stale = stale_problem()
    if stale is not None:
        problems.append(stale)
    return problems
