"""The compose stack without a Docker engine: every file parses, every file it references
exists, names and ports agree between compose, the proxy config, Prometheus and Grafana, and
every metric the dashboard queries is one the code exports."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from shop.metrics import ShopMetrics

from stickyproxy import metrics as proxy_metrics
from stickyproxy.context import ContextMetrics

from .conftest import EXAMPLES

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
    "stickyproxy_requests_total", "stickyproxy_route_decisions_total", "stickyproxy_retries_total",
    "stickyproxy_backend_up", "stickyctx_acquisitions_total", "stickyctx_writes_total",
    "stickyctx_redis_errors_total",
}


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
    registries = (ContextMetrics().registry,
                  ShopMetrics(CollectorRegistry(), node="n", mode="m").registry)
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
        app: f"http://{app}:{port}" for app, port in app_ports.items()}

    sp = services["stickyproxy"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in sp["volumes"]}
    config_path = option(sp["command"], "-c")
    assert (EXAMPLES / mounted[config_path]).resolve() == PROXY_TOML
    assert proxy["listen"]["host"] == proxy["admin"]["host"] == "0.0.0.0"
    assert proxy["admin"]["token_env"] in sp["environment"]
    published = {p.rsplit(":", 1)[1] for p in sp["ports"]}
    assert {str(proxy["listen"]["port"]), str(proxy["admin"]["port"])} <= published

    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS)["scrape_configs"]}
    targets = {job: [t for sc in cfg["static_configs"] for t in sc["targets"]] for job, cfg in jobs.items()}
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
    dashboards = [src for dst, src in mounts.items() if dst.startswith(provider["options"]["path"] + "/")]
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
