"""Start-up checks and admin exposure (docs/THREAT_MODEL.md T7, T8).

- ``stickyproxy.control.startup.check_runtime()`` refuses a pure-Python aiohttp parser (the control
  plane's parser is what the design trusts: aiohttp >= 3.14.1 with its C parser), an
  unimportable httptools C parser, and dependencies below their floors;
  STICKYPROXY_ALLOW_PY_PARSER=1 is the explicit escape hatch for the first one only.
- ``stickyproxy run`` refuses to start on those problems: exit 1, one clear line per problem,
  no traceback, nothing listening.
- An admin listener off loopback needs a token: ``stickyproxy check`` and ``run`` exit 2
  naming ``admin.token``; a token from the environment is read by ``run`` only (``check``
  needs no secret).
- ``run`` and ``demo`` refuse a compiled module built from other source than the ``.py``
  beside it (the build's stamp of source hashes), and accept an installed wheel whatever
  its file times. The token check itself is tested in tests/ops/test_admin.py
  (test_mutating_endpoints_require_the_bearer_token, test_token_from_the_environment).

Every test runs the code in a subprocess, so the environment it sees is exactly the one set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from stickyproxy import compiled
from stickyproxy.control.startup import FLOORS
from support.net import free_port

ENV_KEYS = ("AIOHTTP_NO_EXTENSIONS", "STICKYPROXY_ALLOW_PY_PARSER")


def _env(**set_: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env.update(set_)
    return env


def check_runtime_in_subprocess(prelude: str = "", **env: str) -> list[str]:
    code = (
        prelude + "\nimport json\nfrom stickyproxy.control.startup import check_runtime\n"
        "print(json.dumps(check_runtime()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runtime_is_clean_in_the_test_environment():
    assert check_runtime_in_subprocess() == []


@pytest.mark.parametrize("value", ["1", "yes", "0"])
def test_aiohttp_no_extensions_is_a_problem(value):
    """aiohttp reads AIOHTTP_NO_EXTENSIONS as "set to anything non-empty" (even "0" is
    treated as set by the check, the conservative reading)."""
    problems = check_runtime_in_subprocess(AIOHTTP_NO_EXTENSIONS=value)
    assert len(problems) == 1, problems
    assert "AIOHTTP_NO_EXTENSIONS" in problems[0] and "STICKYPROXY_ALLOW_PY_PARSER=1" in problems[0]


def test_the_escape_hatch_allows_the_pure_python_parser():
    assert (
        check_runtime_in_subprocess(AIOHTTP_NO_EXTENSIONS="1", STICKYPROXY_ALLOW_PY_PARSER="1")
        == []
    )


@pytest.mark.parametrize("allow", ["0", "true", "", " 1"])
def test_only_exactly_1_opens_the_escape_hatch(allow):
    problems = check_runtime_in_subprocess(
        AIOHTTP_NO_EXTENSIONS="1", STICKYPROXY_ALLOW_PY_PARSER=allow
    )
    assert any("AIOHTTP_NO_EXTENSIONS" in p for p in problems), problems


_BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == {name!r}:
                raise ImportError("blocked by the test: " + name)
            return None
    sys.meta_path.insert(0, _Block())
""")


def test_missing_aiohttp_c_parser_is_a_problem():
    problems = check_runtime_in_subprocess(_BLOCK.format(name="aiohttp._http_parser"))
    assert any("aiohttp's C HTTP parser is missing" in p for p in problems), problems


def test_missing_aiohttp_c_parser_is_allowed_only_by_the_escape_hatch():
    assert (
        check_runtime_in_subprocess(
            _BLOCK.format(name="aiohttp._http_parser"), STICKYPROXY_ALLOW_PY_PARSER="1"
        )
        == []
    )


def test_missing_httptools_c_parser_is_a_problem_even_with_the_escape_hatch():
    problems = check_runtime_in_subprocess(
        _BLOCK.format(name="httptools.parser.parser"), STICKYPROXY_ALLOW_PY_PARSER="1"
    )
    assert problems == ["httptools' C parser is not importable"], problems


