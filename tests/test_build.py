"""The compiled build is hermetic (docs/design.md §7a, "hermetic compiled build").

mypyc compiles what mypy infers, so every package mypy sees while type-checking the hot path
decides the compiled code. These tests hold the three facts that make a build the same
whatever else is installed, and make a build that cannot see a type fail instead of
compiling it as Any (which is how prometheus_client missing at build time once produced a
build that crashed with SystemError on the first /metrics scrape):

- a compiled build asks for mypy and every runtime dependency (build_backend.py), so pip's
  isolated build environment holds each package the hot path imports;
- every third-party package the type check reaches is one of those runtime dependencies;
- mypy may ignore a missing package only when it is untyped (then it is Any whether it is
  installed or not); a typed package must be found, or mypy fails the build.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import runpy
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from stickyproxy import compiled

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
BACKEND = ROOT / "build_backend.py"


def _pyproject() -> dict:
    if not PYPROJECT.is_file():
        pytest.skip("needs the checkout's pyproject.toml")
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group()
    return re.sub(r"[-_.]+", "-", name).lower()


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names a module's source imports (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("import aiohttp.web", "stickyproxy.control.health", False, {"aiohttp.web"}),
        (
            "from .ring import Ring",
            "stickyproxy.routing.router",
            False,
            {"stickyproxy.routing.ring", "stickyproxy.routing.ring.Ring"},
        ),
        (
            "from ..config import load",
            "stickyproxy.dataplane.proxy",
            False,
            {"stickyproxy.config", "stickyproxy.config.load"},
        ),
        (
            "from . import http",
            "stickyproxy.dataplane",
            True,
            {"stickyproxy.dataplane", "stickyproxy.dataplane.http"},
        ),
    ],
)
def test_imports_of(source, module, is_package, expected):
    assert imports_of(source, module, is_package) == expected


def _module_file(module: str) -> tuple[Path, bool] | None:
    base = compiled.PACKAGE_DIR.joinpath(*module.split(".")[1:])
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    return None


def third_party_imports_of_the_type_check() -> set[str]:
    """Top-level packages outside the standard library that mypy reaches from the compiled
    modules (following the package's own imports, as mypy does)."""
    seen: set[str] = set()
    todo = list(compiled.COMPILED_MODULES)
    third: set[str] = set()
    while todo:
        module = todo.pop()
        found = _module_file(module)
        if module in seen or found is None:
            continue
        seen.add(module)
        path, is_package = found
        for name in imports_of(path.read_text(encoding="utf-8"), module, is_package):
            top = name.partition(".")[0]
            if top == "stickyproxy":
                todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third.add(top)
    return third


def _typed(top: str) -> bool:
    spec = importlib.util.find_spec(top)
    assert spec is not None and spec.origin, f"{top} is not installed"
    where = Path(spec.origin).parent
    return (where / "py.typed").is_file() or importlib.util.find_spec(f"{top}-stubs") is not None


def _ignored_by_mypy(project: dict) -> set[str]:
    out = set()
    for override in project.get("tool", {}).get("mypy", {}).get("overrides", []):
        if override.get("ignore_missing_imports"):
            modules = override["module"]
            out |= {
                m.partition(".")[0] for m in ([modules] if isinstance(modules, str) else modules)
            }
    return out


def test_the_type_check_reaches_the_packages_it_is_known_to():
    assert {
        "httptools",
        "prometheus_client",
        "uhashring",
        "jwt",
    } <= third_party_imports_of_the_type_check()


def test_mypy_may_ignore_only_untyped_packages():
    """An ignored typed package compiles as Any when it is missing at build time (and as
    its real types when present): the build would depend on what is installed."""
    ignored = _ignored_by_mypy(_pyproject())
    assert ignored, "the untyped uhashring needs its override"
    for top in ignored:
        assert not _typed(top), f"{top} is typed: drop it from ignore_missing_imports"


def test_every_untyped_package_the_type_check_reaches_is_ignored_explicitly():
    ignored = _ignored_by_mypy(_pyproject())
    for top in third_party_imports_of_the_type_check():
        assert _typed(top) or top in ignored, top


def test_every_package_the_type_check_reaches_is_a_runtime_dependency():
    """So the isolated build environment, which holds the runtime dependencies, holds it."""
    runtime = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    dists = metadata.packages_distributions()
    for top in third_party_imports_of_the_type_check():
        owners = {_name(d) for d in dists.get(top, [])}
        assert owners & runtime, f"{top} (from {owners or 'nowhere'}) is not a runtime dependency"


def test_a_compiled_build_asks_for_mypy_and_every_runtime_dependency(monkeypatch):
    if not BACKEND.is_file():
        pytest.skip("needs the checkout's build_backend.py")
    runtime = _pyproject()["project"]["dependencies"]
    monkeypatch.setenv("STICKYPROXY_COMPILE", "1")
    backend = runpy.run_path(str(BACKEND))
    for hook in ("get_requires_for_build_wheel", "get_requires_for_build_editable"):
        wanted = backend[hook]()
        assert set(runtime) <= set(wanted), hook
        assert any(_name(r) == "mypy" for r in wanted), hook
    monkeypatch.setenv("STICKYPROXY_COMPILE", "0")
    assert backend["get_requires_for_build_wheel"]() == []
    assert backend["get_requires_for_build_editable"]() == []
