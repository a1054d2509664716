"""The Helm chart, rendered with a real Helm binary (installed by scripts/install-helm.sh).

Every ci/*-values.yaml scenario must lint strictly, render, validate (built-in kinds with
kubernetes-validate, KubeRay kinds against the vendored CRD schema) and carry the objects the
values ask for; every tests/data/helm/negative/*.yaml must fail to render with its message.
"""

from __future__ import annotations

import functools
import gzip
import ipaddress
import json
import os
import re
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
from moestack.testing.helm import helm_binary

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moestack"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
NEGATIVE_DIR = REPO / "tests" / "data" / "helm" / "negative"
NEGATIVE = sorted(p.name for p in NEGATIVE_DIR.glob("*.yaml"))
CRD_DIR = REPO / "tests" / "data" / "helm" / "kuberay-crds"
KUBE_VERSION = "1.30.0"
# Kinds served by CRDs (KubeRay, Prometheus Operator): kubernetes-validate only knows built-ins.
CRD_GROUPS = ("ray.io/", "monitoring.coreos.com/")



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
    # Direct ingress (the gateways hold the port) runs no Serve proxy; the proxy ingress does.
    assert (serve["proxy_location"] == "Disabled") == (raw["gateway"]["ingress"] == "direct")
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
                      "moestack-config": "/etc/moestack", "tmp": "/tmp"}
    assert not objects(docs, "PersistentVolumeClaim")


@pytest.mark.parametrize("claim", ["", "team-adapters"])
def test_should_mount_the_adapter_claim_read_only_in_every_ray_pod_when_existing_claim_is_set(
        claim):
    docs = render(sets=(f"adapters.volume.existingClaim={claim}",
                        "adapters.mountPath=/lora") if claim else ())
    cluster = ray_cluster(docs)
    pods = [cluster["headGroupSpec"]["template"],
            *[g["template"] for g in cluster["workerGroupSpecs"]]]
    for pod in pods:
        mounts = {m["name"]: m for m in container(pod)["volumeMounts"]}
        if not claim:
            assert "adapters" not in volumes(pod) and "adapters" not in mounts
            continue
        assert volumes(pod)["adapters"]["persistentVolumeClaim"] == {
            "claimName": "team-adapters", "readOnly": True}
        assert (mounts["adapters"]["mountPath"], mounts["adapters"]["readOnly"]) == ("/lora", True)


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


DB_URL = "postgresql+psycopg2://moestack:Zq8vK2pLx7Rt4@db.example:5432/moestack"