@pytest.mark.parametrize(
    "dist, version", [("aiohttp", "3.14.0"), ("uhashring", "2.4"), ("httptools", "0.6.3")]
)
def test_dependency_below_its_floor_is_a_problem(dist, version):
    prelude = textwrap.dedent(f"""
        from importlib import metadata
        _real = metadata.version
        metadata.version = lambda d: {version!r} if d == {dist!r} else _real(d)
    """)
    problems = check_runtime_in_subprocess(prelude)
    floor = ".".join(map(str, FLOORS[dist]))
    assert problems == [f"{dist} {version} is below the required {floor}"], problems


# ---------------------------------------------------------------------------------------
# `stickyproxy run` refuses to start


def _config(tmp_path: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        textwrap.dedent(f"""
        [listen]
        host = "127.0.0.1"
        port = {port}
        [admin]
        enabled = false
        [health]
        enabled = false
        [logging]
        level = "info"
        [[backends]]
        id = "a"
        url = "http://127.0.0.1:{free_port()}"
    """)
        + extra
    )
    return path


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_run_refuses_to_start_on_the_pure_python_parser(tmp_path, workers):
    port = free_port()
    cfg = _config(tmp_path, port)
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(cfg), "--workers", str(workers)],
        check=False,
        capture_output=True,
        text=True,
        env=_env(AIOHTTP_NO_EXTENSIONS="1"),
        timeout=60,
    )
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert time.monotonic() - t0 < 30
    err = out.stderr
    assert "start-up check failed" in err and "AIOHTTP_NO_EXTENSIONS" in err, err
    assert "Traceback" not in err and "Traceback" not in out.stdout, err
    assert not _listening(port)


def test_demo_applies_the_same_start_up_checks(tmp_path):
    port = free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "stickyproxy.cli",
            "demo",
            "--no-ui",
            "--duration",
            "1",
            "--port",
            str(port),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=_env(AIOHTTP_NO_EXTENSIONS="1"),
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "stickyproxy demo: start-up check failed: AIOHTTP_NO_EXTENSIONS" in out.stderr, (
        out.stderr
    )
    assert "Traceback" not in out.stderr and not _listening(port)


def test_run_starts_with_the_escape_hatch_and_stops_cleanly(tmp_path):
    port = free_port()
    cfg = _config(tmp_path, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(AIOHTTP_NO_EXTENSIONS="1", STICKYPROXY_ALLOW_PY_PARSER="1"),
        start_new_session=True,
    )
    try:
        end = time.monotonic() + 20
        while not _listening(port):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < end, "did not start listening"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _copy_of_the_package(tmp_path: Path) -> Path:
    """This build of the package copied as pip lays out a wheel: into a site directory (no
    checkout around it), every .py file written after the compiled modules."""
    root = compiled.PACKAGE_DIR.parent
    copy = tmp_path / "site"
    shutil.copytree(
        compiled.PACKAGE_DIR, copy / "stickyproxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    for group in root.glob("stickyproxy__mypyc*"):  # mypyc's shared runtime module
        shutil.copy2(group, copy / group.name)
    later = time.time() + 60
    for source in (copy / "stickyproxy").rglob("*.py"):
        os.utime(source, (later, later))
    return copy


def _with_package(copy: Path) -> dict[str, str]:
    env = _env()
    env["PYTHONPATH"] = str(copy)
    return env


@pytest.mark.skipif(compiled.build() != "compiled", reason="needs the compiled build")
def test_an_installed_compiled_package_is_current_although_its_sources_are_newer(tmp_path):
    """pip writes a wheel's .py files after its .so files: content, not time, decides."""
    copy = _copy_of_the_package(tmp_path)
    code = (
        "import json, stickyproxy\nfrom stickyproxy.control.startup import check_runtime\n"
        "print(json.dumps([stickyproxy.__file__, check_runtime()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=_with_package(copy),
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    where, problems = json.loads(out.stdout)
    assert where.startswith(str(copy)) and problems == []


@pytest.mark.skipif(compiled.build() != "compiled", reason="needs the compiled build")
@pytest.mark.parametrize("command", ["run", "demo"])
def test_run_and_demo_refuse_a_compiled_module_built_from_other_source(tmp_path, command):
    """An installed copy whose router.py was changed after the build: the compiled router
    would run instead of the change, so `run` and `demo` both refuse, naming it once, with
    the fix for an installed package (not the one for a checkout)."""
    copy = _copy_of_the_package(tmp_path)
    edited = compiled.source_path("stickyproxy.routing.router", copy / "stickyproxy")
    edited.write_text(edited.read_text() + "\n# changed after the build\n")
    port = free_port()
    args = (
        ["run", "-c", str(_config(tmp_path, port))]
        if command == "run"
        else ["demo", "--no-ui", "--duration", "1", "--port", str(port)]
    )
    out = subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=_with_package(copy),
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert out.stderr.count("start-up check failed") == 1, out.stderr
    assert "stickyproxy.routing.router: compiled from a different source" in out.stderr, out.stderr
    assert "pip install --force-reinstall" in out.stderr and "pip install -e" not in out.stderr
    assert "Traceback" not in out.stderr
    assert not _listening(port)


# ---------------------------------------------------------------------------------------
# the admin listener off loopback needs a token


def _check(tmp_path: Path, admin: str, **env: str) -> subprocess.CompletedProcess[str]:
    cfg = _config(tmp_path, free_port()).read_text().replace("[admin]\nenabled = false\n", "")
    path = tmp_path / "check.toml"
    path.write_text(cfg + "\n[admin]\n" + admin + "\n")
    return subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", "check", "-c", str(path)],
        check=False,
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=60,
    )


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "::", "10.1.2.3", "192.168.0.10", "admin.example.com", "127.1", "::ffff:10.0.0.1"],
)
def test_check_refuses_an_admin_listener_off_loopback_without_a_token(tmp_path, host):
    out = _check(tmp_path, f'host = "{host}"\nport = {free_port()}')
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "admin.token: required when admin.host is not a loopback address" in out.stderr, (
        out.stderr
    )
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_check_accepts_a_loopback_admin_listener_without_a_token(tmp_path, host):
    out = _check(tmp_path, f'host = "{host}"\nport = {free_port()}')
    assert out.returncode == 0, out.stderr


