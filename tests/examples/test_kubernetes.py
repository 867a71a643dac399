"""deploy/kubernetes: every manifest against the Kubernetes schemas (kubernetes-validate, which
ships them: no cluster, no network), and the checks no schema makes: the proxy's config
parses, ports and names agree between the manifests and the config, the probes hit paths the
admin API and the shop serve, the SRV name the proxies ask is the one the headless Service
publishes, the grace period covers the drain, every container runs locked down."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from stickyproxy.config import parse
from stickyproxy.control.admin import Admin
from stickyproxy.demo.shop.routes import add_routes
from stickyproxy.discovery import parse_discovery

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
# Oldest Kubernetes the manifests must be valid for (PodDisruptionBudget policy/v1 needs 1.21;
# this is the oldest minor still under the clouds' extended support), and the newest the
# installed kubernetes-validate knows.
OLDEST = "1.29.0"
VERSIONS = (OLDEST, kubernetes_validate.latest_version())
CLUSTER_DOMAIN = "cluster.local"
# Seconds the grace period must leave beyond preStop + the proxy's drain, for the process to
# exit and the kubelet to see it.
GRACE_MARGIN = 3


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def generated_config_maps() -> list[dict[str, Any]]:
    """The ConfigMaps kustomize's configMapGenerator makes (before the hash suffix)."""
    out = []
    for gen in kustomization().get("configMapGenerator", []):
        data = {Path(f).name: (BASE / f).read_text() for f in gen.get("files", [])}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"], "namespace": kustomization()["namespace"]},
                "data": data,
            }
        )
    return out


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            if doc is not None:
                docs.append((name, doc))
    docs += [("configMapGenerator", cm) for cm in generated_config_maps()]
    return docs


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def named_port(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return p


def proxy_config() -> tuple[dict[str, Any], Any]:
    text = (BASE / "stickyproxy.toml").read_text()
    raw = tomllib.loads(text)
    return raw, parse(raw, "deploy/kubernetes/stickyproxy.toml")


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", text)
    assert m, text
    return float(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]]


# -- schemas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version):
    docs = documents()
    assert len(docs) >= 9
    for source, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{source}: {doc['kind']}/{doc['metadata']['name']} "
                f"(Kubernetes {version}): {e.message} at {list(e.path)}"
            )


def test_schema_validation_catches_a_mistake():
    """The validator in use refuses a misspelt field (strict) and a wrong type."""
    dep = one("Deployment", "stickyproxy")
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, OLDEST, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(dep))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, OLDEST, strict=True)