def test_should_keep_the_database_url_in_a_secret_not_the_config_when_url_is_set():
    docs = render(sets=(f"database.url={DB_URL}", "networkPolicy.databaseCIDR=10.20.0.0/24"))
    secret = one(docs, "Secret", "moestack-database")
    assert secret["stringData"]["url"] == DB_URL
    for doc in docs:
        if doc["kind"] != "Secret":
            assert "Zq8vK2pLx7Rt4" not in json.dumps(doc), doc["metadata"]["name"]
    env = {e["name"]: e for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert env["MOESTACK_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == \
        {"name": "moestack-database", "key": "url"}


def test_should_read_the_url_and_admin_key_from_existing_secrets_when_external_postgres_is_set():
    docs = render_scenario("external-postgres-values.yaml")
    assert not objects(docs, "Secret") and not objects(docs, "StatefulSet")
    env = {e["name"]: e for e in container(ray_cluster(docs)["headGroupSpec"]["template"])["env"]}
    assert env["MOESTACK_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == \
        {"name": "moestack-admin", "key": "key"}
    assert env["MOESTACK_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == \
        {"name": "moestack-db", "key": "url"}


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
    assert set(secret["stringData"]) == {"password"}
    one(docs, "StatefulSet", "moestack-postgresql")
    assert_url_composed_from_password(docs, "moestack-database", "password")
    password = secret["stringData"]["password"]
    assert len(password) == 32 and password.isalnum()  # URL-safe
    for doc in (one(docs, "RayService"), one(docs, "ConfigMap", "moestack-config")):
        assert password not in json.dumps(doc)
    assert "postgresql+psycopg2" not in json.dumps(one(docs, "ConfigMap", "moestack-config"))
    assert "postgresql+psycopg2" not in one(docs, "RayService")["spec"]["serveConfigV2"]


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


CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@\"]+:(?!\$\()[^@\s\"]+@")


@pytest.mark.parametrize("sets", [(), ("adminKey.value=Qm4tX9vR2kLp7Zs1Wc8Hn3Jd6Fb0Yg5e",
                                       f"database.url={DB_URL}",
                                       "networkPolicy.databaseCIDR=10.20.0.0/24")])
@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_should_keep_secret_values_out_of_the_serve_config_and_every_other_object(scenario, sets):
    docs = render_scenario(scenario, sets) if scenario else render(sets=sets)
    secrets = [v for s in objects(docs, "Secret") for v in s["stringData"].values()]
    secrets += [s.split("=", 1)[1] for s in sets
                if s.startswith(("adminKey.value", "database.url"))]
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = json.dumps(doc)
        assert not [v for v in secrets if v in text], doc["metadata"]["name"]
        assert not CREDENTIALS_IN_URL.search(text), doc["metadata"]["name"]
    # The moestack config Ray Serve runs (serveConfigV2, the app builder's args) names the
    # environment variables that hold the secrets, never their values.
    serve = one(docs, "RayService")["spec"]["serveConfigV2"]
    assert "psycopg2" not in serve and "sqlite" not in serve
    raw = rendered_moestack_config(docs)
    assert raw["storage"] == {"url_env": "MOESTACK_DATABASE_URL"}
    assert not {k for k in raw.get("tenancy", {}) if "key" in k} - {"admin_key_env"}


def test_should_render_the_same_objects_every_time_when_gitops_is_set():
    def template(*values):
        proc = run_helm(*template_args(values))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    gitops = str(CHART / "ci" / "bundled-postgres-values.yaml")
    assert template(gitops) == template(gitops)
    # Without a cluster to look up, generated secrets change on every render: what gitops refuses.
    assert template() != template()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_should_carry_no_secret_or_placeholder_in_any_ci_values_file(scenario):
    text = (CHART / "ci" / scenario).read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    assert not values.get("adminKey", {}).get("value")
    assert not values.get("database", {}).get("url")
    assert "change-me" not in text and "password" not in json.dumps(values).lower()


def assert_url_composed_from_password(docs, secret: str, key: str) -> None:
    """The head builds the bundled database's URL from the password Secret PostgreSQL uses."""
    head = container(ray_cluster(docs)["headGroupSpec"]["template"])
    env = [e["name"] for e in head["env"]]
    by_name = {e["name"]: e for e in head["env"]}
    ref = {"name": secret, "key": key}
    assert by_name["MOESTACK_DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert by_name["MOESTACK_DATABASE_URL"]["value"] == "postgresql+psycopg2://moestack:" \
        "$(MOESTACK_DATABASE_PASSWORD)@moestack-postgresql:5432/moestack"
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    assert env.index("MOESTACK_DATABASE_PASSWORD") < env.index("MOESTACK_DATABASE_URL")
    pg = {e["name"]: e for e in container(one(docs, "StatefulSet")["spec"]["template"])["env"]}
    assert pg["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref


def test_should_run_postgresql_and_create_the_model_cache_claim_when_bundled_is_enabled():
    docs = render_scenario("bundled-postgres-values.yaml")
    sts = one(docs, "StatefulSet", "moestack-postgresql")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] \
        == "5Gi"
    assert not objects(docs, "Secret")  # gitops: the password and admin key are existing Secrets
    assert_url_composed_from_password(docs, "moestack-postgresql", "password")
    assert sts["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
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
    # KubeRay keeps a port named "serve" and sets the selector to the active cluster's pods
    # labelled ray.io/serve=true (the head while its gateways answer /-/healthz, every worker).
    assert backend["port"]["name"] == service["spec"]["ports"][0]["name"] == "serve"
    assert service["spec"]["ports"][0]["targetPort"] == "serve"
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


PROXY_INGRESS = ("moestack.gateway.ingress=proxy", "serve.proxyLocation=EveryNode")


def test_should_probe_worker_readiness_on_ready_when_proxies_run_on_every_node():
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml", PROXY_INGRESS)
    probe = container(worker_group(docs, "h100")["template"])["readinessProbe"]
    assert probe["httpGet"] == {"path": "/ready", "port": 8000}


@pytest.mark.parametrize("sets", [(), ("moestack.gateway.ingress=proxy",
                                       "serve.proxyLocation=HeadOnly")])
def test_should_probe_only_ray_on_workers_when_they_run_no_serve_proxy(sets, tmp_path):
    """Left to KubeRay, a RayService worker's probe also waits for a Serve proxy on the `serve`
    port, which direct ingress (or HeadOnly proxies) never starts there: never ready."""
    docs = render_scenario("deepseek-v3-2x8-h100-values.yaml", sets)
    probe = container(worker_group(docs, "h100")["template"])["readinessProbe"]
    assert probe["httpGet"] == {"path": "/api/healthz", "port": 52365}  # KubeRay's own check
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    group = {**defaults["workerGroups"][0],
             "rayStartParams": {"dashboard-agent-listen-port": "52400"}}
    docs = render((write_values(tmp_path, {"workerGroups": [group]}),), sets)
    probe = container(ray_cluster(docs)["workerGroupSpecs"][0]["template"])["readinessProbe"]
    assert probe["httpGet"]["port"] == 52400
    head = container(ray_cluster(docs)["headGroupSpec"]["template"])
    # KubeRay deploys the Serve app only once the head is ready: no probe of ours may wait on it.
    assert "readinessProbe" not in head


def test_should_disable_serve_proxies_and_serve_the_port_from_the_gateways_when_rendered():
    docs = render()
    serve = serve_config(docs)
    raw = rendered_moestack_config(docs)
    assert serve["proxy_location"] == "Disabled"
    assert raw["gateway"]["ingress"] == "direct" and raw["gateway"]["host"] == "0.0.0.0"
    # Two gateways: the survivor of a replica's death keeps serving and closes its rows.
    assert raw["gateway"]["num_replicas"] == 2
    head = container(ray_cluster(docs)["headGroupSpec"]["template"])
    assert {"name": "serve", "containerPort": 8000} in head["ports"]
    # Only the head declares the `serve` port the public Service targets by name: workers,
    # which KubeRay always labels ray.io/serve=true, get no endpoint.
    service = gateway_service(docs)
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8000, "serve")]
    for group in ray_cluster(docs)["workerGroupSpecs"]:
        ports = container(group["template"]).get("ports", [])
        assert not [p for p in ports if p["name"] == "serve" or p["name"].startswith("serve-")]
    # The gateways' listener, never Ray's own direct ingress (port pool, 150 s quarantine).
    for pod in [ray_cluster(docs)["headGroupSpec"]["template"],
                *(g["template"] for g in ray_cluster(docs)["workerGroupSpecs"])]:
        env = {e["name"]: e.get("value") for e in container(pod)["env"]}
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
        assert not {k for k in env if k.startswith("RAY_SERVE_DIRECT_INGRESS_")
                    or k in ("RAY_SERVE_PORT_QUARANTINE_S", "RAY_SERVE_ENABLE_HA_PROXY")}


def test_should_run_serve_proxies_on_every_node_behind_the_gateway_port_when_ingress_is_proxy():
    docs = render_scenario("proxy-ingress-values.yaml")
    assert serve_config(docs)["proxy_location"] == "EveryNode"
    assert rendered_moestack_config(docs)["gateway"]["ingress"] == "proxy"
    # Every pod's proxy serves the port: the Service targets its number on every pod.
    assert gateway_service(docs)["spec"]["ports"][0]["targetPort"] == 8000
    assert (frozenset(GATEWAY), None) in rules(docs, "ray-worker")


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


# --- network policies ---------------------------------------------------------------------------

RELEASE = {"app.kubernetes.io/name": "moestack", "app.kubernetes.io/instance": "moestack"}
COMPONENTS = ("ray-head", "ray-worker", "database")
def component_peer(*components: str) -> dict:
    return {"podSelector": {"matchLabels": RELEASE, "matchExpressions": [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": list(components)}]}}


RAY_PEER = component_peer("ray-head", "ray-worker")  # this release's Ray pods, this namespace
HEAD_PEER = component_peer("ray-head")
KUBERAY_OPERATOR = [{
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
DNS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
ALL_PORTS = None
GATEWAY, RAY_METRICS, DASHBOARD = {8000}, {8080}, {8265, 52365}
RAY_INTERNAL = {6379, 8265, 10001, 52365}  # GCS, dashboard (Jobs API), Ray client, agent
OPERATOR = {8001, 8002}  # one per gateway replica (the default values run two)
PROMETHEUS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
ADMINS = [{"podSelector": {"matchLabels": {"app": "admin-tools"}}}]
METADATA = ipaddress.ip_address("169.254.169.254")


def selected_components(selector: dict) -> set[str]:
    """Which of this release's pods (by component) a NetworkPolicy podSelector selects."""
    labels = selector.get("matchLabels", {})
    assert RELEASE.items() <= labels.items(), f"selects pods of other releases: {selector}"
    comps = set(COMPONENTS)
    if "app.kubernetes.io/component" in labels:
        comps &= {labels["app.kubernetes.io/component"]}
    for expr in selector.get("matchExpressions", []):
        assert (expr["key"], expr["operator"]) == ("app.kubernetes.io/component", "In")
        comps &= set(expr["values"])
    return comps


def rules(docs, component: str, direction: str = "ingress") -> list[tuple]:
    """(ports, peers) of every rule of every NetworkPolicy that selects `component`'s pods:
    ports a frozenset (ALL_PORTS: every port), peers a list (None: every address)."""
    peers_key = {"ingress": "from", "egress": "to"}[direction]
    out = []
    for policy in objects(docs, "NetworkPolicy"):
        spec = policy["spec"]
        if component not in selected_components(spec["podSelector"]):
            continue
        assert direction.capitalize() in spec["policyTypes"], policy["metadata"]["name"]
        for rule in spec.get(direction) or []:
            ports = rule.get("ports")
            out.append((frozenset(p["port"] for p in ports) if ports else ALL_PORTS,
                        rule.get(peers_key)))
    return out


def scenario_values(scenario: str | None) -> dict:
    if scenario is None:
        return {}
    return yaml.safe_load((CHART / "ci" / scenario).read_text(encoding="utf-8")) or {}


def docs_of(scenario: str | None):
    return render_scenario(scenario) if scenario else render()


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_should_open_ray_ports_only_to_this_releases_ray_pods_when_rendered(scenario):
    docs = docs_of(scenario)
    for component in ("ray-head", "ray-worker"):
        ingress = rules(docs, component)
        # Every port only from the Ray pods of this release, in this namespace.
        assert [peers for ports, peers in ingress if ports is ALL_PORTS] == [[RAY_PEER]]
        for ports, peers in ingress:
            assert peers != [] and "namespaceSelector: {}" not in yaml.safe_dump(peers)
            if ports is ALL_PORTS or not ports & RAY_INTERNAL:
                continue
            # GCS, the client port, the dashboard and the agent: the KubeRay operator only.
            assert component == "ray-head" and ports == DASHBOARD, (component, ports, peers)
            assert peers == KUBERAY_OPERATOR


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_should_open_the_dashboard_to_the_operator_namespace_and_pods_only_when_rendered(
        scenario):
    docs = docs_of(scenario)
    head = [(ports, peers) for ports, peers in rules(docs, "ray-head")
            if ports is not ALL_PORTS and ports & DASHBOARD]
    assert head == [(frozenset(DASHBOARD), KUBERAY_OPERATOR)]
    assert not [r for r in rules(docs, "ray-worker") if r[0] is not ALL_PORTS and r[0] & DASHBOARD]


def test_should_select_the_operator_by_its_namespace_and_labels_when_kuberay_operator_is_set():
    docs = render(sets=("networkPolicy.kuberayOperator.namespace=ray-ops",
                        "networkPolicy.kuberayOperator.podLabels.app=my-kuberay"))
    (peers,) = [peers for ports, peers in rules(docs, "ray-head") if ports == frozenset(DASHBOARD)]
    assert peers == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                            "ray-ops"}},
                      "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator",
                                                      "app": "my-kuberay"}}}]


def expected_database_egress(scenario: str | None) -> list[tuple]:
    values = scenario_values(scenario)
    database, np = values.get("database", {}), values.get("networkPolicy", {})
    if not (database.get("url") or database.get("existingSecret")):
        db_pods = {"podSelector": {"matchLabels": {**RELEASE,
                                                   "app.kubernetes.io/component": "database"}}}
        return [(frozenset({5432}), [db_pods])]
    peers = ([{"ipBlock": {"cidr": np["databaseCIDR"]}}] if np.get("databaseCIDR") else []) + \
        np.get("databaseTo", [])
    return [(frozenset({np.get("databasePort", 5432)}), peers)]


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_should_let_ray_pods_reach_only_dns_their_peers_and_the_database_when_rendered(scenario):
    docs = docs_of(scenario)
    common = [(ALL_PORTS, [RAY_PEER]), (frozenset({53}), DNS)]
    assert rules(docs, "ray-worker", "egress") == common
    head = rules(docs, "ray-head", "egress")
    api_server = [(frozenset({443, 6443}), [{"ipBlock": {"cidr": c}}])
                  for c in scenario_values(scenario).get("networkPolicy", {})
                  .get("apiServerCIDRs", [])]
    assert head == common + expected_database_egress(scenario) + api_server
    for ports, peers in head:
        assert peers, "an egress rule without `to` reaches every address"
        for peer in peers:
            if "ipBlock" in peer:
                assert METADATA not in ipaddress.ip_network(peer["ipBlock"]["cidr"])


def test_should_let_only_head_pods_reach_the_bundled_postgresql_when_bundled_is_enabled():
    docs = render_scenario("bundled-postgres-values.yaml")
    assert rules(docs, "database") == [(frozenset({5432}), [HEAD_PEER])]
    assert rules(docs, "database", "egress") == []  # it reaches nothing
    assert expected_database_egress(None)[0] in rules(docs, "ray-head", "egress")
    assert expected_database_egress(None)[0] not in rules(docs, "ray-worker", "egress")


def test_should_open_the_api_server_to_head_pods_only_when_autoscaling_is_enabled():
    docs = render_scenario("cpu-dev-values.yaml")
    api = (frozenset({443, 6443}), [{"ipBlock": {"cidr": "172.18.0.2/32"}}])
    assert api in rules(docs, "ray-head", "egress")
    assert api not in rules(docs, "ray-worker", "egress")
    assert not [r for r in rules(render(), "ray-head", "egress") if 6443 in (r[0] or ())]


def write_values(tmp_path, values: dict) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def test_should_add_internet_egress_without_the_metadata_range_when_extra_egress_excepts_it(
        tmp_path):
    internet = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}],
                "ports": [{"port": 443, "protocol": "TCP"}]}
    docs = render((write_values(tmp_path, {"networkPolicy": {"extraEgress": [internet]}}),))
    for component in ("ray-head", "ray-worker"):
        assert (frozenset({443}), internet["to"]) in rules(docs, component, "egress")


