"""What a moestack RayService looks like right now, from KubeRay's status and the Ray pods.

Pure functions over API objects as the API server returns them (JSON dicts): the RayService
(`ray.io/v1`, its `status.activeServiceStatus` / `pendingServiceStatus` written by KubeRay) and
the pods of its Ray clusters (labels `ray.io/cluster`, `ray.io/node-type`, `ray.io/group`,
`ray.io/serve`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

RUNNING_APP = "RUNNING"
HEALTHY_DEPLOYMENT = "HEALTHY"


@dataclass(frozen=True)
class DeploymentHealth:
    name: str
    status: str
    message: str = ""


@dataclass(frozen=True)
class AppHealth:
    """One Serve application of a cluster, as KubeRay last read it from the Ray dashboard."""

    name: str
    status: str
    message: str = ""
    deployments: tuple[DeploymentHealth, ...] = ()

    @property
    def healthy(self) -> bool:
        return self.status == RUNNING_APP and all(
            d.status == HEALTHY_DEPLOYMENT for d in self.deployments)


@dataclass(frozen=True)
class PodInfo:
    """One Ray pod: head or worker of a group."""

    name: str
    cluster: str
    node_type: str
    group: str
    phase: str
    ready: bool
    gpus: int
    node: str | None
    serving: bool
    reason: str = ""


@dataclass(frozen=True)
class ClusterInfo:
    """A Ray cluster of the service (active, or pending during an upgrade)."""

    name: str
    state: str
    desired_gpus: int
    desired_workers: int
    ready_workers: int
    applications: tuple[AppHealth, ...] = ()
    pods: tuple[PodInfo, ...] = ()

    @property
    def ready_gpus(self) -> int:
        return sum(p.gpus for p in self.pods if p.ready)


@dataclass(frozen=True)
class ServiceReport:
    name: str
    namespace: str
    service_status: str
    ready: bool
    upgrade_in_progress: bool
    serve_endpoints: int
    active: ClusterInfo | None
    pending: ClusterInfo | None
    conditions: tuple[tuple[str, str, str], ...] = field(default=())

    @property
    def healthy(self) -> bool:
        """Ready, and every application of the active cluster running with healthy deployments."""
        return (self.ready and self.active is not None and bool(self.active.applications)
                and all(a.healthy for a in self.active.applications))


def gpu_count(pod: dict) -> int:
    """GPUs the pod's containers ask for (any `*/gpu` extended resource, limits first)."""
    total = 0
    for c in pod.get("spec", {}).get("containers", []):
        res = c.get("resources", {})
        amounts = res.get("limits") or res.get("requests") or {}
        total += sum(int(str(v)) for k, v in amounts.items() if k.endswith("/gpu"))
    return total


def pod_info(pod: dict) -> PodInfo:
    meta, status = pod["metadata"], pod.get("status", {})
    labels = meta.get("labels", {})
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    ready = conditions.get("Ready", {}).get("status") == "True"
    reason = ""
    if not ready:
        scheduled = conditions.get("PodScheduled", {})
        if scheduled.get("status") == "False":
            reason = scheduled.get("reason", "")
        for cs in status.get("containerStatuses", []):
            waiting = cs.get("state", {}).get("waiting")
            if waiting:
                reason = waiting.get("reason", reason)
    return PodInfo(
        name=meta["name"], cluster=labels.get("ray.io/cluster", ""),
        node_type=labels.get("ray.io/node-type", "?"), group=labels.get("ray.io/group", "?"),
        phase=status.get("phase", "Unknown"), ready=ready, gpus=gpu_count(pod),
        node=pod.get("spec", {}).get("nodeName"),
        serving=labels.get("ray.io/serve") == "true", reason=reason)


def _quantity_int(value) -> int:
    """`desiredGPU` and friends are resource quantities ("16", "0", "1500m")."""
    if value in (None, ""):
        return 0
    text = str(value)
    return int(text[:-1]) // 1000 if text.endswith("m") else int(float(text))


