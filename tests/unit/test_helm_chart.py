"""The Helm chart, rendered with a real Helm binary (installed by scripts/install-helm.sh).

Every ci/*-values.yaml scenario must lint strictly, render, validate (built-in kinds with
kubernetes-validate, KubeRay kinds against the vendored CRD schema) and carry the objects the
values ask for; every tests/data/helm/negative/*.yaml must fail to render with its message.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from moestack.config import parse_config
from moestack.config.schema import MoestackConfig
from moestack.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moestack"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
NEGATIVE_DIR = REPO / "tests" / "data" / "helm" / "negative"
NEGATIVE = sorted(p.name for p in NEGATIVE_DIR.glob("*.yaml"))
CRD_DIR = REPO / "tests" / "data" / "helm" / "kuberay-crds"
KUBE_VERSION = "1.30.0"
# Kinds served by CRDs (KubeRay, Prometheus Operator): kubernetes-validate only knows built-ins.
CRD_GROUPS = ("ray.io/", "monitoring.coreos.com/")


def helm_binary() -> str:
    """The Helm that scripts/install-helm.sh puts beside the venv's python, else one on PATH."""
    beside = Path(sys.executable).parent / "helm"
    found = str(beside) if beside.exists() else shutil.which("helm")
    if not found:
        raise RuntimeError("no helm binary: run scripts/install-helm.sh .venv")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": os.environ.get("TMPDIR", "/tmp") + "/helm-cache",
           "HELM_CONFIG_HOME": os.environ.get("TMPDIR", "/tmp") + "/helm-config",
           "HELM_DATA_HOME": os.environ.get("TMPDIR", "/tmp") + "/helm-data"}
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def template_args(values: tuple[str, ...] = (), sets: tuple[str, ...] = (),
                  api_versions: tuple[str, ...] = ("ray.io/v1/RayService",)) -> list[str]:
    args = ["template", "moestack", str(CHART), "--namespace", "llm",
            "--kube-version", KUBE_VERSION]
    for api in api_versions:
        args += ["--api-versions", api]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return args


