"""The example cluster definitions under cluster/ are valid for the tools that read them."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

from moestack.config import parse_config
from tests.unit.test_helm_chart import KUBE_VERSION, crd_validator

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
CHART_VALUES = CLUSTER.parent / "helm" / "moestack" / "values.yaml"


def dev_cluster_docs() -> list[dict]:
    text = (CLUSTER / "kuberay" / "raycluster-dev.yaml").read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d]


def launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "vm" / "ray-cluster-aws-h100.yaml").read_text())


def test_dev_raycluster_is_valid_against_the_kuberay_crd():
    (cluster,) = [d for d in dev_cluster_docs() if d["kind"] == "RayCluster"]
    crd_validator("RayCluster").validate(cluster)
    mounts = {m["mountPath"] for m in
              cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "/etc/moestack" in mounts


def test_dev_cluster_config_map_is_valid_and_holds_a_valid_moestack_config():
    (cm,) = [d for d in dev_cluster_docs() if d["kind"] == "ConfigMap"]
    kubernetes_validate.validate(cm, KUBE_VERSION, strict=True)
    config = parse_config(yaml.safe_load(cm["data"]["moestack.yaml"]), source="raycluster-dev")
    assert config.models[0].accelerator == "cpu" and config.gateway.host == "0.0.0.0"


def test_vm_launcher_config_passes_ray_cluster_config_validation():
    config = launcher_config()
    validate_config(fillout_defaults(copy.deepcopy(config)))
    h100 = config["available_node_types"]["h100"]
    assert h100["resources"]["GPU"] == 8 and h100["min_workers"] == 2


def test_vm_launcher_validation_rejects_a_misspelled_field():
    config = launcher_config()
    config["available_node_types"]["h100"]["min_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(fillout_defaults(config))


def test_image_runs_as_the_non_root_user_the_chart_expects():
    text = (CLUSTER / "docker" / "Dockerfile").read_text(encoding="utf-8")
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    uid, gid = (int(x) for x in users[-1].split(":"))  # numeric: runAsNonRoot can check it
    assert uid != 0
    values = yaml.safe_load(CHART_VALUES.read_text(encoding="utf-8"))
    pod = values["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    assert pod["runAsNonRoot"] is True
    # The base image's passwordless sudo for `ray` is taken away before the last USER.
    assert text.index("/etc/sudoers") < text.rindex("USER ")
