"""The import graph of the ``moestack`` package by room, against the floors the code is built on.

    python scripts/import_graph.py [--src src] [--dot graph.dot]

A room is a sub-package (``tenancy``, ``api``, ...) or a top-level module (``errors``). Every
import counts, at module level or inside a function (a lazy import is still an arrow), as does a
module named in a string (``"moestack.x.y:Class"``, an import by path). Prints each room's share of
the code (lines), the arrows between rooms, the arrows that run up (from a floor to a floor above
it, or to a room of its own floor, which must not know each other), and the circles between
rooms. ``tests/unit/test_import_graph.py`` holds the package to it.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

FLOORS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("cli",),
    ("testing", "loadtest", "kube"),
    ("serve",),
    ("api",),
    ("tenancy", "scheduling", "metering", "routing", "providers", "adapters", "overflow"),
    ("parallel", "engine", "vllm_cpu"),
    ("config",),
    ("hooks",),  # the request context and hook protocol the rooms above share; it uses usage
    ("plotting", "usage", "net", "errors"),
)
"""Top floor first. A room may import rooms on the floors below its own only. Rooms on one floor
are peers: they do not import each other (a type they share lives a floor down)."""

PEERS_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("engine", "parallel"),  # the vLLM engine builds its engine args from the layout plan
    ("testing", "loadtest"),  # test helpers drive the load generator
})
"""Same-floor arrows that are part of the design, each with its reason."""

_PATH_STRING = re.compile(r"^moestack(\.[a-z_]+)+(:[A-Za-z_]+)?$")


def room_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "moestack" or len(parts) < 2:
        return None
    return parts[1]


def floor_of(room: str) -> int:
    for i, floor in enumerate(FLOORS):
        if room in floor:
            return i
    raise KeyError(f"room {room!r} is on no floor: add it to FLOORS in {__file__}")


def module_name(path: Path, src: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> set[str]:
    """Every moestack module ``path`` imports (absolute, relative, lazy or by path string)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _PATH_STRING.match(node.value):
                found.add(node.value.partition(":")[0])
    return {m for m in found if m.startswith("moestack")}


def graph(src: Path) -> tuple[dict[str, int], dict[tuple[str, str], list[str]]]:
    """Lines per room, and the arrows between rooms with the files that draw each."""
    lines: dict[str, int] = defaultdict(int)
    arrows: dict[tuple[str, str], list[str]] = defaultdict(list)
    rooms = {p.stem for p in (src / "moestack").iterdir()
             if p.suffix == ".py" or (p / "__init__.py").exists()}
    for path in sorted((src / "moestack").rglob("*.py")):
        module = module_name(path, src)
        room = room_of(module) or "__init__"
        if room == "__init__":
            continue
        lines[room] += len(path.read_text().splitlines())
        for target in imports_of(path, module):
            other = room_of(target)
            if other in rooms and other != room:  # not a file name such as "moestack.db"
                where = str(path.relative_to(src))
                if where not in arrows[(room, other)]:
                    arrows[(room, other)].append(where)
    return dict(lines), dict(arrows)


def arrows_up(arrows) -> list[tuple[str, str]]:
    bad = []
    for a, b in arrows:
        fa, fb = floor_of(a), floor_of(b)
        if fb < fa or (fb == fa and (a, b) not in PEERS_ALLOWED):
            bad.append((a, b))
    return sorted(bad)


def circles(arrows) -> list[list[str]]:
    """Strongly connected groups of rooms (Tarjan), those of two rooms or more."""
    nodes = sorted({r for edge in arrows for r in edge})
    succ = defaultdict(list)
    for a, b in arrows:
        succ[a].append(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def report(src: Path) -> str:
    lines, arrows = graph(src)
    total = sum(lines.values())
    out = [f"{'room':<12} {'floor':>5} {'lines':>6} {'share':>6}"]
    for room in sorted(lines, key=lambda r: (floor_of(r), -lines[r])):
        out.append(f"{room:<12} {floor_of(room):5d} {lines[room]:6d} {lines[room] / total:6.1%}")
    biggest = max(lines, key=lines.get)
    up = arrows_up(arrows)
    loops = circles(arrows)
    out.append(f"\nrooms {len(lines)}, floors {len(FLOORS)}, arrows {len(arrows)}, "
               f"arrows up {len(up)}, circles {len(loops)}, "
               f"biggest room {biggest} {lines[biggest] / total:.1%} of {total} lines")
    for a, b in up:
        out.append(f"  up: {a} -> {b}  ({', '.join(arrows[(a, b)])})")
    for group in loops:
        out.append(f"  circle: {' <-> '.join(group)}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parent.parent / "src")
    ap.add_argument("--dot", type=Path, help="also write the room graph in Graphviz dot")
    args = ap.parse_args()
    print(report(args.src))
    if args.dot:
        _, arrows = graph(args.src)
        up = set(arrows_up(arrows))
        body = "".join(f'  "{a}" -> "{b}"{" [color=red]" if (a, b) in up else ""};\n'
                       for a, b in sorted(arrows))
        args.dot.write_text(f"digraph moestack {{\n{body}}}\n")


if __name__ == "__main__":
    main()
