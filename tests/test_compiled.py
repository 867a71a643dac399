"""The build under test is whole and current (stickyproxy/compiled.py).

STICKYPROXY_EXPECT_BUILD (set by .ci/run) names the build a test run must be on, so a
compile that silently fell back to pure Python cannot pass as a test of the compiled one.
"""

from __future__ import annotations

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


def _tree(root: Path, compiled_modules: tuple[str, ...], *, newer_source: str = "") -> None:
    for module in compiled.COMPILED_MODULES:
        src = compiled.source_path(module, root)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text("")
        os.utime(src, (1000, 1000))
        if module in compiled_modules:
            ext = src.with_suffix("").with_name(src.stem + SO)
            ext.write_bytes(b"")
            os.utime(ext, (2000, 2000))
        if module == newer_source:
            os.utime(src, (3000, 3000))


@pytest.mark.parametrize(("compiled_modules", "newer", "build", "stale"), [
    ((), "", "interpreted", []),
    (compiled.COMPILED_MODULES, "", "compiled", []),
    (compiled.COMPILED_MODULES[:1], "", "mixed", []),
    # an edited source beside its (older) compiled module: the edit would be ignored
    (compiled.COMPILED_MODULES, compiled.COMPILED_MODULES[2], "compiled",
     [compiled.COMPILED_MODULES[2]]),
    # a newer source without a compiled module is just the interpreted build
    ((), compiled.COMPILED_MODULES[2], "interpreted", []),
])
def test_build_and_staleness_from_files(tmp_path, compiled_modules, newer, build, stale):
    _tree(tmp_path, compiled_modules, newer_source=newer)
    assert compiled.build(tmp_path) == build
    assert compiled.stale(tmp_path) == stale
