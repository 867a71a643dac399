"""Which modules are compiled to C with mypyc, and whether this installation runs them.

The hot path (request parsing callbacks, exchange state machine, upstream pool, routing,
metrics) is ordinary typed Python; a regular install compiles it with mypyc, an editable
install does not unless asked (README, "Building"). The Python source is the single source
of truth: the compiled modules are built from it, and the whole test suite runs on both.

Everything here looks at files only, never imports the modules it reports on, so the
start-up check can run before (and without) the data plane importing cleanly. It imports only
the standard library: setup.py runs it alone, before the package is importable.

Staleness is decided by content, not by time: the build writes a stamp (``STAMP``, beside
the compiled modules, in the wheel or in the source tree for an in-place build) holding the
SHA-256 of each compiled module's source. A compiled module whose ``.py`` no longer hashes
to its stamp was built from other code, and Python would run the compiled one. File times
cannot tell: pip writes an installed wheel's ``.py`` files after its ``.so`` files, and image
layers round times to whole seconds.
"""

from __future__ import annotations

import hashlib
import json
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

# Declared once: setup.py compiles these; the start-up check, tests and bench report them.
COMPILED_MODULES = (
    "stickyproxy.dataplane.client",
    "stickyproxy.dataplane.exchange",
    "stickyproxy.dataplane.upstream",
    "stickyproxy.dataplane.http",
    "stickyproxy.dataplane.request",
    "stickyproxy.dataplane.tunnel",
    "stickyproxy.dataplane.proxy",
    "stickyproxy.dataplane.events",
    "stickyproxy.routing.router",
    "stickyproxy.routing.ring",
    "stickyproxy.routing.keys",
    "stickyproxy.control.observe",
    "stickyproxy.control.metrics",
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
    """ "compiled" when every hot-path module is a C extension, "interpreted" when none is,
    else "mixed" (a partial build: something went wrong)."""
    flags = [extension_path(m, root) is not None for m in COMPILED_MODULES]
    if all(flags):
        return "compiled"
    return "mixed" if any(flags) else "interpreted"


# Written by the build beside the compiled modules: {"modules": {module: sha256 of its .py}}.
STAMP = "_build_stamp.json"


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamp_text(root: Path = PACKAGE_DIR) -> str:
    """The stamp for the sources under ``root`` as they are now (setup.py writes it)."""
    digests = {m: source_digest(source_path(m, root)) for m in COMPILED_MODULES}
    return json.dumps({"modules": digests}, indent=1, sort_keys=True) + "\n"


def read_stamp(root: Path = PACKAGE_DIR) -> dict[str, str] | None:
    try:
        data = json.loads((root / STAMP).read_text(encoding="utf-8"))
        modules = data["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return modules if isinstance(modules, dict) else None


def stale(root: Path = PACKAGE_DIR) -> list[str]:
    """Compiled modules whose source beside them is not the source they were built from
    (edits to the .py file would be silently ignored). Without a readable stamp no compiled
    module can be shown current, so every one of them is reported."""
    compiled = [
        m
        for m in COMPILED_MODULES
        if extension_path(m, root) is not None and source_path(m, root).is_file()
    ]
    if not compiled:
        return []
    stamp = read_stamp(root)
    if stamp is None:
        return compiled
    return [m for m in compiled if stamp.get(m) != source_digest(source_path(m, root))]


def in_source_tree(root: Path = PACKAGE_DIR) -> bool:
    """True for a checkout (editable or in-place build), False for an installed package."""
    return (root.parent / "pyproject.toml").is_file() and (root.parent / "setup.py").is_file()


def stale_problem(root: Path = PACKAGE_DIR) -> str | None:
    """One message for every stale compiled module, with the fix that fits how this copy
    of the package was installed; None when the build is current."""
    modules = stale(root)
    if not modules:
        return None
    if read_stamp(root) is None:
        what = (
            f"the compiled modules in {root} carry no build stamp ({STAMP}), so they "
            "cannot be shown to match their source"
        )
    else:
        what = (
            f"{', '.join(modules)}: compiled from a different source than the .py beside "
            f"{'it' if len(modules) == 1 else 'them'} (the compiled code would run, not the source)"
        )
    if in_source_tree(root):
        fix = (
            f"rebuild in place (STICKYPROXY_COMPILE=1 pip install -e {root.parent}) or delete "
            f"the compiled modules (the *.so files under {root}) to run the source"
        )
    else:
        fix = (
            "this installed copy was changed after it was built: reinstall it "
            "(pip install --force-reinstall the wheel or source it came from)"
        )
    return f"{what}; {fix}"