def test_should_accept_egress_to_the_metadata_address_only_when_allow_metadata_egress_is_set(
        tmp_path):
    metadata = {"to": [{"ipBlock": {"cidr": "169.254.169.254/32"}}],
                "ports": [{"port": 80, "protocol": "TCP"}]}
    values = write_values(tmp_path, {"networkPolicy": {"extraEgress": [metadata]}})
    proc = run_helm(*template_args((values,)))
    assert proc.returncode != 0 and "covers the cloud metadata address" in proc.stderr
    docs = render((values,), ("networkPolicy.allowMetadataEgress=true",))
    assert (frozenset({80}), metadata["to"]) in rules(docs, "ray-worker", "egress")


def test_should_render_no_network_policy_only_when_insecure_no_network_policy_is_set():
    proc = run_helm(*template_args(sets=("networkPolicy.enabled=false",)))
    assert proc.returncode != 0 and "set insecureNoNetworkPolicy: true" in proc.stderr
    docs = render(sets=("networkPolicy.enabled=false", "insecureNoNetworkPolicy=true"))
    assert not objects(docs, "NetworkPolicy")


def test_network_policy_admits_release_pods_and_the_configured_peers_only():
    docs = render_scenario("ingress-values.yaml")
    policy = one(docs, "NetworkPolicy", "moestack-ray")
    head_labels = ray_cluster(docs)["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= head_labels.items()
    assert selected_components(policy["spec"]["podSelector"]) == {"ray-head", "ray-worker"}
    nginx = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                    "ingress-nginx"}}}]
    # Direct ingress: only the head pods serve the public port.
    assert (frozenset(GATEWAY), nginx) in rules(docs, "ray-head")
    assert not [r for r in rules(docs, "ray-worker") if r[0] is not ALL_PORTS and r[0] & GATEWAY]
    docs = render_scenario("ingress-values.yaml", PROXY_INGRESS)
    assert (frozenset(GATEWAY), nginx) in rules(docs, "ray-worker")


