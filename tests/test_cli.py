"""The `check`, `route` and `plan` commands, run as a user runs them."""

import json
import subprocess
import sys
import textwrap

import pytest

from stickyproxy.plan import ring_of
from stickyproxy import config

EXAMPLE = "config/example.toml"


def run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "stickyproxy.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_check_ok():
    r = run("check", "-c", EXAMPLE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "ok: 3 backends" in r.stdout


def test_check_reports_every_error_without_traceback(tmp_path):
    path = write(tmp_path, "bad.toml", """
        [listen]
        port = "x"
        [[backends]]
        id = "a"
        url = "ftp://x"
    """)
    r = run("check", "-c", path)
    assert r.returncode == 2
    assert "listen.port: expected an integer" in r.stderr
    assert "backends[0].url: not an http URL: 'ftp://x'" in r.stderr
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