def _applications(statuses: dict) -> tuple[AppHealth, ...]:
    apps = []
    for name, app in sorted((statuses or {}).items()):
        deployments = tuple(
            DeploymentHealth(d_name, d.get("status", "UNKNOWN"), d.get("message", ""))
            for d_name, d in sorted(app.get("serveDeploymentStatuses", {}).items()))
        apps.append(AppHealth(name, app.get("status", "UNKNOWN"), app.get("message", ""),
                              deployments))
    return tuple(apps)


def _cluster(service_status: dict | None, pods: list[PodInfo]) -> ClusterInfo | None:
    if not service_status or not service_status.get("rayClusterName"):
        return None
    name = service_status["rayClusterName"]
    rc = service_status.get("rayClusterStatus", {})
    return ClusterInfo(
        name=name, state=rc.get("state", "") or rc.get("reason", ""),
        desired_gpus=_quantity_int(rc.get("desiredGPU")),
        desired_workers=int(rc.get("desiredWorkerReplicas", 0)),
        ready_workers=int(rc.get("readyWorkerReplicas", 0)),
        applications=_applications(service_status.get("applicationStatuses", {})),
        pods=tuple(sorted((p for p in pods if p.cluster == name),
                          key=lambda p: (p.node_type != "head", p.group, p.name))))


def build_report(rayservice: dict, pods: list[dict]) -> ServiceReport:
    """The report of a RayService object and the pods of its clusters (API JSON)."""
    meta, status = rayservice["metadata"], rayservice.get("status", {}) or {}
    infos = [pod_info(p) for p in pods]
    conditions = {c["type"]: c for c in status.get("conditions", [])}
    ready = conditions.get("Ready", {}).get("status") == "True"
    return ServiceReport(
        name=meta["name"], namespace=meta.get("namespace", ""),
        service_status=status.get("serviceStatus") or ("Running" if ready else "NotReady"),
        ready=ready,
        upgrade_in_progress=conditions.get("UpgradeInProgress", {}).get("status") == "True",
        serve_endpoints=int(status.get("numServeEndpoints", 0)),
        active=_cluster(status.get("activeServiceStatus"), infos),
        pending=_cluster(status.get("pendingServiceStatus"), infos),
        conditions=tuple((c["type"], c.get("status", ""), c.get("reason", ""))
                         for c in status.get("conditions", [])))


def _format_cluster(role: str, cluster: ClusterInfo) -> list[str]:
    lines = [f"{role} cluster {cluster.name}: {cluster.state or 'unknown'}, workers "
             f"{cluster.ready_workers}/{cluster.desired_workers} ready, GPUs "
             f"{cluster.ready_gpus}/{cluster.desired_gpus} ready"]
    for app in cluster.applications:
        mark = "ok" if app.healthy else "!!"
        lines.append(f"  [{mark}] app {app.name}: {app.status}"
                     + (f" ({app.message})" if app.message else ""))
        for d in app.deployments:
            detail = f" ({d.message})" if d.message else ""
            lines.append(f"         {d.name}: {d.status}{detail}")
    if not cluster.applications:
        lines.append("  [!!] no Serve application reported yet")
    for p in cluster.pods:
        state = "ready" if p.ready else f"{p.phase}{' ' + p.reason if p.reason else ''}"
        where = f" on {p.node}" if p.node else ""
        lines.append(f"  pod {p.name} ({p.node_type}/{p.group}, {p.gpus} GPU): {state}{where}"
                     + (", serving" if p.serving else ""))
    return lines


def format_report(report: ServiceReport) -> str:
    """Human-readable lines for `moestack k8s status`."""
    lines = [f"RayService {report.namespace}/{report.name}: {report.service_status}"
             f" ({'healthy' if report.healthy else 'not healthy'}), "
             f"{report.serve_endpoints} serve endpoint(s)"
             + (", upgrade in progress" if report.upgrade_in_progress else "")]
    if report.active:
        lines += _format_cluster("active", report.active)
    else:
        lines.append("no active cluster yet")
    if report.pending:
        lines += _format_cluster("pending", report.pending)
    return "\n".join(lines)
