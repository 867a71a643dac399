"""The compose stack without a Docker engine: every file parses, every file it references
exists, the compose file is one Compose v2 reads (the Compose Specification; Compose 1.x
cannot), names and ports agree between compose, the proxy config, Prometheus and Grafana, the
apps' health check passes against a running app, and every metric the dashboard queries is
one the code exports. (No Compose v2 can be installed from Debian's archive: the structure
is checked here; .ci/container.sh builds both images on a real engine.)"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from shop.metrics import ShopMetrics
from shop.settings import parse_args

from stickyproxy.context import ContextMetrics
from stickyproxy.control import metrics as proxy_metrics
from support.net import IO_TIMEOUT, free_port

from .conftest import EXAMPLES, ShopFactory

COMPOSE = EXAMPLES / "docker-compose.yml"
PROMETHEUS = EXAMPLES / "prometheus.yml"
PROVISIONING = EXAMPLES / "grafana" / "provisioning"
DASHBOARD = EXAMPLES / "grafana" / "stickyproxy.json"
PROXY_TOML = EXAMPLES / "compose" / "stickyproxy.toml"
APPS = ("app-1", "app-2", "app-3")
METRIC_NAME = re.compile(r"\b(?:stickyproxy|stickyctx|shop)_[a-z0-9_]+\b")
# What the dashboard must show: requests by backend, route decisions, retries, backend
# health, rehydrations, and the library's Redis writes and errors.
REQUIRED_METRICS = {
    "stickyproxy_requests_total",
    "stickyproxy_route_decisions_total",
    "stickyproxy_retries_total",
    "stickyproxy_backend_up",
    "stickyctx_acquisitions_total",
    "stickyctx_writes_total",
    "stickyctx_redis_errors_total",
}
# The Compose Specification's top-level elements. Compose 1.x reads a file without
# `version:` in the legacy format, where every top-level key is a service: `name:` fails.
TOP_LEVEL = {"name", "services", "networks", "volumes", "configs", "secrets", "include"}
# The Compose Specification service attributes this file uses or may reasonably add.
SERVICE_KEYS = {
    "build",
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "depends_on",
    "healthcheck",
    "restart",
    "stop_grace_period",
    "stop_signal",
    "user",
    "read_only",
    "labels",
    "networks",
}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
# A project name as Compose v2 accepts it.
PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:us|ms|s|m|h))+$")
PORT = re.compile(r"^(?:(?:\d{1,3}\.){3}\d{1,3}:)?\d{1,5}:\d{1,5}$")
# Interpolation: $$ (a literal $), $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
# ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, ${VAR+alt}.
INTERPOLATION = re.compile(
    r"\$(?:\$|[A-Za-z_][A-Za-z0-9_]*|\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\})"
)


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for name, (kind, _, _) in proxy_metrics.DEFINITIONS.items():
        full = proxy_metrics.PREFIX + name
        if kind == "counter":
            names.add(full + "_total")
        elif kind == "gauge":
            names.add(full)
        else:
            names |= {full + suffix for suffix in ("_bucket", "_sum", "_count")}
    registries = (
        ContextMetrics().registry,
        ShopMetrics(CollectorRegistry(), node="n", mode="m").registry,
    )
    for registry in registries:
        for family in registry.collect():
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            else:
                names.add(family.name)
    return names


def test_every_referenced_file_exists(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (EXAMPLES / build["context"]).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY ") and "--from=" not in line:
                    # (a COPY --from copies out of an earlier build stage, not the context)
                    for src in line.split()[1:-1]:
                        assert (context / src).exists(), f"{dockerfile.name}: COPY {src}"
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (EXAMPLES / src).exists(), f"{name}: volume {src}"
    for path in PROVISIONING.rglob("*.yml"):
        load_yaml(path)


def test_app_instances_proxy_config_and_prometheus_agree(compose):
    services = compose["services"]
    proxy = tomllib.loads(PROXY_TOML.read_text())
    app_ports = {}
    for app in APPS:
        command = services[app]["command"]
        assert option(command, "--node-id") == app
        assert option(command, "--host") == "0.0.0.0"
        assert option(command, "--redis") == "redis://redis:6379/0"
        app_ports[app] = option(command, "--port")
    assert {b["id"]: b["url"] for b in proxy["backends"]} == {
        app: f"http://{app}:{port}" for app, port in app_ports.items()
    }

    sp = services["stickyproxy"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in sp["volumes"]}
    config_path = option(sp["command"], "-c")
    assert (EXAMPLES / mounted[config_path]).resolve() == PROXY_TOML
    assert proxy["listen"]["host"] == proxy["admin"]["host"] == "0.0.0.0"
    assert proxy["admin"]["token_env"] in sp["environment"]
    published = {p.rsplit(":", 1)[1] for p in sp["ports"]}
    assert {str(proxy["listen"]["port"]), str(proxy["admin"]["port"])} <= published

    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS)["scrape_configs"]}
    targets = {
        job: [t for sc in cfg["static_configs"] for t in sc["targets"]] for job, cfg in jobs.items()
    }
    assert targets["stickyproxy"] == [f"stickyproxy:{proxy['admin']['port']}"]
    assert sorted(targets["shop"]) == sorted(f"{app}:{port}" for app, port in app_ports.items())
    for job in targets.values():
        for target in job:
            assert target.split(":")[0] in services


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert (EXAMPLES / mounts["/etc/grafana/provisioning"]).resolve() == PROVISIONING
    datasource = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    provider = load_yaml(PROVISIONING / "dashboards" / "stickyproxy.yml")["providers"][0]
    dashboards = [
        src for dst, src in mounts.items() if dst.startswith(provider["options"]["path"] + "/")
    ]
    assert [(EXAMPLES / src).resolve() for src in dashboards] == [DASHBOARD]
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            used |= names
    unknown = used - exported_metric_names()
    assert not unknown, f"the dashboard queries metrics nothing exports: {sorted(unknown)}"
    assert REQUIRED_METRICS <= used


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def test_the_file_says_and_is_compose_v2(compose):
    text = COMPOSE.read_text()
    header = text[: text.index("\nname:")]
    assert "Compose v2" in header and "docker compose up" in header
    assert not re.search(r"docker-compose (up|build|run)", text), "the v1 command"
    assert "version" not in compose, "`version:` is obsolete in Compose v2"
    assert {k for k in compose if not k.startswith("x-")} <= TOP_LEVEL
    assert PROJECT_NAME.match(compose["name"])
    services = compose["services"]
    for name, service in services.items():
        assert set(service) <= SERVICE_KEYS, f"{name}: {set(service) - SERVICE_KEYS}"
        assert "image" in service or "build" in service, name
        assert service.get("restart", "no") in RESTART_POLICIES, name
        for port in service.get("ports", []):
            assert isinstance(port, str) and PORT.match(port), f"{name}: port {port!r}"
        check = service.get("healthcheck")
        if check:
            assert check["test"][0] in ("CMD", "CMD-SHELL"), name
            for key in ("interval", "timeout", "start_period"):
                assert key not in check or DURATION.match(check[key]), f"{name}: {key}"
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):  # the short form: started, not healthy
            depends_on = dict.fromkeys(depends_on, "service_started")
        for dep, spec in depends_on.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"] if isinstance(spec, dict) else "service_started"
            assert condition in DEPENDS_ON_CONDITIONS, f"{name}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check"
    for value in strings(compose):
        leftover = INTERPOLATION.sub("", value)
        assert "$" not in leftover, f"not a Compose interpolation: {value!r}"


def test_the_admin_token_must_come_from_the_environment(compose):
    """`docker compose up` stops with a message, not a proxy without a token."""
    env = compose["services"]["stickyproxy"]["environment"]
    token_env = tomllib.loads(PROXY_TOML.read_text())["admin"]["token_env"]
    assert re.fullmatch(r"\$\{" + re.escape(token_env) + r":\?[^}]+\}", env[token_env])


def test_every_app_command_is_one_the_shop_accepts(compose):
    for app in APPS:
        settings = parse_args(compose["services"][app]["command"])
        assert (settings.node_id, settings.host) == (app, "0.0.0.0")


async def test_the_apps_health_check_passes_against_a_running_app(compose, shop: ShopFactory):
    test = compose["services"]["app-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    command = test[3]
    port = option(compose["services"]["app-1"]["command"], "--port")
    assert f"127.0.0.1:{port}/healthz" in command
    client = await shop("app-1")

    async def run(to_port: int) -> int:
        # A subprocess the event loop waits on: the app answers from this same loop.
        code = command.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{to_port}/")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await asyncio.wait_for(proc.wait(), IO_TIMEOUT * 2)

    assert await run(client.port) == 0
    assert await run(free_port()) != 0, "the check passes with nothing listening"
