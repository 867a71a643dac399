"""The Docker images without a Docker engine: the proxy image runs the container configuration
from the path the README tells users to mount over, that configuration is reachable from
outside a container and takes its admin token from the environment, and no file a Dockerfile
copies is excluded from the build context. (.ci/container.sh builds and runs the images on a
real engine.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib

import pytest

from stickyproxy import config

from .conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
APP_DOCKERFILE = ROOT / "examples" / "Dockerfile.app"
DOCKERIGNORE = ROOT / ".dockerignore"
CONTAINER_TOML = ROOT / "config" / "container.toml"
MOUNT_PATH = "/etc/stickyproxy/stickyproxy.toml"
TOKEN_ENV = "STICKYPROXY_ADMIN_TOKEN"
# docker stop (and compose) send SIGKILL this long after SIGTERM unless told otherwise.
DOCKER_STOP_TIMEOUT = 10.0


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        name, _, args = whole.strip().partition(" ")
        out.append((name.upper(), args.strip()))
    return out


def final_stage(path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    return steps[last_from:]


def copy_sources(path) -> list[str]:
    sources = []
    for name, args in instructions(path):
        words = shlex.split(args)
        if name == "COPY" and not any(w.startswith("--from=") for w in words):
            sources += [w for w in words[:-1] if not w.startswith("--")]
    return sources


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``*`` and ``?`` stay within one path segment,
    ``**`` spans any number of them (none included)."""
    out = re.escape(pattern.strip("/"))
    out = out.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    out = out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context: the last pattern that
    matches the path or one of its parent directories decides; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_image_runs_the_container_config_from_the_documented_mount_path():
    steps = dict(final_stage(DOCKERFILE))
    assert steps["COPY"].split() == ["config/container.toml", MOUNT_PATH]
    cmd = json.loads(steps["CMD"])
    assert cmd[0] == "run" and cmd[cmd.index("-c") + 1] == MOUNT_PATH
    assert json.loads(steps["ENTRYPOINT"]) == ["stickyproxy"]
    # The HEALTHCHECK reads the admin port from the mounted file: it must be that file.
    assert MOUNT_PATH in steps["HEALTHCHECK"] and "/healthz" in steps["HEALTHCHECK"]
    assert steps["USER"] != "root"
    readme = (ROOT / "README.md").read_text()
    docker_section = readme[readme.index("\n## Docker\n") : readme.index("\n## More\n")]
    for fact in (MOUNT_PATH, TOKEN_ENV, "/healthz", "docker compose"):
        assert fact in docker_section, fact


def test_the_container_config_is_reachable_from_outside_and_takes_its_token_from_env(monkeypatch):
    raw = tomllib.loads(CONTAINER_TOML.read_text())
    assert "token" not in raw["admin"], "the admin token must never be written in the file"
    assert raw["admin"]["token_env"] == TOKEN_ENV
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    cfg = config.load(CONTAINER_TOML)
    assert cfg.listen.host == cfg.admin.host == "0.0.0.0"
    assert cfg.admin.token == "from-the-environment"
    # In-flight requests get their grace before docker stop's SIGKILL.
    assert cfg.timeouts.shutdown < DOCKER_STOP_TIMEOUT
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(config.ConfigError, match=f"admin.token_env: .*{TOKEN_ENV}"):
        config.load(CONTAINER_TOML)


def test_the_compose_config_stops_inside_compose_s_timeout():
    cfg = tomllib.loads((ROOT / "examples" / "compose" / "stickyproxy.toml").read_text())
    from stickyproxy.units import parse_duration

    assert parse_duration(cfg["timeouts"]["shutdown"]) < DOCKER_STOP_TIMEOUT


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, APP_DOCKERFILE], ids=lambda p: p.name)
def test_what_a_dockerfile_copies_is_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    for src in copy_sources(dockerfile):
        assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}"
        if src != ".":
            assert not ignored(src, patterns), f"{dockerfile.name}: COPY {src} is in .dockerignore"


def test_dockerignore_keeps_build_output_of_the_checkout_out():
    """A stale in-place .so copied into the build would be what the image runs."""
    patterns = dockerignore_patterns()
    for path in (
        "stickyproxy/routing/router.cpython-311-x86_64-linux-gnu.so",
        "stickyproxy/dataplane/__pycache__/proxy.cpython-311.pyc",
        "stickyproxy/_build_stamp.json",
        "stickyproxy.egg-info/PKG-INFO",
        "build/lib",
        ".git/HEAD",
        "tests/conftest.py",
    ):
        assert ignored(path, patterns), path
    for path in (
        "stickyproxy/routing/router.py",
        "pyproject.toml",
        "build_backend.py",
        "setup.py",
        "README.md",
        "config/container.toml",
        "examples/Dockerfile.app",
    ):
        assert not ignored(path, patterns), path


def test_ignored_follows_dockerignore_rules():
    patterns = ["examples", "!examples/Dockerfile.app", "**/*.so", "build"]
    assert ignored("examples/grafana/x.json", patterns)
    assert not ignored("examples/Dockerfile.app", patterns)
    assert ignored("a/b/c.so", patterns) and ignored("c.so", patterns)
    assert ignored("build/lib/x.py", patterns) and not ignored("stickyproxy/build.py", patterns)


def test_the_app_image_runs_the_shop_from_the_package():
    steps = dict(final_stage(APP_DOCKERFILE))
    assert json.loads(steps["ENTRYPOINT"]) == ["python", "-m", "stickyproxy.demo.shop"]
    from stickyproxy.demo.shop.settings import parse_args

    settings = parse_args(json.loads(steps["CMD"]))
    assert settings.host == "0.0.0.0"


def test_the_ci_container_stage_is_valid_bash():
    script = ROOT / ".ci" / "container.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    # It must clean up whatever happens, and use vfs with no bridge, as CI machines allow.
    assert re.search(r"^trap cleanup EXIT$", text, re.M)
    for flag in ("--storage-driver=vfs", "--bridge=none", "--iptables=false", "DOCKER_BUILDKIT=0"):
        assert flag in text, flag
