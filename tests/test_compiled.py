"""The build under test is whole and current (stickyproxy/compiled.py).

STICKYPROXY_EXPECT_BUILD (set by .ci/run) names the build a test run must be on, so a
compile that silently fell back to pure Python cannot pass as a test of the compiled one.
"""

from __future__ import annotations

import json
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

from stickyproxy import compiled

SO = EXTENSION_SUFFIXES[0]


def test_the_installed_build_is_whole_and_current():
    assert compiled.build() in ("compiled", "interpreted")
    assert compiled.stale() == []


def test_the_build_is_the_one_expected():
    expected = os.environ.get("STICKYPROXY_EXPECT_BUILD")
    if not expected:
        pytest.skip("STICKYPROXY_EXPECT_BUILD not set")
    assert compiled.build() == expected


def test_every_compiled_module_has_its_source():
    for module in compiled.COMPILED_MODULES:
        assert compiled.source_path(module).is_file(), module


def _tree(
    root: Path, compiled_modules: tuple[str, ...], *, edited: str = "", stamp: str = "written"
) -> None:
    """A package tree: every source, extensions for ``compiled_modules``, the build's stamp
    (``written``, ``absent`` or ``garbled``), then ``edited``'s source changed after the
    build. File times are set against the stamp: old sources, new extensions."""
    for module in compiled.COMPILED_MODULES:
        src = compiled.source_path(module, root)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(f"# {module}\n")
        os.utime(src, (3000, 3000))
        if module in compiled_modules:
            ext = src.with_suffix("").with_name(src.stem + SO)
            ext.write_bytes(b"")
            os.utime(ext, (1000, 1000))
    if stamp == "written":
        (root / compiled.STAMP).write_text(compiled.stamp_text(root))
    elif stamp == "garbled":
        (root / compiled.STAMP).write_text("{not json")
    if edited:
        src = compiled.source_path(edited, root)
        src.write_text(src.read_text() + "x = 1\n")
        os.utime(src, (1000, 1000))  # older than its extension: times cannot tell


M = compiled.COMPILED_MODULES


@pytest.mark.parametrize(
    ("compiled_modules", "edited", "stamp", "build", "stale"),
    [
        ((), "", "absent", "interpreted", []),
        (M[:1], "", "written", "mixed", []),
        # an installed wheel: .py files written after the .so files, and still current
        (M, "", "written", "compiled", []),
        # an edited source beside its compiled module: the edit would be ignored
        (M, M[2], "written", "compiled", [M[2]]),
        # an edited source without a compiled module is just the interpreted build
        ((), M[2], "absent", "interpreted", []),
        # compiled modules that no stamp vouches for cannot be shown current
        (M, "", "absent", "compiled", list(M)),
        (M, "", "garbled", "compiled", list(M)),
    ],
)
def test_build_and_staleness_from_files(tmp_path, compiled_modules, edited, stamp, build, stale):
    _tree(tmp_path, compiled_modules, edited=edited, stamp=stamp)
    assert compiled.build(tmp_path) == build
    assert compiled.stale(tmp_path) == stale


def test_the_stamp_holds_a_digest_of_every_compiled_source(tmp_path):
    _tree(tmp_path, M)
    modules = json.loads((tmp_path / compiled.STAMP).read_text())["modules"]
    assert set(modules) == set(M)
    assert all(len(d) == 64 for d in modules.values())


@pytest.mark.parametrize(
    ("in_checkout", "hint"),
    [
        (True, "STICKYPROXY_COMPILE=1 pip install -e"),
        (False, "pip install --force-reinstall"),
    ],
)
def test_one_stale_problem_with_a_hint_for_how_it_was_installed(tmp_path, in_checkout, hint):
    root = tmp_path / "stickyproxy"
    _tree(root, M, edited=M[0])
    if in_checkout:
        (tmp_path / "pyproject.toml").write_text("")
        (tmp_path / "setup.py").write_text("")
    problem = compiled.stale_problem(root)
    assert problem is not None and hint in problem
    assert problem.startswith(f"{M[0]}: compiled from a different source")
    (root / compiled.STAMP).unlink()
    assert "carry no build stamp" in compiled.stale_problem(root)


def test_no_problem_for_a_current_build(tmp_path):
    _tree(tmp_path, M)
    assert compiled.stale_problem(tmp_path) is None
