"""Read a RayService and its Ray pods with the Kubernetes Python client."""

from __future__ import annotations

import json

from moestack.errors import MoestackError
from moestack.kube.status import ServiceReport, build_report

RAY_GROUP, RAY_VERSION, RAYSERVICES = "ray.io", "v1", "rayservices"


class KubeError(MoestackError):
    """The Kubernetes API could not be read, or the RayService is not there."""

    error_type = "kubernetes_error"


def api_client(context: str | None = None, kubeconfig: str | None = None):
    """An ApiClient from the kubeconfig (or the in-cluster service account)."""
    from kubernetes import client, config

    try:
        if kubeconfig or context or not _in_cluster():
            return config.new_client_from_config(config_file=kubeconfig, context=context)
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException as exc:
        raise KubeError(f"no Kubernetes configuration: {exc}") from exc


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _read(call, what: str, **kwargs) -> dict:
    """Call an API method for raw JSON (the shapes the API server answers)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        resp = call(_preload_content=False, **kwargs)
    except ApiException as exc:
        reason = exc.reason
        try:
            reason = json.loads(exc.body).get("message", reason)
        except (TypeError, ValueError):
            pass
        raise KubeError(f"{what}: {reason} (HTTP {exc.status})", code=str(exc.status)) from exc
    except HTTPError as exc:
        raise KubeError(f"{what}: cannot reach the Kubernetes API ({exc})") from exc
    return json.loads(resp.data)


def fetch_report(namespace: str, name: str, client=None) -> ServiceReport:
    """The state of RayService `namespace/name`: its clusters, Serve apps and Ray pods."""
    from kubernetes import client as k8s

    client = client or api_client()
    rayservice = _read(k8s.CustomObjectsApi(client).get_namespaced_custom_object,
                       f"RayService {namespace}/{name}", group=RAY_GROUP, version=RAY_VERSION,
                       namespace=namespace, plural=RAYSERVICES, name=name)
    status = rayservice.get("status") or {}
    pods: list[dict] = []
    for key in ("activeServiceStatus", "pendingServiceStatus"):
        cluster = (status.get(key) or {}).get("rayClusterName")
        if cluster:
            pod_list = _read(k8s.CoreV1Api(client).list_namespaced_pod,
                             f"pods of Ray cluster {cluster}", namespace=namespace,
                             label_selector=f"ray.io/cluster={cluster}")
            pods += pod_list.get("items", [])
    return build_report(rayservice, pods)
