"""Grafana dashboards: well-formed, only documented metrics and recorded series, provisioned
through grafana-client over HTTP."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from moestack.metering.grafana import FOLDER_UID, load_dashboards, provision

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
DASHBOARDS = MONITORING / "grafana" / "dashboards"


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_three_dashboards_with_unique_uids_and_panel_ids():
    boards = load_dashboards(DASHBOARDS)
    assert {b["uid"] for b in boards} == {"moestack-ops", "moestack-tenants", "moestack-slo"}
    for b in boards:
        ids = [p["id"] for p in b["panels"]]
        assert len(ids) == len(set(ids)), b["uid"]
        assert all(p["targets"] and p["title"] for p in b["panels"])


def test_panels_read_documented_metrics_and_recorded_series_only():
    text = (MONITORING / "METRICS.md").read_text()
    documented = set(re.findall(r"^### `(moestack_[a-z0-9_]+)`", text, re.M))
    documented |= {d.removesuffix("_total") for d in documented}
    recorded = set()
    for f in (MONITORING / "prometheus" / "rules").glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            recorded |= {r["record"] for r in g["rules"] if "record" in r}
    for b in load_dashboards(DASHBOARDS):
        for expr in _exprs(b):
            for name in re.findall(r"\bmoestack_[a-z0-9_]+", expr):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert base in documented or name in documented, (b["uid"], name)
            for name in re.findall(r"\bmoestack:[a-z0-9_:]+", expr):
                assert name in recorded, (b["uid"], name)


def test_ops_dashboard_shows_cost_per_token_vs_baselines_savings_idle_and_utilisation():
    ops = next(b for b in load_dashboards(DASHBOARDS) if b["uid"] == "moestack-ops")
    exprs = " ".join(_exprs(ops))
    for needed in ("self_hosted_usd_per_1m_tokens", "baseline_usd_per_1m_tokens", "savings",
                   "idle_cost", "utilisation", "break_even"):
        assert needed in exprs


class _FakeGrafana(BaseHTTPRequestHandler):
    """The three Grafana HTTP API endpoints provisioning uses, recording what it receives."""

    folders: dict[str, dict] = {}
    dashboards: dict[str, dict] = {}
    auth: list[str] = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.auth.append(self.headers.get("Authorization", ""))
        uid = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/api/folders/") and uid in self.folders:
            return self._send(200, self.folders[uid])
        self._send(404, {"message": "folder not found"})

    def do_POST(self):
        self.auth.append(self.headers.get("Authorization", ""))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/folders":
            self.folders[body["uid"]] = body
            return self._send(200, {"uid": body["uid"], "title": body["title"]})
        if self.path == "/api/dashboards/db":
            if body["folderUid"] not in self.folders:
                return self._send(400, {"message": "folder not found"})
            uid = body["dashboard"]["uid"]
            self.dashboards[uid] = body
            return self._send(200, {"uid": uid, "status": "success", "url": f"/d/{uid}"})
        self._send(404, {"message": "not found"})


@pytest.fixture
def grafana():
    _FakeGrafana.folders, _FakeGrafana.dashboards, _FakeGrafana.auth = {}, {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_provisioning_creates_the_folder_once_and_overwrites_dashboards(grafana):
    boards = load_dashboards(DASHBOARDS)
    done = provision(grafana, boards, credential="secret-token")
    assert [d.url for d in done] == [f"/d/{b['uid']}" for b in boards]
    assert set(_FakeGrafana.folders) == {FOLDER_UID}
    for b in boards:
        sent = _FakeGrafana.dashboards[b["uid"]]
        assert sent["overwrite"] is True and sent["folderUid"] == FOLDER_UID
        assert sent["dashboard"]["panels"] == b["panels"]
    assert set(_FakeGrafana.auth) == {"Bearer secret-token"}
    provision(grafana, boards, credential="secret-token")  # folder exists now: not created again
    assert len(_FakeGrafana.folders) == 1


def test_cli_provisions_dashboards_with_the_token_from_the_environment(grafana, monkeypatch,
                                                                      capsys):
    from moestack.cli import main

    monkeypatch.setenv("GRAFANA_TOKEN", "env-token")
    assert main(["cost", "dashboards", "--grafana-url", grafana,
                 "--dashboards", str(DASHBOARDS)]) == 0
    assert set(_FakeGrafana.dashboards) == {"moestack-ops", "moestack-tenants", "moestack-slo"}
    assert set(_FakeGrafana.auth) == {"Bearer env-token"}
    assert f"{grafana}/d/moestack-ops" in capsys.readouterr().out
