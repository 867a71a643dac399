"""The `check`, `route` and `plan` commands, run as a user runs them."""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import pytest

from stickyproxy import config
from stickyproxy.cli import build_parser, plural
from stickyproxy.routing.plan import ring_of

EXAMPLE = "config/example.toml"


def run(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_check_ok():
    r = run("check", "-c", EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "ok: 3 backends" in r.stdout


def test_check_reports_every_error_without_traceback(tmp_path):
    path = write(
        tmp_path,
        "bad.toml",
        """
        [listen]
        port = "x"
        [[backends]]
        id = "a"
        url = "ftp://x"
    """,
    )
    r = run("check", "-c", path)
    assert r.returncode == 2
    assert "listen.port: expected an integer" in r.stderr
    assert "backends[0].url: not an http:// or https:// URL: 'ftp://x'" in r.stderr
    assert "Traceback" not in r.stderr


def test_check_missing_file():
    r = run("check", "-c", "/nonexistent/x.toml")
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_route_json_matches_the_ring():
    r = run("route", "-c", EXAMPLE, "--json", "alice", "bob")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    ring = ring_of(config.load(EXAMPLE))
    assert [x["key"] for x in lines] == ["alice", "bob"]
    for x in lines:
        assert x["preference"] == ring.preference(x["key"])
        assert x["backend"] == x["preference"][0]


def test_route_text():
    r = run("route", "-c", EXAMPLE, "alice")
    key, owner, pref = r.stdout.strip().split("\t")
    assert key == "alice" and pref.split(" > ")[0] == owner


@pytest.fixture
def new_config(tmp_path):
    text = open(EXAMPLE).read() + '\n[[backends]]\nid = "app-4"\nurl = "http://127.0.0.1:9004"\n'
    return write(tmp_path, "new.toml", text)


def test_plan_exact_json(new_config):
    r = run("plan", "--from", EXAMPLE, "--to", new_config, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["basis"] == "key space"
    assert {f["to"] for f in plan["flows"]} == {"app-4"}
    assert 0.15 < plan["moved"] < 0.35
    assert abs(plan["ideal"] - 0.25) < 1e-6


def test_plan_with_key_file(tmp_path, new_config):
    keys = write(tmp_path, "keys.txt", "\n".join(f"u{i}" for i in range(2000)) + "\n")
    r = run("plan", "--from", EXAMPLE, "--to", new_config, "--keys", keys, "--json")
    plan = json.loads(r.stdout)
    assert plan["basis"] == "2000 keys"
    old, new = ring_of(config.load(EXAMPLE)), ring_of(config.load(new_config))
    expected = sum(1 for i in range(2000) if old.owner(f"u{i}") != new.owner(f"u{i}")) / 2000
    assert abs(plan["moved"] - expected) < 1e-9


def test_plan_table_and_sample(new_config):
    r = run("plan", "--from", EXAMPLE, "--to", new_config, "--sample", "5000")
    assert r.returncode == 0
    assert "users that move:" in r.stdout and "app-4" in r.stdout and "5000 keys" in r.stdout


def test_plan_with_invalid_new_config(tmp_path):
    bad = write(tmp_path, "bad.toml", "[[backends]]\nid = 1\n")
    r = run("plan", "--from", EXAMPLE, "--to", bad)
    assert r.returncode == 2 and "backends[0].id" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors_exit_2():
    assert run().returncode == 2
    assert run("route", "-c", EXAMPLE).returncode == 2


# ---------------------------------------------------------------------------------------
# routing questions never need runtime secrets; only `run` reads them

SECRETS = ("STICKYPROXY_ADMIN_TOKEN", "SP_CLI_JWT_SECRET")


def run_without_secrets(*args, timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [sys.executable, "-m", "stickyproxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


HS_CONFIG = """
    [listen]
    port = 0
    [admin]
    host = "0.0.0.0"
    port = 0
    token_env = "STICKYPROXY_ADMIN_TOKEN"
    [routing]
    keys = [{ from = "jwt", claim = "sub", algorithms = ["HS256"], secret_env = "SP_CLI_JWT_SECRET" }]
    [[backends]]
    id = "a"
    url = "http://127.0.0.1:9001"
    [[backends]]
    id = "b"
    url = "http://127.0.0.1:9002"
"""


def test_plan_between_shipped_configs_needs_no_admin_token():
    r = run_without_secrets("plan", "--from", EXAMPLE, "--to", "config/production.toml")
    assert r.returncode == 0, r.stderr
    assert "users that move:" in r.stdout


def test_check_route_and_plan_need_no_secret_and_run_refuses_without_them(tmp_path):
    path = write(tmp_path, "secrets.toml", HS_CONFIG)
    check = run_without_secrets("check", "-c", path)
    assert check.returncode == 0, check.stderr
    assert "1 key source (jwt sub from Authorization (HS256))" in check.stdout
    assert (
        "STICKYPROXY_ADMIN_TOKEN (admin.token_env, unset here), "
        "SP_CLI_JWT_SECRET (routing.keys[0].secret_env, unset here)"
    ) in check.stdout
    route = run_without_secrets("route", "-c", path, "alice")
    assert route.returncode == 0 and route.stdout.startswith("alice\t"), route.stderr
    plan = run_without_secrets("plan", "--from", path, "--to", path, "--json")
    assert plan.returncode == 0 and json.loads(plan.stdout)["moved"] == 0
    served = run_without_secrets("run", "-c", path)
    assert served.returncode == 2
    assert (
        "admin.token_env: environment variable 'STICKYPROXY_ADMIN_TOKEN' is unset" in served.stderr
    )
    assert (
        "routing.keys[0].secret_env: environment variable 'SP_CLI_JWT_SECRET' is unset"
        in served.stderr
    )
    assert "Traceback" not in served.stderr


def test_a_routing_config_with_an_unread_secret_accepts_no_token(tmp_path):
    cfg = config.load(write(tmp_path, "secrets.toml", HS_CONFIG), secrets=False)
    verifier = cfg.routing.keys[0].jwt
    with pytest.raises(ValueError):
        verifier.verify("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln")


def test_other_jwt_errors_are_still_reported_without_secrets(tmp_path):
    path = write(tmp_path, "bad.toml", HS_CONFIG.replace('["HS256"]', '["HS256", "RS256"]'))
    r = run_without_secrets("check", "-c", path)
    assert r.returncode == 2 and "routing.keys[0].algorithms: do not mix" in r.stderr


# ---------------------------------------------------------------------------------------
# output: closed pipes, long preference lists, help, plurals


def test_a_closed_pipe_ends_quietly():
    """`stickyproxy route ... | head -1`: the reader leaves after one line of ~600 KB."""
    keys = [f"user-{i}" for i in range(20_000)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "stickyproxy.cli", "route", "-c", EXAMPLE, *keys],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert first.startswith(b"user-0\t")
    assert err == "", err


@pytest.fixture
def wide_config(tmp_path):
    backends = "".join(
        f'[[backends]]\nid = "b{i:02d}"\nurl = "http://127.0.0.1:{9000 + i}"\n' for i in range(12)
    )
    return write(tmp_path, "wide.toml", backends)


def test_route_shows_the_first_entries_of_a_long_preference_list(wide_config):
    full = ring_of(config.load(wide_config)).preference("alice")
    r = run("route", "-c", wide_config, "alice")
    key, owner, pref = r.stdout.rstrip("\n").split("\t")
    assert pref == " > ".join(full[:5]) + " > ... (+7 more; --all shows them)"
    r = run("route", "-c", wide_config, "--depth", "2", "alice")
    assert (
        r.stdout.rstrip("\n").split("\t")[2]
        == " > ".join(full[:2]) + " > ... (+10 more; --all shows them)"
    )
    r = run("route", "-c", wide_config, "--all", "alice")
    assert r.stdout.rstrip("\n").split("\t")[2] == " > ".join(full)
    r = run("route", "-c", wide_config, "--json", "alice")
    assert json.loads(r.stdout) == {
        "key": "alice",
        "backend": full[0],
        "preference": full[:5],
        "more": 7,
    }
    assert run("route", "-c", wide_config, "--depth", "0", "alice").returncode == 2
    assert run("route", "-c", wide_config, "--all", "--depth", "3", "alice").returncode == 2


def test_every_option_has_help_and_every_help_states_the_exit_codes():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        r = run(*([name] if name else []), "--help")
        assert r.returncode == 0, r.stderr
        assert "exit codes:" in r.stdout and "141" in r.stdout and "130" in r.stdout, name


@pytest.mark.parametrize(
    ("n", "word", "expected"),
    [
        (0, "backend", "0 backends"),
        (1, "backend", "1 backend"),
        (2, "backend", "2 backends"),
        (1, "key source", "1 key source"),
        (3, "key source", "3 key sources"),
    ],
)
def test_plural(n, word, expected):
    assert plural(n, word) == expected


def test_check_counts_in_the_singular(tmp_path):
    path = write(tmp_path, "one.toml", '[[backends]]\nid = "a"\nurl = "http://127.0.0.1:9001"\n')
    r = run("check", "-c", path)
    assert ": ok: 1 backend, 1 key source (header X-User-Id)" in r.stdout, r.stdout