@functools.lru_cache(maxsize=64)
def render(values: tuple[str, ...] = (), sets: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """Rendered objects of the chart with these values files and --set flags."""
    proc = run_helm(*template_args(values, sets))
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render_scenario(name: str, sets: tuple[str, ...] = ()) -> tuple[dict, ...]:
    return render((str(CHART / "ci" / name),), sets)


def objects(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def is_custom(doc: dict) -> bool:
    return doc["apiVersion"].startswith(CRD_GROUPS)


@functools.lru_cache(maxsize=4)
def crd_schema(kind: str) -> dict:
    """openAPIV3Schema of the vendored KubeRay CRD `kind` at ray.io/v1."""
    plural = {"RayService": "rayservices", "RayCluster": "rayclusters"}[kind]
    with gzip.open(CRD_DIR / f"ray.io_{plural}.yaml.gz", "rt", encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


@functools.lru_cache(maxsize=4)
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = crd_schema(kind)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def strict(schema):
    """The schema with unknown fields refused, as `kubectl apply --validate=strict` does.

    A structural CRD schema lists its fields but leaves additionalProperties open (the API
    server prunes unknown fields silently); here a misspelled field must fail instead.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def expected_message(negative_file: str) -> str:
    first = (NEGATIVE_DIR / negative_file).read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{negative_file}: first line must be '# expect: ...'"
    return first.removeprefix("# expect: ")


def serve_config(docs) -> dict:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def rendered_moestack_config(docs) -> dict:
    (app,) = serve_config(docs)["applications"]
    return yaml.safe_load(app["args"]["config_yaml"])


def gateway_service(docs) -> dict:
    """The Service KubeRay creates from the RayService's spec.serveService."""
    return {"apiVersion": "v1", "kind": "Service",
            **one(docs, "RayService")["spec"]["serveService"]}


def ray_cluster(docs) -> dict:
    return one(docs, "RayService")["spec"]["rayClusterConfig"]


def worker_group(docs, name: str) -> dict:
    return next(g for g in ray_cluster(docs)["workerGroupSpecs"] if g["groupName"] == name)


def container(pod_template: dict) -> dict:
    (c,) = pod_template["spec"]["containers"]
    return c


def volumes(pod_template: dict) -> dict:
    return {v["name"]: v for v in pod_template["spec"]["volumes"]}


# --- every scenario: lint, render, validate ---------------------------------------------------

@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_chart_lints_strictly(scenario):
    values = ["-f", str(CHART / "ci" / scenario)] if scenario else []
    # helm lint has no --api-versions: the KubeRay CRD check is what install/template do.
    proc = run_helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *values,
                    "--set", "kuberay.checkCRDs=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_builtin_object_is_valid_for_kubernetes_1_30(scenario):
    docs = render_scenario(scenario)
    builtin = [d for d in docs if not is_custom(d)] + [gateway_service(docs)]
    assert {"ConfigMap", "Service", "NetworkPolicy"} <= {d["kind"] for d in builtin}
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at "
                        f"{list(exc.path)}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rayservice_is_valid_against_the_kuberay_crd(scenario):
    rayservice = one(render_scenario(scenario), "RayService")
    crd_validator("RayService").validate(rayservice)
    # The cluster part is a RayCluster spec: check it against that CRD as well.
    crd_validator("RayCluster").validate({
        "apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"},
        "spec": rayservice["spec"]["rayClusterConfig"]})


def test_crd_schema_check_catches_a_misspelled_field():
    bad = json.loads(json.dumps(one(render(), "RayService")))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError):
        crd_validator("RayService").validate(bad)


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_serve_config_runs_the_app_builder_on_a_valid_moestack_config(scenario, monkeypatch):
    docs = render_scenario(scenario) if scenario else render()
    serve = serve_config(docs)
    (app,) = serve["applications"]
    assert app["import_path"] == "moestack.serve.app:app_builder"
    assert app["name"] == "moestack" and app["route_prefix"] == "/"
    raw = rendered_moestack_config(docs)
    assert serve["http_options"] == {"host": "0.0.0.0", "port": raw["gateway"]["port"]}
    monkeypatch.setenv("MOESTACK_DATABASE_URL", "postgresql+psycopg2://u:p@db:5432/moestack")
    config = parse_config(raw, source=f"chart {scenario}")  # raises ConfigError if invalid
    assert config.gateway.host == "0.0.0.0"
    # The ConfigMap holds the same configuration the RayService runs.
    cm = one(docs, "ConfigMap", "moestack-config")
    assert yaml.safe_load(cm["data"]["moestack.yaml"]) == raw


# --- negative scenarios ------------------------------------------------------------------------

@pytest.mark.parametrize("negative", NEGATIVE)
def test_impossible_values_fail_to_render_with_a_reason(negative):
    proc = run_helm(*template_args((str(NEGATIVE_DIR / negative),)))
    assert proc.returncode != 0, f"{negative} rendered but must fail"
    assert expected_message(negative) in proc.stderr


def test_should_fail_to_render_when_the_cluster_has_no_kuberay_crds():
    proc = run_helm(*template_args(api_versions=()))
    assert proc.returncode != 0
    assert "install the KubeRay operator first" in proc.stderr


# --- what the values ask for -------------------------------------------------------------------

def test_should_request_gpus_and_tolerate_the_gpu_taint_when_a_gpu_group_is_set():
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml")
    group = worker_group(docs, "h100")
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    assert group["rayStartParams"]["num-gpus"] == "8"
    pod = group["template"]
    c = container(pod)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod["spec"]["tolerations"]
    # 16 GPUs in one replica: TP 8 inside a node, DP 2 across the two workers.
    (model,) = rendered_moestack_config(docs)["models"]
    p = model["parallelism"]
    assert p["tensor_parallel_size"] * p.get("pipeline_parallel_size", 1) * \
        p["data_parallel_size"] == 2 * 8


def test_should_mount_shared_memory_and_the_model_cache_claim_when_existing_claim_is_set():
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml")
    pod = worker_group(docs, "h100")["template"]
    vols = volumes(pod)
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert vols["model-cache"]["persistentVolumeClaim"] == {"claimName": "model-weights",
                                                            "readOnly": True}
    mounts = {m["name"]: m["mountPath"] for m in container(pod)["volumeMounts"]}
    assert mounts == {"dshm": "/dev/shm", "model-cache": "/models",
                      "moestack-config": "/etc/moestack"}
    assert not objects(docs, "PersistentVolumeClaim")


def test_should_keep_engine_replicas_off_the_head_and_request_no_gpu_there():
    docs = render()
    head = ray_cluster(docs)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(container(head["template"])["resources"])


def test_should_run_cpu_workers_without_gpu_resources_when_gpus_per_worker_is_zero():
    docs = render_scenario("cpu-dev-values.yaml")
    group = worker_group(docs, "cpu")
    assert group["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(group["template"])
    assert ray_cluster(docs)["enableInTreeAutoscaling"] is True
    assert not objects(docs, "PodDisruptionBudget")


def test_should_pass_the_database_url_from_an_existing_secret_when_existing_secret_is_set():
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml")
    assert rendered_moestack_config(docs)["storage"]["url_env"] == "MOESTACK_DATABASE_URL"
    env = {e["name"]: e for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert env["MOESTACK_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == \
        {"name": "moestack-db", "key": "url"}
    # An external database replaces the bundled one; only the generated admin key is a Secret.
    assert not objects(docs, "StatefulSet")
    assert [d["metadata"]["name"] for d in objects(docs, "Secret")] == ["moestack-admin"]


def test_should_keep_the_database_url_in_a_secret_not_the_config_when_url_is_set():
    docs = render_scenario("external-postgres-values.yaml")
    secret = one(docs, "Secret", "moestack-database")
    assert secret["stringData"]["url"].startswith("postgresql+psycopg2://")
    assert "change-me" not in json.dumps(one(docs, "RayService"))
    assert "change-me" not in json.dumps(one(docs, "ConfigMap", "moestack-config"))
    env = {e["name"]: e for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert env["MOESTACK_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == \
        {"name": "moestack-admin", "key": "key"}


def test_should_use_the_config_storage_url_only_when_insecure_no_auth_is_set():
    docs = render(sets=("insecureNoAuth=true", "database.postgresql.enabled=false",
                        "moestack.tenancy.enabled=false", "adminKey.generate=false"))
    assert "url_env" not in rendered_moestack_config(docs).get("storage", {})
    assert rendered_moestack_config(docs)["tenancy"] == {"enabled": False}
    assert not objects(docs, "Secret") and not objects(docs, "StatefulSet")


def test_should_run_tenancy_on_with_the_bundled_postgresql_when_nothing_is_set():
    docs = render()
    raw = rendered_moestack_config(docs)
    assert raw["tenancy"]["enabled"] is True
    assert raw["storage"] == {"url_env": "MOESTACK_DATABASE_URL"}  # no URL in the config
    secret = one(docs, "Secret", "moestack-database")
    assert secret["stringData"]["url"].startswith("postgresql+psycopg2://moestack:")
    one(docs, "StatefulSet", "moestack-postgresql")
    env = {e["name"]: e for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert env["MOESTACK_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == \
        {"name": "moestack-database", "key": "url"}
    password = secret["stringData"]["password"]
    for doc in (one(docs, "RayService"), one(docs, "ConfigMap", "moestack-config")):
        assert password not in json.dumps(doc) and "postgresql+psycopg2" not in json.dumps(doc)


def test_should_fail_to_render_when_tenancy_is_off_unless_insecure_no_auth_is_set():
    proc = run_helm(*template_args(sets=("moestack.tenancy.enabled=false",)))
    assert proc.returncode != 0 and "set insecureNoAuth: true (private tests only)" in proc.stderr
    docs = render(sets=("moestack.tenancy.enabled=false", "insecureNoAuth=true"))
    assert rendered_moestack_config(docs)["tenancy"]["enabled"] is False


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_should_give_the_admin_key_and_database_url_to_the_head_pod_only(scenario):
    docs = render_scenario(scenario) if scenario else render()
    head_env = {e["name"] for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert {"MOESTACK_DATABASE_URL", "MOESTACK_ADMIN_KEY"} <= head_env
    for group in ray_cluster(docs)["workerGroupSpecs"]:
        text = json.dumps(group)
        assert "MOESTACK_DATABASE_URL" not in text and "MOESTACK_ADMIN_KEY" not in text
        assert "secretKeyRef" not in text


def test_should_pin_the_gateway_replicas_to_the_head_pod_when_rendered():
    docs = render()
    deployments = {d["name"]: d for d in serve_config(docs)["applications"][0]["deployments"]}
    assert deployments["Gateway"]["ray_actor_options"] == {
        "num_cpus": 0, "label_selector": {"moestack.io/gateway": "true"}}
    head = ray_cluster(docs)["headGroupSpec"]
    assert head["rayStartParams"]["labels"] == "moestack.io/gateway=true"
    for group in ray_cluster(docs)["workerGroupSpecs"]:
        assert "labels" not in group["rayStartParams"]


def test_should_generate_an_admin_key_of_48_characters_when_no_admin_key_is_set():
    key = one(render(), "Secret", "moestack-admin")["stringData"]["admin-key"]
    assert len(key) == 48
    docs = render(sets=("adminKey.generate=false",))
    assert not [s for s in objects(docs, "Secret") if s["metadata"]["name"] == "moestack-admin"]
    head_env = {e["name"] for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert "MOESTACK_ADMIN_KEY" not in head_env


def test_should_run_postgresql_and_create_the_model_cache_claim_when_bundled_is_enabled():
    docs = render_scenario("bundled-postgres-values.yaml")
    sts = one(docs, "StatefulSet", "moestack-postgresql")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] \
        == "5Gi"
    secret = one(docs, "Secret", "moestack-database")
    assert secret["stringData"]["url"].endswith("@moestack-postgresql:5432/moestack")
    one(docs, "Service", "moestack-postgresql")
    pvc = one(docs, "PersistentVolumeClaim", "moestack-model-cache")
    assert pvc["spec"]["storageClassName"] == "standard-rwx"
    head = ray_cluster(docs)["headGroupSpec"]["template"]
    assert volumes(head)["model-cache"]["persistentVolumeClaim"]["claimName"] == \
        "moestack-model-cache"


def test_should_route_only_v1_to_the_gateway_service_when_ingress_is_enabled():
    docs = render_scenario("ingress-values.yaml")
    ingress = one(docs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    # Only the public API: the admin API and /metrics are on another port altogether, and
    # /health, /ready, /docs, /openapi.json stay inside the cluster.
    assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/v1", "Prefix")]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = gateway_service(docs)
    assert backend["name"] == service["metadata"]["name"] == "moestack"
    # KubeRay keeps a port named "serve" and sets the selector to the active cluster's proxies.
    assert backend["port"]["name"] == service["spec"]["ports"][0]["name"] == "serve"
    assert service["spec"]["ports"][0]["targetPort"] == 8000
    assert ingress["spec"]["tls"][0]["secretName"] == "llm-example-com-tls"


def test_should_render_no_monitoring_objects_by_default():
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    assert not [d for d in objects(render(), "ConfigMap") if "dashboard" in d["metadata"]["name"]]


def test_should_scrape_ray_pods_and_the_gateway_when_monitoring_is_enabled():
    docs = render_scenario("monitoring-values.yaml")
    pm = one(docs, "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    head = container(ray_cluster(docs)["headGroupSpec"]["template"])
    assert {"name": "metrics", "containerPort": 8080} in head["ports"]
    sm = one(docs, "ServiceMonitor")
    operator = one(docs, "Service", "moestack-operator")
    assert sm["spec"]["selector"]["matchLabels"].items() <= operator["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == \
        [p["name"] for p in operator["spec"]["ports"]] == ["operator-0", "operator-1"]
    assert {e["path"] for e in sm["spec"]["endpoints"]} == {"/metrics"}


def test_should_scrape_each_gateway_replica_on_its_own_operator_port_when_num_replicas_is_set():
    docs = render_scenario("monitoring-values.yaml", ("moestack.gateway.num_replicas=3",))
    operator = one(docs, "Service", "moestack-operator")
    assert [(p["name"], p["port"]) for p in operator["spec"]["ports"]] == \
        [("operator-0", 8001), ("operator-1", 8002), ("operator-2", 8003)]
    assert operator["spec"]["selector"]["app.kubernetes.io/component"] == "ray-head"
    head = container(ray_cluster(docs)["headGroupSpec"]["template"])
    assert {"name": "operator-2", "containerPort": 8003} in head["ports"]
    assert len(one(docs, "ServiceMonitor")["spec"]["endpoints"]) == 3
    # The public Service carries the OpenAI API only.
    assert [p["name"] for p in gateway_service(docs)["spec"]["ports"]] == ["serve"]


def test_should_probe_worker_readiness_on_ready_when_proxies_run_on_every_node():
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml")
    probe = container(worker_group(docs, "h100")["template"])["readinessProbe"]
    assert probe["httpGet"] == {"path": "/ready", "port": 8000}
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml", ("serve.proxyLocation=HeadOnly",))
    assert "readinessProbe" not in container(worker_group(docs, "h100")["template"])


def test_prometheus_rule_carries_every_rule_group_of_the_chart_copy():
    docs = render_scenario("monitoring-values.yaml")
    rule = one(docs, "PrometheusRule")
    want = []
    for path in sorted((CHART / "files" / "prometheus").glob("*.y*ml")):
        want += yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    assert want, "the chart has no rule files: run helm/tools/sync_monitoring.py"
    assert rule["spec"]["groups"] == want


def test_should_render_one_sidecar_configmap_per_dashboard_when_dashboards_are_enabled():
    docs = render_scenario("monitoring-values.yaml")
    dashboards = [d for d in objects(docs, "ConfigMap") if "dashboard" in d["metadata"]["name"]]
    files = sorted((CHART / "files" / "grafana").glob("*.json"))
    assert files and len(dashboards) == len(files)
    for cm in dashboards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "moestack"}
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((CHART / "files" / "grafana" / name).read_text())


def test_should_give_each_worker_group_a_disruption_budget():
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml")
    pdb = one(docs, "PodDisruptionBudget")
    labels = worker_group(docs, "h100")["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def network_rules(docs) -> dict[frozenset, list]:
    """The NetworkPolicy's rules from outside the release, by the set of ports each opens, to
    its `from` peers (None: every source)."""
    policy = one(docs, "NetworkPolicy")
    release, *rules = policy["spec"]["ingress"]
    assert "ports" not in release  # the release's own pods: all ports
    return {frozenset(p["port"] for p in r["ports"]): r.get("from") for r in rules}


GATEWAY, RAY_METRICS, DASHBOARD = {8000}, {8080}, {8265, 52365}
OPERATOR = {8001, 8002}  # one per gateway replica (the default values run two)
PROMETHEUS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
ADMINS = [{"podSelector": {"matchLabels": {"app": "admin-tools"}}}]


def test_network_policy_admits_release_pods_and_the_configured_peers_only():
    docs = render_scenario("ingress-values.yaml")
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= \
        ray_cluster(docs)["headGroupSpec"]["template"]["metadata"]["labels"].items()
    rules = network_rules(docs)
    assert rules[frozenset(GATEWAY)][0]["namespaceSelector"]["matchLabels"] == \
        {"kubernetes.io/metadata.name": "ingress-nginx"}


def test_should_not_open_the_gateway_port_to_metricsFrom_when_metrics_from_is_set():
    rules = network_rules(render_scenario("monitoring-values.yaml"))
    assert rules[frozenset(RAY_METRICS | OPERATOR)] == PROMETHEUS
    for ports, peers in rules.items():
        if peers == PROMETHEUS:
            assert not ports & GATEWAY and not ports & DASHBOARD


def test_should_not_open_the_admin_or_metrics_ports_at_all_when_their_peers_are_empty():
    rules = network_rules(render())
    assert set(rules) == {frozenset(GATEWAY), frozenset(DASHBOARD)}
    assert rules[frozenset(GATEWAY)] is None  # the public API: open, it needs a tenant key
    assert rules[frozenset(DASHBOARD)][0]["podSelector"]["matchLabels"] == \
        {"app.kubernetes.io/name": "kuberay-operator"}


def test_should_open_the_operator_ports_to_adminFrom_only_when_admin_from_is_set():
    docs = render(sets=(
        "networkPolicy.adminFrom[0].podSelector.matchLabels.app=admin-tools",))
    rules = network_rules(docs)
    assert rules[frozenset(OPERATOR)] == ADMINS
    assert set(rules) == {frozenset(GATEWAY), frozenset(OPERATOR), frozenset(DASHBOARD)}


def test_should_open_the_operator_ports_to_every_source_only_when_allow_admin_from_anywhere_is_set():
    rules = network_rules(render(sets=("networkPolicy.allowAdminFromAnywhere=true",)))
    assert rules[frozenset(OPERATOR)] is None
    rules = network_rules(render(sets=("networkPolicy.allowMetricsFromAnywhere=true",)))
    assert rules[frozenset(RAY_METRICS | OPERATOR)] is None
    assert frozenset(OPERATOR) not in rules


def test_should_not_open_the_dashboard_to_gatewayFrom_when_gateway_from_is_set():
    rules = network_rules(render_scenario("ingress-values.yaml"))
    ingress_nginx = rules[frozenset(GATEWAY)]
    assert [ports for ports, peers in rules.items() if peers == ingress_nginx] == \
        [frozenset(GATEWAY)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_carries_the_standard_labels(scenario):
    for doc in render_scenario(scenario):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "moestack", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/instance"] == "moestack"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("moestack-")


def test_should_roll_the_pods_when_the_moestack_config_changes():
    def checksum(docs):
        return ray_cluster(docs)["headGroupSpec"]["template"]["metadata"]["annotations"][
            "checksum/config"]

    assert checksum(render()) != checksum(render(sets=("moestack.gateway.num_replicas=3",)))


# --- generated and copied files are current ------------------------------------------------------

def test_values_schema_embeds_the_current_moestack_config_schema():
    proc = subprocess.run([sys.executable, str(REPO / "helm" / "tools" / "gen_values_schema.py"),
                           "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["moestack"]["title"] == MoestackConfig.__name__


def test_chart_copy_of_rules_and_dashboards_equals_monitoring_sources():
    proc = subprocess.run([sys.executable, str(REPO / "helm" / "tools" / "sync_monitoring.py"),
                           "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_default_values_document_every_chart_field():
    """Each chart field has a comment just above it (the `moestack` key is documented by the
    config schema's own field descriptions)."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    undocumented, top = [], None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith((" ", "-")):
            top = stripped.split(":")[0]
        key_line = stripped.removeprefix("- ")
        if top == "moestack" or line.startswith(" " * 6) or ":" not in key_line \
                or key_line.endswith(":"):
            continue
        above = [lines[j].strip() for j in range(max(0, i - 3), i)]
        if not any(a.startswith("#") for a in above):
            undocumented.append(stripped)
    assert not undocumented, f"values.yaml fields without a comment: {undocumented}"


def test_notes_say_how_to_reach_the_api_and_the_operator_port_and_warn_when_insecure():
    proc = run_helm("install", "moestack", str(CHART), "--namespace", "llm", "--dry-run=client",
                    "--set", "kuberay.checkCRDs=false", "-f",
                    str(CHART / "ci" / "ingress-values.yaml"))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "moestack k8s status --namespace llm --name moestack" in notes
    assert "https://llm.example.com/v1" in notes
    assert "svc/moestack-operator 8001:8001" in notes
    assert "kubectl get secret -n llm moestack-admin" in notes
    assert "no database is configured" not in notes and "WARNING" not in notes
    proc = run_helm("install", "moestack", str(CHART), "--namespace", "llm", "--dry-run=client",
                    "--set", "kuberay.checkCRDs=false", "--set", "insecureNoAuth=true",
                    "--set", "moestack.tenancy.enabled=false",
                    "--set", "database.postgresql.enabled=false")
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "WARNING: insecureNoAuth is true: tenancy is off" in notes
    assert "no database is configured" in notes


def test_pods_read_the_database_url_from_the_environment_variable_the_chart_sets(monkeypatch):
    docs = render_scenario("external-postgres-values.yaml")
    raw = rendered_moestack_config(docs)
    env_name = raw["storage"]["url_env"]
    head_env = {e["name"] for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert env_name in head_env
    monkeypatch.setenv(env_name, "postgresql+psycopg2://u:secret@db:5432/moestack")
    config = parse_config(raw)
    assert config.storage.url == "postgresql+psycopg2://u:secret@db:5432/moestack"
    assert config.storage.url_env is None  # resolved once; re-parsing the dump needs no env
    monkeypatch.delenv(env_name)
    with pytest.raises(ConfigError, match=f"{env_name}, which is not set"):
        parse_config(raw)


def test_packaged_chart_carries_the_schema_rules_and_dashboards(tmp_path):
    proc = run_helm("package", str(CHART), "--destination", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (archive,) = tmp_path.glob("moestack-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "moestack/values.schema.json" in names
    assert "moestack/templates/_validations.tpl" in names
    for kind, pattern in (("prometheus", "*.y*ml"), ("grafana", "*.json")):
        for path in (CHART / "files" / kind).glob(pattern):
            assert f"moestack/files/{kind}/{path.name}" in names


@pytest.mark.parametrize("optimized", [True, False])
def test_every_ray_pod_runs_serve_with_the_throughput_env_moestack_up_uses(optimized):
    from moestack.serve.local import THROUGHPUT_ENV

    docs = render(sets=() if optimized else ("moestack.ray.serve_throughput_optimized=false",))
    pods = [ray_cluster(docs)["headGroupSpec"]["template"],
            *(g["template"] for g in ray_cluster(docs)["workerGroupSpecs"])]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in container(pod)["env"]}
        serve_env = {k: v for k, v in env.items() if k in THROUGHPUT_ENV}
        assert serve_env == (THROUGHPUT_ENV if optimized else {})
