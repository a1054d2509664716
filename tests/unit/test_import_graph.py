"""The package keeps its house: imports run down the floors, and no rooms import each other in
a circle (``scripts/import_graph.py`` draws the graph and names the floors)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph",
                                                  REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_runs_up_a_floor_or_across_peers():
    g = _graph_module()
    _, arrows = g.graph(REPO / "src")
    up = {f"{a} -> {b}": arrows[(a, b)] for a, b in g.arrows_up(arrows)}
    assert up == {}, "imports that run up (move the shared piece down a floor): " + str(up)


def test_no_circle_between_rooms():
    g = _graph_module()
    _, arrows = g.graph(REPO / "src")
    assert g.circles(arrows) == []


def test_every_room_is_on_a_floor():
    g = _graph_module()
    lines, _ = g.graph(REPO / "src")
    for room in lines:
        g.floor_of(room)  # raises naming the room that is on no floor


def test_counts_lazy_imports_and_imports_by_path_string(tmp_path):
    g = _graph_module()
    pkg = tmp_path / "moestack"
    for room in ("config", "engine"):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config" / "schema.py").write_text(
        "def f():\n    from moestack.engine import tiny\n"
        "X = 'moestack.engine.fake:Engine'\nDB = 'moestack.db'\n")
    _, arrows = g.graph(tmp_path)
    assert list(arrows) == [("config", "engine")]
    assert g.arrows_up(arrows) == [("config", "engine")]
