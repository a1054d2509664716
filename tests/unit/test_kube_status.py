"""`moestack k8s status` against recorded API server answers (tests/data/kube/).

The kubernetes client talks HTTP to a small server on 127.0.0.1 that answers the recorded JSON
for the paths the real API server serves, filtering pods by the request's labelSelector.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s

from moestack.cli import build_parser
from moestack.cli.k8s import run_status
from moestack.kube import KubeError, build_report, fetch_report, format_report

DATA = Path(__file__).resolve().parents[1] / "data" / "kube"
CRDS = Path(__file__).resolve().parents[1] / "data" / "helm" / "kuberay-crds"
RS_PATH = "/apis/ray.io/v1/namespaces/llm/rayservices/moestack"
PODS_PATH = "/api/v1/namespaces/llm/pods"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


class FakeApiServer:
    """Serves recorded answers; remembers the requests it got."""

    def __init__(self, rayservice: str, pods: str):
        self.rayservice, self.pods, self.requests = load(rayservice), load(pods), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                url = urlparse(self.path)
                outer.requests.append(self.path)
                if url.path == RS_PATH:
                    status, body = 200, outer.rayservice
                elif url.path == PODS_PATH:
                    selector = parse_qs(url.query).get("labelSelector", [""])[0]
                    key, _, value = selector.partition("=")
                    items = [p for p in outer.pods["items"]
                             if not key or p["metadata"]["labels"].get(key) == value]
                    status, body = 200, {**outer.pods, "items": items}
                else:  # the API server's answer for a missing object, for the name asked
                    status, body = 404, load("rayservice-not-found.json")
                    name = url.path.rsplit("/", 1)[-1]
                    body["message"] = f'rayservices.ray.io "{name}" not found'
                    body["details"]["name"] = name
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def client(self) -> k8s.ApiClient:
        conf = k8s.Configuration()
        conf.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return k8s.ApiClient(conf)


def report_of(rayservice: str, pods: str):
    with FakeApiServer(rayservice, pods) as server:
        return fetch_report("llm", "moestack", client=server.client()), server.requests


def test_reports_a_running_service_with_its_workers_gpus_and_healthy_app():
    report, requests = report_of("rayservice-running.json", "pods-running.json")
    assert report.healthy and report.ready and report.service_status == "Running"
    assert report.pending is None and not report.upgrade_in_progress
    active = report.active
    assert active.name == "moestack-raycluster-7xk2p" and active.state == "ready"
    assert (active.ready_workers, active.desired_workers) == (2, 2)
    assert (active.ready_gpus, active.desired_gpus) == (16, 16)
    assert [p.node_type for p in active.pods] == ["head", "worker", "worker"]
    (app,) = active.applications
    assert app.name == "moestack" and app.status == "RUNNING"
    assert {d.name: d.status for d in app.deployments} == {
        "Gateway": "HEALTHY", "ModelServer:deepseek-v3": "HEALTHY"}
    pod_queries = [parse_qs(urlparse(r).query) for r in requests if r.startswith(PODS_PATH)]
    assert pod_queries == [{"labelSelector": ["ray.io/cluster=moestack-raycluster-7xk2p"]}]


def test_reports_both_clusters_during_an_upgrade():
    report, requests = report_of("rayservice-upgrading.json", "pods-upgrading.json")
    assert report.upgrade_in_progress and report.healthy  # the active cluster still serves
    assert {p.cluster for p in report.active.pods} == {"moestack-raycluster-7xk2p"}
    pending = report.pending
    assert pending.name == "moestack-raycluster-q9wz4"
    assert not pending.applications[0].healthy
    assert pending.ready_gpus == 8  # one of its two 8-GPU workers is not ready yet
    assert len([r for r in requests if r.startswith(PODS_PATH)]) == 2
    text = format_report(report)
    assert "upgrade in progress" in text and "pending cluster moestack-raycluster-q9wz4" in text
    assert "ModelServer:deepseek-v3: UPDATING" in text


def test_reports_why_a_service_is_not_ready():
    report, _ = report_of("rayservice-not-ready.json", "pods-not-ready.json")
    assert not report.ready and not report.healthy and report.service_status == "NotReady"
    assert report.active.ready_gpus == 8 and report.active.desired_gpus == 16
    unscheduled = [p for p in report.active.pods if p.reason == "Unschedulable"]
    assert len(unscheduled) == 1 and unscheduled[0].node is None
    text = format_report(report)
    assert "app moestack: DEPLOY_FAILED (Deploying application moestack failed)" in text
    assert "Pending Unschedulable" in text


def test_missing_rayservice_is_a_kube_error_with_the_api_message():
    with FakeApiServer("rayservice-running.json", "pods-running.json") as server:
        with pytest.raises(KubeError, match=r'rayservices.ray.io "other" not found \(HTTP 404\)'):
            fetch_report("llm", "other", client=server.client())


def test_unreachable_api_is_a_kube_error():
    conf = k8s.Configuration()
    conf.host = "http://127.0.0.1:9"  # discard port: nothing listens
    conf.retries = 0
    with pytest.raises(KubeError, match="cannot reach the Kubernetes API"):
        fetch_report("llm", "moestack", client=k8s.ApiClient(conf))


def test_status_without_any_cluster_yet_is_not_healthy():
    rs = load("rayservice-running.json")
    rs["status"] = {}
    report = build_report(rs, [])
    assert report.active is None and not report.healthy
    assert "no active cluster yet" in format_report(report)


@pytest.mark.parametrize(("fixture", "pods", "code"), [
    ("rayservice-running.json", "pods-running.json", 0),
    ("rayservice-not-ready.json", "pods-not-ready.json", 1),
])
def test_cli_exit_code_says_whether_the_service_is_healthy(fixture, pods, code, capsys):
    args = build_parser().parse_args(["k8s", "status", "-n", "llm", "--json"])
    with FakeApiServer(fixture, pods) as server:
        assert run_status(args, client=server.client()) == code
    out = json.loads(capsys.readouterr().out)
    assert out["healthy"] is (code == 0) and out["namespace"] == "llm"


def test_cli_reports_a_missing_service_on_stderr_with_exit_code_2(capsys):
    args = argparse.Namespace(namespace="llm", name="other", json=False, context=None,
                              kubeconfig=None)
    with FakeApiServer("rayservice-running.json", "pods-running.json") as server:
        assert run_status(args, client=server.client()) == 2
    assert "not found" in capsys.readouterr().err


@functools.cache
def rayservice_schema() -> dict:
    with gzip.open(CRDS / "ray.io_rayservices.yaml.gz", "rt", encoding="utf-8") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"][
        "openAPIV3Schema"]


@pytest.mark.parametrize("name", ["rayservice-running.json", "rayservice-upgrading.json",
                                  "rayservice-not-ready.json"])
def test_recorded_rayservices_match_the_kuberay_crd(name):
    jsonschema.Draft7Validator(rayservice_schema()).validate(load(name))


@pytest.mark.parametrize("name", ["pods-running.json", "pods-upgrading.json",
                                  "pods-not-ready.json"])
def test_recorded_pods_are_valid_kubernetes_pods(name):
    for pod in load(name)["items"]:
        kubernetes_validate.validate(pod, "1.30.0", strict=True)
