"""Provision moestack's Grafana dashboards (``monitoring/grafana/dashboards/*.json``) into a
Grafana server through its HTTP API, with ``grafana-client``.

The dashboards use a ``datasource`` variable (any Prometheus data source) and read the recording
rules of ``monitoring/prometheus/rules/``; load those into the Prometheus first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moestack.errors import ConfigError

FOLDER_UID = "moestack"


@dataclass(frozen=True)
class ProvisionedDashboard:
    uid: str
    title: str
    url: str


def load_dashboards(folder: Path) -> list[dict]:
    """The dashboard JSON models in ``folder``, sorted by file name."""
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise ConfigError(f"no dashboard JSON files in {folder}")
    return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def provision(grafana_url: str, dashboards: list[dict], *, credential=None,
              folder_title: str = "moestack",
              timeout_s: float = 10.0) -> list[ProvisionedDashboard]:
    """Create the folder if needed and create or overwrite each dashboard in it.

    ``credential``: an API token (str) or a ``(user, password)`` tuple, as grafana-client takes.
    """
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(grafana_url, credential=credential, timeout=timeout_s)
    try:
        api.folder.get_folder(FOLDER_UID)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise
        api.folder.create_folder(folder_title, uid=FOLDER_UID)
    out = []
    for dashboard in dashboards:
        body = {**dashboard, "id": None}
        res = api.dashboard.update_dashboard(
            {"dashboard": body, "folderUid": FOLDER_UID, "overwrite": True,
             "message": "provisioned by moestack"})
        out.append(ProvisionedDashboard(dashboard["uid"], dashboard["title"], res.get("url", "")))
    return out
