"""Print what the chart opens and how it runs its containers, for every values scenario.

Renders the chart (default values and every `ci/*-values.yaml`) with a real Helm and prints
two Markdown tables: the NetworkPolicy rules (which pods, ingress or egress, which ports, which
peers) and the effective security context of every container (pod context merged with the
container's). A row that holds for several scenarios is printed once, with the scenarios it
holds for ("all" when every one).

    .venv/bin/python helm/tools/security_table.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from moestack.testing.helm import helm_binary

HERE = Path(__file__).resolve().parent
CHART = HERE.parent / "moestack"
COMPONENTS = ("ray-head", "ray-worker", "database")



def render(values: Path | None) -> list[dict]:
    tmp = os.environ.get("TMPDIR", "/tmp")
    env = {**os.environ, "HELM_CACHE_HOME": f"{tmp}/helm-cache",
           "HELM_CONFIG_HOME": f"{tmp}/helm-config", "HELM_DATA_HOME": f"{tmp}/helm-data"}
    args = [helm_binary(), "template", "moestack", str(CHART), "--namespace", "llm",
            "--kube-version", "1.30.0", "--api-versions", "ray.io/v1/RayService"]
    if values is not None:
        args += ["-f", str(values)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"helm template {values or ''} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def selected(selector: dict) -> tuple[str, ...]:
    """Components of the release's pods a podSelector of this release selects."""
    labels = selector.get("matchLabels", {})
    comps = set(COMPONENTS)
    if "app.kubernetes.io/component" in labels:
        comps &= {labels["app.kubernetes.io/component"]}
    for expr in selector.get("matchExpressions", []):
        if expr["key"] == "app.kubernetes.io/component" and expr["operator"] == "In":
            comps &= set(expr["values"])
    return tuple(c for c in COMPONENTS if c in comps)


def describe_peer(peer: dict) -> str:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        return f"ip {block['cidr']}" + "".join(f" except {e}" for e in block.get("except", []))
    parts = []
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"]
        parts.append("ns " + (",".join(f"{k}={v}" for k, v in ns.get("matchLabels", {}).items())
                              or "ANY"))
    if "podSelector" in peer:
        pod = peer["podSelector"]
        labels = pod.get("matchLabels", {})
        if labels.get("app.kubernetes.io/instance") == "moestack" and "namespaceSelector" \
                not in peer:
            parts.append("release " + "+".join(selected(pod)))
        else:
            parts.append("pods " + (",".join(f"{k}={v}" for k, v in labels.items()) or "ANY"))
    return " & ".join(parts)


def describe_ports(ports: list[dict] | None) -> str:
    if not ports:
        return "all"
    return ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in ports)


def network_rows(docs: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        pods = "+".join(selected(spec["podSelector"]))
        for direction, key, peers_key in (("in", "ingress", "from"), ("out", "egress", "to")):
            if direction == "in" and "Ingress" not in spec["policyTypes"]:
                continue
            if direction == "out" and "Egress" not in spec["policyTypes"]:
                continue
            rules = spec.get(key) or []
            if not rules:
                rows.append((pods, direction, "-", "nothing"))
            for rule in rules:
                peers = rule.get(peers_key)
                who = "; ".join(describe_peer(p) for p in peers) if peers else "ANY"
                rows.append((pods, direction, describe_ports(rule.get("ports")), who))
    return rows


def containers(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(name, pod securityContext, container securityContext) of every container."""
    out = []
    for rs in (d for d in docs if d["kind"] == "RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]["template"]["spec"]
        for c in head["containers"]:
            out.append((c["name"], head.get("securityContext", {}), c.get("securityContext", {})))
        if cluster.get("enableInTreeAutoscaling"):
            out.append(("autoscaler", head.get("securityContext", {}),
                        cluster.get("autoscalerOptions", {}).get("securityContext", {})))
        for group in cluster.get("workerGroupSpecs", []):
            spec = group["template"]["spec"]
            for c in spec["containers"]:
                out.append((f"{c['name']}[{group['groupName']}]",
                            spec.get("securityContext", {}), c.get("securityContext", {})))
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        spec = sts["spec"]["template"]["spec"]
        for c in spec["containers"]:
            out.append((c["name"], spec.get("securityContext", {}), c.get("securityContext", {})))
    return out


def context_row(name: str, pod: dict, ctr: dict) -> tuple[str, ...]:
    eff = {**pod, **ctr}
    caps = eff.get("capabilities", {})
    return (name, f"{eff.get('runAsUser', '-')}:{eff.get('runAsGroup', '-')}",
            str(pod.get("fsGroup", "-")), str(eff.get("runAsNonRoot", "-")),
            str(eff.get("allowPrivilegeEscalation", "-")),
            "drop " + ",".join(caps.get("drop", [])) + "".join(
                f" add {c}" for c in caps.get("add", [])),
            eff.get("seccompProfile", {}).get("type", "-"),
            str(eff.get("readOnlyRootFilesystem", "-")))


def grouped(per_scenario: dict[str, list[tuple[str, ...]]]) -> list[tuple[tuple[str, ...], str]]:
    """Each distinct row once, with the scenarios it appears in."""
    order: list[tuple[str, ...]] = []
    where: dict[tuple[str, ...], list[str]] = {}
    for scenario, rows in per_scenario.items():
        for row in rows:
            if row not in where:
                order.append(row)
                where[row] = []
            if scenario not in where[row]:
                where[row].append(scenario)
    names = list(per_scenario)

    def scenarios(found: list[str]) -> str:
        missing = [n for n in names if n not in found]
        if not missing:
            return "all"
        return "all but " + ", ".join(missing) if len(missing) <= 2 else ", ".join(found)

    return [(row, scenarios(where[row])) for row in order]


def table(header: tuple[str, ...], rows: list[tuple[tuple[str, ...], str]]) -> str:
    lines = ["| " + " | ".join((*header, "scenarios")) + " |",
             "|" + "---|" * (len(header) + 1)]
    lines += ["| " + " | ".join((*row, where)) + " |" for row, where in rows]
    return "\n".join(lines)


def scenario_name(path: Path | None) -> str:
    return "default" if path is None else path.name.removesuffix("-values.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    scenarios = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
    network, contexts = {}, {}
    for path in scenarios:
        docs = render(path)
        network[scenario_name(path)] = network_rows(docs)
        contexts[scenario_name(path)] = [context_row(*c) for c in containers(docs)]
    print("NetworkPolicy rules (pods the policy selects, direction, ports, peers):\n")
    print(table(("pods", "dir", "ports", "peers"), grouped(network)))
    print("\nEffective securityContext per container (pod context merged with the container's):\n")
    print(table(("container", "uid:gid", "fsGroup", "nonRoot", "privEsc", "capabilities",
                 "seccomp", "roRootFS"), grouped(contexts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