def test_should_let_the_kuberay_operator_check_the_gateway_port_when_gateway_from_is_set():
    """KubeRay puts the head in the public Service only while GET /-/healthz on its `serve`
    port answers, checked from the operator's pod: gatewayFrom must not shut it out."""
    docs = render_scenario("ingress-values.yaml")
    assert (frozenset(GATEWAY), KUBERAY_OPERATOR) in rules(docs, "ray-head")
    assert (frozenset(GATEWAY), KUBERAY_OPERATOR) not in rules(docs, "ray-worker")
    # With gatewayFrom empty the port is open to every source already: no extra rule.
    assert (frozenset(GATEWAY), KUBERAY_OPERATOR) not in rules(render(), "ray-head")


def test_should_not_open_the_gateway_port_to_metricsFrom_when_metrics_from_is_set():
    docs = render_scenario("monitoring-values.yaml")
    assert (frozenset(RAY_METRICS), PROMETHEUS) in rules(docs, "ray-worker")
    assert (frozenset(OPERATOR), PROMETHEUS) in rules(docs, "ray-head")
    assert (frozenset(OPERATOR), PROMETHEUS) not in rules(docs, "ray-worker")
    for component in ("ray-head", "ray-worker"):
        for ports, peers in rules(docs, component):
            if peers == PROMETHEUS:
                assert not ports & GATEWAY and not ports & DASHBOARD


