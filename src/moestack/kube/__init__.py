"""Helpers over the Kubernetes API: the state of a moestack RayService (KubeRay)."""

from moestack.kube.client import KubeError, fetch_report
from moestack.kube.status import AppHealth, PodInfo, ServiceReport, build_report, format_report

__all__ = ["AppHealth", "KubeError", "PodInfo", "ServiceReport", "build_report", "fetch_report",
           "format_report"]
