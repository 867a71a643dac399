"""Every example configuration passes ``stickyproxy check`` as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

CONFIGS = sorted((ROOT / "config").glob("*.toml")) + [
    ROOT / "examples" / "compose" / "stickyproxy.toml"
]
# The variable production.toml and the compose config read their admin token from.
TOKEN_ENV = "STICKYPROXY_ADMIN_TOKEN"


def check(path, tmp_path, **env):
    return subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_example_config_passes_check(path, tmp_path):
    r = check(path, tmp_path, **{TOKEN_ENV: "example-token"})
    assert r.returncode == 0, r.stderr
    assert ": ok: 3 backends" in r.stdout


def test_the_common_set_ups_are_all_there():
    names = {p.name for p in CONFIGS}
    assert {"header-key.toml", "cookie-key.toml", "production.toml", "jwt.toml"} <= names


def test_admin_token_is_never_in_the_file(tmp_path):
    """The token comes from the environment: `check` needs none (it reads no secret), and
    `run` refuses to start without it, before it listens anywhere."""
    for path in (
        ROOT / "config" / "production.toml",
        ROOT / "examples" / "compose" / "stickyproxy.toml",
    ):
        r = subprocess.run(
            [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
            env={**os.environ, TOKEN_ENV: ""},
        )
        assert r.returncode == 2 and f"{TOKEN_ENV!r} is unset or empty" in r.stderr, r.stderr
        assert check(path, tmp_path, **{TOKEN_ENV: ""}).returncode == 0


def test_jwt_example_ships_a_public_key_only():
    pem = (ROOT / "config" / "jwt-public.pem").read_text()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----") and "PRIVATE" not in pem