def test_should_not_open_the_admin_or_metrics_ports_at_all_when_their_peers_are_empty():
    docs = render()
    assert rules(docs, "ray-head") == [(ALL_PORTS, [RAY_PEER]), (frozenset(GATEWAY), None),
                                       (frozenset(DASHBOARD), KUBERAY_OPERATOR)]
    assert rules(docs, "ray-worker") == [(ALL_PORTS, [RAY_PEER])]  # no gateway, no proxy


def test_should_open_the_operator_ports_to_adminFrom_only_when_admin_from_is_set():
    docs = render(sets=(
        "networkPolicy.adminFrom[0].podSelector.matchLabels.app=admin-tools",))
    head = rules(docs, "ray-head")
    assert (frozenset(OPERATOR), ADMINS) in head
    assert [peers for ports, peers in head if ports and ports & OPERATOR] == [ADMINS]


def test_should_open_the_operator_ports_to_every_source_only_when_allow_admin_from_anywhere_is_set():
    head = rules(render(sets=("networkPolicy.allowAdminFromAnywhere=true",)), "ray-head")
    assert (frozenset(OPERATOR), None) in head
    docs = render(sets=("networkPolicy.allowMetricsFromAnywhere=true",))
    assert (frozenset(OPERATOR), None) in rules(docs, "ray-head")
    assert (frozenset(RAY_METRICS), None) in rules(docs, "ray-worker")
    assert not [r for r in rules(render(), "ray-head") if r[0] and r[0] & OPERATOR]


