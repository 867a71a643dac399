"""Which modules are compiled to C with mypyc, and whether this installation runs them.

The hot path (request parsing callbacks, exchange state machine, upstream pool, routing,
metrics) is ordinary typed Python; a regular install compiles it with mypyc, an editable
install does not unless asked (README, "Building"). The Python source is the single source
of truth: the compiled modules are built from it, and the whole test suite runs on both.

Everything here looks at files only, never imports the modules it reports on, so the
start-up check can run before (and without) the data plane importing cleanly.
"""

from __future__ import annotations

import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# Declared once: setup.py compiles these; the start-up check, tests and bench report them.
COMPILED_MODULES = (
    "stickyproxy.dataplane.client",
    "stickyproxy.dataplane.exchange",
    "stickyproxy.dataplane.upstream",
    "stickyproxy.dataplane.http",
    "stickyproxy.dataplane.tunnel",
    "stickyproxy.dataplane.proxy",
    "stickyproxy.dataplane.events",
    "stickyproxy.router",
    "stickyproxy.ring",
    "stickyproxy.keys",
    "stickyproxy.observe",
    "stickyproxy.metrics",
)

PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str, root: Path = PACKAGE_DIR) -> Path:
    return root.joinpath(*module.split(".")[1:]).with_suffix(".py")


def extension_path(module: str, root: Path = PACKAGE_DIR) -> Path | None:
    """The C extension Python would load for ``module`` (it prefers one over the .py
    file in the same directory), or None."""
    base = source_path(module, root).with_suffix("")
    for suffix in EXTENSION_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def build(root: Path = PACKAGE_DIR) -> str:
    """"compiled" when every hot-path module is a C extension, "interpreted" when none is,
    else "mixed" (a partial build: something went wrong)."""
    flags = [extension_path(m, root) is not None for m in COMPILED_MODULES]
    if all(flags):
        return "compiled"
    return "mixed" if any(flags) else "interpreted"


def stale(root: Path = PACKAGE_DIR) -> list[str]:
    """Compiled modules older than the source beside them: an in-place build that no
    longer matches the code (edits to the .py file would be silently ignored)."""
    out = []
    for module in COMPILED_MODULES:
        ext = extension_path(module, root)
        source = source_path(module, root)
        if ext is None or not source.is_file():
            continue
        if os.path.getmtime(source) > os.path.getmtime(ext):
            out.append(module)
    return out