def test_kustomization_lists_every_manifest():
    k = kustomization()
    listed = set(k["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for gen in k["configMapGenerator"]:
        for f in gen["files"]:
            assert (BASE / f).is_file(), f
    for _, doc in documents():
        ns = doc["metadata"].get("namespace")
        assert ns in (None, k["namespace"]), doc["metadata"]


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(BASE)]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(BASE)]
    return None


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl installed")
def test_kustomize_builds_and_the_build_validates():
    command = kustomize_command()
    assert command is not None
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    (cm,) = [d for d in built if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"].startswith("stickyproxy-config-")  # content hash
    (dep,) = [
        d for d in built if d["kind"] == "Deployment" and d["metadata"]["name"] == "stickyproxy"
    ]
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in volumes
    for doc in built:
        assert doc["metadata"].get("namespace", "shop-demo") == "shop-demo"
        kubernetes_validate.validate(doc, OLDEST, strict=True)


# -- the proxy's config and its Deployment -----------------------------------------------------
def test_config_parses_with_dns_discovery():
    raw, cfg = proxy_config()
    assert cfg.backends == ()
    settings = parse_discovery(raw["discovery"])
    assert cfg.discovery == settings
    assert settings.dns is not None and settings.file is None
    assert settings.dns.type == "SRV"
    assert 0 < settings.max_drop_share < 0.5


def test_ports_agree_between_config_deployment_and_service():
    _, cfg = proxy_config()
    dep = one("Deployment", "stickyproxy")
    c = container(dep, "stickyproxy")
    assert named_port(c, "http") == cfg.listen.port
    assert named_port(c, "admin") == cfg.admin.port
    assert cfg.listen.host == cfg.admin.host == "0.0.0.0"  # probes and peers are off-pod
    svc = one("Service", "stickyproxy")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    for p in svc["spec"]["ports"]:
        assert named_port(c, p["targetPort"]) == cfg.listen.port  # never the admin port
    mount = [m for m in c["volumeMounts"] if m["name"] == "config"][0]["mountPath"]
    assert c["args"] == ["run", "-c", f"{mount}/stickyproxy.toml"]


def test_admin_token_comes_from_a_secret():
    _, cfg = proxy_config()
    c = container(one("Deployment", "stickyproxy"), "stickyproxy")
    env = {e["name"]: e for e in c["env"]}
    assert cfg.admin.token_env in env
    assert "secretKeyRef" in env[cfg.admin.token_env]["valueFrom"]
    assert "token =" not in (BASE / "stickyproxy.toml").read_text()


def test_probes_hit_paths_the_admin_api_serves():
    paths = {r.canonical for r in Admin(control=None).app().router.resources()}
    c = container(one("Deployment", "stickyproxy"), "stickyproxy")
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # liveness must not depend on the backends (a down app would restart every proxy)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths
        assert c[probe]["httpGet"]["port"] == "admin"


def test_grace_period_covers_prestop_and_drain():
    _, cfg = proxy_config()
    dep = one("Deployment", "stickyproxy")
    c = container(dep, "stickyproxy")
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 2  # long enough for the endpoint removal to reach kube-proxy
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + cfg.timeouts.shutdown + GRACE_MARGIN
    assert cfg.timeouts.shutdown == duration(
        tomllib.loads((BASE / "stickyproxy.toml").read_text())["timeouts"]["shutdown"]
    )


def test_replicas_disruption_budget_and_rollout():
    dep = one("Deployment", "stickyproxy")
    pdb = one("PodDisruptionBudget", "stickyproxy")
    assert dep["spec"]["replicas"] >= 2
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- the shop and its discovery ----------------------------------------------------------------
def test_srv_name_is_the_one_the_headless_service_publishes():
    raw, cfg = proxy_config()
    ns = kustomization()["namespace"]
    svc = one("Service", "shop")
    sts = one("StatefulSet", "shop")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"].get("publishNotReadyAddresses", False) is False
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    service = svc["metadata"]["name"]
    srv = f"_{port['name']}._{port['protocol'].lower()}.{service}.{ns}.svc.{CLUSTER_DOMAIN}"
    assert cfg.discovery.dns.name == srv
    # ids: the pods' stable names (<statefulset>-<ordinal>)
    assert cfg.discovery.dns.strip_suffix == f".{service}.{ns}.svc.{CLUSTER_DOMAIN}"
    # SRV carries the endpoint's port: the Service's and the container's agree
    c = container(sts, "shop")
    assert named_port(c, port["targetPort"]) == port["port"]
    assert c["args"][c["args"].index("--port") + 1] == str(port["port"])
    assert raw["discovery"]["max_drop_share"] * sts["spec"]["replicas"] >= 1  # one pod may go


def test_shop_probes_and_health_checks_hit_a_path_the_shop_serves():
    _, cfg = proxy_config()
    app = web.Application()
    add_routes(app)
    paths = {r.canonical for r in app.router.resources()}
    assert cfg.health.path in paths
    c = container(one("StatefulSet", "shop"), "shop")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths


def test_shop_reaches_redis_by_its_service():
    c = container(one("StatefulSet", "shop"), "shop")
    url = c["args"][c["args"].index("--redis") + 1]
    m = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", url)
    assert m
    svc = one("Service", m[1])
    assert int(m[2]) in {p["port"] for p in svc["spec"]["ports"]}


# -- images and security -----------------------------------------------------------------------
IMAGES = {
    "stickyproxy": ROOT / "Dockerfile",
    "stickyproxy-shop": ROOT / "examples" / "Dockerfile.app",
}


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in documents() if d["kind"] in ("Deployment", "StatefulSet")]


def test_project_images_come_from_the_dockerfiles_and_run_as_their_user():
    seen = set()
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if c["image"] not in IMAGES:
                continue
            seen.add(c["image"])
            dockerfile = IMAGES[c["image"]].read_text()
            uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile)
            assert uid, IMAGES[c["image"]]
            assert spec["securityContext"]["runAsUser"] == int(uid[1]), w["metadata"]["name"]
    assert seen == set(IMAGES)
    tags = {i["name"] for i in kustomization()["images"]}
    assert tags == set(IMAGES)


def test_every_container_is_locked_down():
    for w in workloads():
        spec = w["spec"]["template"]["spec"]
        name = w["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name
            assert c["resources"]["requests"]["memory"], name
            assert c["resources"]["limits"]["memory"], name
            assert "readinessProbe" in c, name


# -- docs/fleet.md's alert rules ---------------------------------------------------------------
def test_fleet_alert_rules_use_exported_metrics_and_labels():
    from stickyproxy.control.metrics import DEFINITIONS, PREFIX

    text = (ROOT / "docs" / "fleet.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    rules = [r for b in blocks for g in yaml.safe_load(b)["groups"] for r in g["rules"]]
    assert any(
        r["expr"] == "count(count by (fingerprint) (stickyproxy_ring_info)) > 1" for r in rules
    )
    exprs = [r["expr"] for r in rules] + re.findall(r"```promql\n(.*?)```", text, re.S)
    for expr in exprs:
        for metric in re.findall(r"\bstickyproxy_\w+", expr):
            name = metric.removeprefix(PREFIX)
            kind = DEFINITIONS.get(name.removesuffix("_total"), ("",))[0]
            assert name in DEFINITIONS or kind == "counter", metric
        for labels in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in labels.split(",")):
                assert label == "namespace" or label in DEFINITIONS["ring_info"][2], label