def test_should_not_open_the_dashboard_to_gatewayFrom_when_gateway_from_is_set():
    docs = render_scenario("ingress-values.yaml")
    nginx = scenario_values("ingress-values.yaml")["networkPolicy"]["gatewayFrom"]
    assert [ports for ports, peers in rules(docs, "ray-head") if peers == nginx] == \
        [frozenset(GATEWAY)]


def test_security_table_prints_the_rules_and_contexts_of_every_scenario():
    proc = subprocess.run([sys.executable, str(REPO / "helm" / "tools" / "security_table.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "| ray-head | in | 8265/TCP,52365/TCP | ns kubernetes.io/metadata.name=kuberay-system" \
        " & pods app.kubernetes.io/name=kuberay-operator | all |" in out
    assert "| ray-head+ray-worker | in | all | release ray-head+ray-worker | all |" in out
    network = [line.split(" | ") for line in out.split("securityContext")[0].splitlines()
               if line.startswith("| ray-") or line.startswith("| database")]
    # Open to every source: the public API port only (it needs a tenant key).
    assert {row[2] for row in network if row[3] == "ANY"} == {"8000/TCP"}
    assert "ns ANY" not in out and "pods ANY" not in out
    for name in ("ray-head", "ray-worker[gpu]", "postgresql", "autoscaler"):
        assert f"| {name} | " in out
    assert " | True | False | drop ALL | RuntimeDefault | True | " in out


# --- security contexts ---------------------------------------------------------------------------

def pods_and_containers(docs) -> list[tuple[str, dict, dict]]:
    """(name, pod spec, container) of every container the rendered objects run, KubeRay's
    autoscaler sidecar included (its container is built from autoscalerOptions)."""
    out = []
    cluster = ray_cluster(docs)
    head = cluster["headGroupSpec"]["template"]["spec"]
    out.append(("ray-head", head, container(cluster["headGroupSpec"]["template"])))
    if cluster["enableInTreeAutoscaling"]:
        out.append(("autoscaler", head, cluster["autoscalerOptions"]))
    for group in cluster["workerGroupSpecs"]:
        out.append((f"worker {group['groupName']}", group["template"]["spec"],
                    container(group["template"])))
    for sts in objects(docs, "StatefulSet"):
        spec = sts["spec"]["template"]["spec"]
        out.append(("postgresql", spec, container(sts["spec"]["template"])))
    return out


def effective_context(pod: dict, c: dict) -> dict:
    return {**pod.get("securityContext", {}), **c.get("securityContext", {})}


def writable_mounts(pod: dict, c: dict) -> dict[str, dict]:
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: vols.get(m["name"], {}) for m in c.get("volumeMounts", [])
            if not m.get("readOnly")}


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_should_run_every_container_non_root_without_privileges_when_rendered(scenario):
    docs = docs_of(scenario)
    found = pods_and_containers(docs)
    names = [n for n, _, _ in found]
    assert "ray-head" in names and ("postgresql" in names) == bool(objects(docs, "StatefulSet"))
    for name, pod, c in found:
        ctx = effective_context(pod, c)
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0, name
        assert ctx["allowPrivilegeEscalation"] is False, name
        assert ctx["capabilities"] == {"drop": ["ALL"]}, name
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert ctx["readOnlyRootFilesystem"] is True, name
        mounts = writable_mounts(pod, c)
        # What the processes write goes to emptyDirs (or the data volume), never the image.
        need = ["/tmp", "/var/run/postgresql"] if name == "postgresql" else ["/tmp"]
        for path in need:
            assert "emptyDir" in mounts[path], (name, path)
    for name, pod, c in found:
        if name.startswith(("ray-head", "worker")):
            assert pod["securityContext"]["runAsUser"] == 1000
            assert pod["securityContext"]["fsGroup"] == 100
            assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


@pytest.mark.parametrize("scenario", [None, *SCENARIOS])
def test_should_point_home_at_tmp_and_refuse_media_redirects_in_every_ray_container(scenario):
    for name, pod, c in pods_and_containers(docs_of(scenario)):
        if name == "postgresql":
            continue
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env["HOME"] == "/tmp", name  # vLLM, Triton, Hugging Face caches: writable
        if name != "autoscaler":
            assert env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0", name


def test_should_keep_the_other_hardening_when_one_security_context_field_is_overridden():
    docs = render(sets=("securityContext.readOnlyRootFilesystem=false",
                        "securityContext.capabilities.add[0]=IPC_LOCK"))
    c = container(ray_cluster(docs)["headGroupSpec"]["template"])
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert "HOME" not in {e["name"] for e in c["env"]}  # the image's /home/ray is writable


def test_should_mount_a_host_path_cache_read_only_as_an_existing_directory_when_host_path_is_set():
    docs = render(sets=("modelCache.hostPath=/mnt/nvme/models",))
    for name, pod, c in pods_and_containers(docs):
        if name == "postgresql":
            continue
        vol = {v["name"]: v for v in pod["volumes"]}["model-cache"]
        assert vol["hostPath"] == {"path": "/mnt/nvme/models", "type": "Directory"}
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "model-cache"]
        assert mount["readOnly"] is True, name


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
    # Direct ingress: forward to the head pod whose gateways serve (the Service's workers have
    # no `serve` port to forward to).
    assert "Ingress: direct" in notes
    assert "app.kubernetes.io/component=ray-head,ray.io/serve=true | head -n 1) 8000:8000" in notes
    assert "networkPolicy.enabled is false" not in notes
    proc = run_helm("install", "moestack", str(CHART), "--namespace", "llm", "--dry-run=client",
                    "--set", "kuberay.checkCRDs=false", "--set", "insecureNoNetworkPolicy=true",
                    "--set", "networkPolicy.enabled=false")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: networkPolicy.enabled is false" in proc.stdout.split("NOTES:", 1)[1]


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


@pytest.mark.parametrize("sets", [(), PROXY_INGRESS,
                                  ("moestack.ray.serve_throughput_optimized=false",)])
def test_every_ray_pod_runs_serve_with_the_env_moestack_up_sets(sets, monkeypatch):
    """Ray Serve's environment on every Ray pod is what `moestack up` gives its own Ray for
    the same config (serve_env, the HTTP servers' header limits): one Serve configuration."""
    from moestack.serve.http_limits import PROXY_CALLBACK_ENV
    from moestack.serve.runner import serve_env

    docs = render(sets=sets)
    monkeypatch.setenv("MOESTACK_DATABASE_URL", "postgresql+psycopg2://u:p@db:5432/moestack")
    config = parse_config(rendered_moestack_config(docs))
    for pod in [ray_cluster(docs)["headGroupSpec"]["template"],
                *(g["template"] for g in ray_cluster(docs)["workerGroupSpecs"])]:
        env = {e["name"]: e.get("value") for e in container(pod)["env"]}
        assert {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")} == \
            serve_env(config) | PROXY_CALLBACK_ENV


@pytest.mark.parametrize("optimized", [True, False])
def test_every_ray_pod_runs_serve_with_the_throughput_env_moestack_up_uses(optimized):
    from moestack.serve.runner import THROUGHPUT_ENV

    docs = render(sets=() if optimized else ("moestack.ray.serve_throughput_optimized=false",))
    pods = [ray_cluster(docs)["headGroupSpec"]["template"],
            *(g["template"] for g in ray_cluster(docs)["workerGroupSpecs"])]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in container(pod)["env"]}
        serve_env = {k: v for k, v in env.items() if k in THROUGHPUT_ENV}
        assert serve_env == (THROUGHPUT_ENV if optimized else {})


OVERFLOW_PEERS = [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
OVERFLOW_SECRETS = [{"env": "OPENAI_API_KEY", "existingSecret": "overflow-keys", "key": "openai"}]
OVERFLOW_CONFIG = {
    "providers": [{"name": "oai", "kind": "openai", "base_url": "https://api.openai.com/v1",
                   "api_key_env": "OPENAI_API_KEY", "model": "gpt-5.4"}],
    "rules": [{"model": "mixtral-8x7b-instruct", "provider": "oai", "max_queue_wait_ms": 2000}]}


def test_should_open_egress_to_overflow_providers_only_when_overflow_rules_are_set(tmp_path):
    chart_part = {"overflow": {"egressTo": OVERFLOW_PEERS, "providerSecrets": OVERFLOW_SECRETS}}
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    off = render((write_values(tmp_path / "off", chart_part),))
    assert all(peers != OVERFLOW_PEERS for _, peers in rules(off, "ray-head", "egress"))
    docs = render((write_values(tmp_path / "on", {**chart_part,
                                                  "moestack": {"overflow": OVERFLOW_CONFIG}}),))
    assert (frozenset({443}), OVERFLOW_PEERS) in rules(docs, "ray-head", "egress")
    assert all(peers != OVERFLOW_PEERS for _, peers in rules(docs, "ray-worker", "egress"))
    # The key reaches the gateways' environment from its Secret; the config names the variable.
    env = ray_cluster(docs)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "overflow-keys", "key": "openai"}}} in env
    assert rendered_moestack_config(docs)["overflow"]["providers"][0]["api_key_env"] == \
        "OPENAI_API_KEY"


def test_should_refuse_overflow_rules_without_egress_to_the_providers(tmp_path):
    values = write_values(tmp_path, {"moestack": {"overflow": OVERFLOW_CONFIG}})
    proc = run_helm(*template_args((values,)))
    assert proc.returncode != 0 and "overflow.egressTo" in proc.stderr
