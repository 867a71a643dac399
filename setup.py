"""Builds the hot-path modules with mypyc when asked (see stickyproxy/compiled.py).

STICKYPROXY_COMPILE=1 compiles; 0 or unset leaves the package pure Python. The build
backend (build_backend.py) sets the default: on for wheels and regular installs, off for
editable installs, where in-place C modules would shadow edits to the source.

A compiled build also writes stickyproxy/_build_stamp.json beside the compiled modules (in
the wheel, or in the source tree for an in-place build): the SHA-256 of each compiled
module's source, which the start-up check compares with the .py files it finds.
"""

import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
# compiled.py imports only the standard library: run it alone, without the package
COMPILED = runpy.run_path(str(HERE / "stickyproxy" / "compiled.py"))
MODULES = COMPILED["COMPILED_MODULES"]

TYPECHECK_FAILED = (
    "stickyproxy: mypy could not type-check the hot path, so nothing was compiled (a module "
    "mypy cannot see would be compiled as Any, and the result would break at run time). If "
    "it names a module it cannot find, the build environment lacks a runtime dependency: "
    "build with pip's default build isolation (the backend asks for every runtime "
    "dependency), or install the dependencies first when using --no-build-isolation; "
    "STICKYPROXY_COMPILE=0 installs the pure-Python build."
)


class build_ext_with_stamp(build_ext):
    """build_ext, then the stamp beside the compiled modules wherever they landed."""

    def run(self):
        super().run()
        if not self.extensions:
            return
        first = MODULES[0]
        package_dir = Path(self.get_ext_fullpath(first)).parents[first.count(".") - 1]
        (package_dir / COMPILED["STAMP"]).write_text(COMPILED["stamp_text"](HERE / "stickyproxy"))


ext_modules = []
if os.environ.get("STICKYPROXY_COMPILE") == "1":
    if shutil.which(os.environ.get("CC", "cc")) is None:
        sys.exit(
            "STICKYPROXY_COMPILE=1 needs a C compiler (cc) and the Python headers; "
            "set STICKYPROXY_COMPILE=0 to install the pure-Python build"
        )
    from mypyc.build import mypycify

    try:
        ext_modules = mypycify(
            [m.replace(".", "/") + ".py" for m in MODULES], opt_level="3", group_name="stickyproxy"
        )
    except SystemExit as e:  # mypy printed its errors; add what they mean here
        sys.exit(
            TYPECHECK_FAILED
            if isinstance(e.code, int) or e.code is None
            else f"{e.code}\n{TYPECHECK_FAILED}"
        )

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext_with_stamp})
