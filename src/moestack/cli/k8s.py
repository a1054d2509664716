"""``moestack k8s status``: the state of a moestack RayService on Kubernetes (KubeRay)."""

from __future__ import annotations

import dataclasses
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("k8s", help="inspect a moestack deployment on Kubernetes")
    sub = p.add_subparsers(dest="k8s_command", required=True)
    s = sub.add_parser("status", help="RayService state, workers, GPUs and Serve app health; "
                       "exits 0 when healthy, 1 when not, 2 when it cannot tell")
    s.add_argument("--namespace", "-n", default="default", help="namespace of the release")
    s.add_argument("--name", default="moestack", help="RayService name (the chart's full name)")
    s.add_argument("--context", help="kubeconfig context (default: the current one)")
    s.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=run_status)


def run_status(args, client=None) -> int:
    from moestack.kube import KubeError, fetch_report, format_report
    from moestack.kube.client import api_client

    try:
        client = client or api_client(context=args.context, kubeconfig=args.kubeconfig)
        report = fetch_report(args.namespace, args.name, client=client)
    except KubeError as exc:
        print(f"moestack: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**dataclasses.asdict(report), "healthy": report.healthy}, indent=2))
    else:
        print(format_report(report))
    return 0 if report.healthy else 1
