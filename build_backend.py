"""setuptools' PEP 517 backend, plus one decision: whether to compile with mypyc.

A wheel or regular install compiles the hot path unless STICKYPROXY_COMPILE=0; an editable
install stays pure Python unless STICKYPROXY_COMPILE=1. mypy (which carries mypyc) is a
build requirement only when compiling.
"""

import os

from setuptools import build_meta as _meta
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the hooks, unchanged)

MYPYC = "mypy>=1.13"


def _compile(default: str) -> bool:
    os.environ.setdefault("STICKYPROXY_COMPILE", default)
    return os.environ["STICKYPROXY_COMPILE"] == "1"


# setuptools would run setup.py to discover requirements, before mypy is there to import;
# setup.py declares no setup_requires, so [build-system] requires plus mypy is the list.
def get_requires_for_build_wheel(config_settings=None):
    return [MYPYC] if _compile("1") else []


def get_requires_for_build_editable(config_settings=None):
    return [MYPYC] if _compile("0") else []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _compile("1")
    return _meta.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _compile("0")
    return _meta.build_editable(wheel_directory, config_settings, metadata_directory)
