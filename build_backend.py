"""setuptools' PEP 517 backend, plus two decisions: whether to compile with mypyc, and what
the compiler must see.

A wheel or regular install compiles the hot path unless STICKYPROXY_COMPILE=0; an editable
install stays pure Python unless STICKYPROXY_COMPILE=1.

A compiled build type-checks the hot path against the packages it imports (aiohttp,
httptools, prometheus_client, PyJWT, ...), and mypyc compiles what mypy inferred: a package
mypy cannot see would make its types Any and the compiled code different. So when compiling,
the build requirements are mypy plus every runtime dependency, read from pyproject.toml's
[project].dependencies so the two lists cannot drift: pip's isolated build environment then
holds exactly the packages, at the same version floors, that the installed proxy runs with,
whatever else is installed around the build (docs/design.md §7a, "hermetic compiled build").
"""

import os
import tomllib
from pathlib import Path

from setuptools import build_meta as _meta
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the hooks, unchanged)

MYPYC = "mypy>=1.13"
PYPROJECT = Path(__file__).resolve().with_name("pyproject.toml")


def runtime_dependencies() -> list[str]:
    with open(PYPROJECT, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def _compile(default: str) -> bool:
    os.environ.setdefault("STICKYPROXY_COMPILE", default)
    return os.environ["STICKYPROXY_COMPILE"] == "1"


def compile_requirements() -> list[str]:
    return [MYPYC, *runtime_dependencies()]


# setuptools would run setup.py to discover requirements, before mypy is there to import;
# setup.py declares no setup_requires, so [build-system] requires plus these is the list.
def get_requires_for_build_wheel(config_settings=None):
    return compile_requirements() if _compile("1") else []


def get_requires_for_build_editable(config_settings=None):
    return compile_requirements() if _compile("0") else []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _compile("1")
    return _meta.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _compile("0")
    return _meta.build_editable(wheel_directory, config_settings, metadata_directory)