def test_check_accepts_off_loopback_with_a_token_or_when_disabled(tmp_path):
    assert (
        _check(tmp_path, f'host = "0.0.0.0"\nport = {free_port()}\ntoken = "t0k3n"').returncode == 0
    )
    assert _check(tmp_path, 'enabled = false\nhost = "0.0.0.0"').returncode == 0
    out = _check(
        tmp_path,
        f'host = "0.0.0.0"\nport = {free_port()}\ntoken_env = "SP_SEC_ADMIN_TOKEN"',
        SP_SEC_ADMIN_TOKEN="from-env",
    )
    assert out.returncode == 0, out.stderr


def test_check_needs_no_secret_but_names_the_one_run_reads(tmp_path):
    """A routing question is never blocked by a runtime secret: `check` passes with the
    token's variable unset, and says that `run` will read it."""
    out = _check(
        tmp_path, f'host = "0.0.0.0"\nport = {free_port()}\ntoken_env = "SP_SEC_SURELY_UNSET"'
    )
    assert out.returncode == 0, out.stderr
    assert "SP_SEC_SURELY_UNSET (admin.token_env, unset here)" in out.stdout


def test_run_refuses_an_unset_token_env_off_loopback(tmp_path):
    port = free_port()
    path = tmp_path / "unset-token.toml"
    path.write_text(
        _config(tmp_path, port)
        .read_text()
        .replace(
            "[admin]\nenabled = false\n",
            f'[admin]\nhost = "0.0.0.0"\nport = {free_port()}\ntoken_env = "SP_SEC_SURELY_UNSET"\n',
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(path)],
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert (
        "admin.token_env: environment variable 'SP_SEC_SURELY_UNSET' is unset or empty"
        in out.stderr
    )
    assert "admin.token: required" in out.stderr and "Traceback" not in out.stderr
    assert not _listening(port)


def test_run_refuses_an_admin_listener_off_loopback_without_a_token(tmp_path):
    port = free_port()
    path = tmp_path / "open-admin.toml"
    path.write_text(
        _config(tmp_path, port)
        .read_text()
        .replace("[admin]\nenabled = false\n", f'[admin]\nhost = "0.0.0.0"\nport = {free_port()}\n')
    )
    out = subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", "run", "-c", str(path)],
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "admin.token" in out.stderr and "Traceback" not in out.stderr
    assert not _listening(port)
