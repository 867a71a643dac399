"""Builds the hot-path modules with mypyc when asked (see stickyproxy/compiled.py).

STICKYPROXY_COMPILE=1 compiles; 0 or unset leaves the package pure Python. The build
backend (build_backend.py) sets the default: on for wheels and regular installs, off for
editable installs, where in-place C modules would shadow edits to the source.
"""

import os
import runpy
import shutil
import sys
from pathlib import Path

from setuptools import setup

ext_modules = []
if os.environ.get("STICKYPROXY_COMPILE") == "1":
    if shutil.which(os.environ.get("CC", "cc")) is None:
        sys.exit("STICKYPROXY_COMPILE=1 needs a C compiler (cc) and the Python headers; "
                 "set STICKYPROXY_COMPILE=0 to install the pure-Python build")
    from mypyc.build import mypycify

    # compiled.py imports only the standard library: run it alone, without the package
    here = Path(__file__).resolve().parent
    modules = runpy.run_path(str(here / "stickyproxy" / "compiled.py"))["COMPILED_MODULES"]
    ext_modules = mypycify([m.replace(".", "/") + ".py" for m in modules], opt_level="3",
                           group_name="stickyproxy")

setup(ext_modules=ext_modules)
