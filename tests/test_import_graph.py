"""The project's modules import each other without cycles, and the vLLM backend without the HF backend's code.

The graph is read from the source (like tests/test_dag.py): one node per module of offline_opd and
opd_kernels, one edge per import of another of them, at module level or inside a function (a lazy import
is still a dependency: a cycle through one only moves the failure to the first call). `from pkg import
name` counts as importing the module pkg.name when that is a module, else pkg itself. A package's
__init__, which Python runs before any of its submodules, is not counted as imported by them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.tiny_models import REPO

ROOTS = {"offline_opd": REPO / "pipeline", "opd_kernels": REPO / "kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in (tree.body if top_level_only else ast.walk(tree)):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in mods:
                        deps.add(target)
                    elif base in mods:
                        deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def test_the_graph_sees_the_imports():
    """Not vacuous: known edges, relative ones included, are in the graph, and a planted cycle is found."""
    graph = import_graph(top_level_only=False)
    assert {"offline_opd.backends.base", "offline_opd.backends.generation"} <= graph["offline_opd.backends.hf"]
    assert "opd_kernels.inputs" in graph["opd_kernels.reference"]              # from .inputs import ...
    assert "opd_kernels.triton_sparse" in graph["opd_kernels"]                 # a lazy import
    assert "opd_kernels.triton_sparse" not in import_graph(top_level_only=True)["opd_kernels"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    for top_level_only in (True, False):
        cycle = find_cycle(import_graph(top_level_only))
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_vllm_backend_imports_no_hf_backend_code():
    """Both backends build on the neutral records of backends/base.py; neither imports the other, nor the
    factory that names them."""
    graph = import_graph(top_level_only=False)
    hf_only = {"offline_opd.backends.hf", "offline_opd.backends.generation", "offline_opd.backends.scoring"}
    assert closure(graph, "offline_opd.backends.vllm_backend") & (hf_only | {"offline_opd.backends.engine"}) == set()
    assert "offline_opd.backends.vllm_backend" not in closure(graph, "offline_opd.backends.hf")
    assert "offline_opd.backends.engine" not in closure(graph, "offline_opd.backends.hf")


def imported_names(source: str) -> set[str]:
    """Every module an absolute import statement of `source` names (`from a import b`: a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def stage_imports(source: str) -> set[str]:
    """The stage modules `source` imports (`offline_opd.stages.<name>`, however spelt)."""
    return {n for n in imported_names(source) if n.startswith("offline_opd.stages.")}


def test_nothing_outside_stages_imports_a_stage():
    """Stages are entry points, not libraries: what a tool or benchmark needs of one lives in the library.
    (Benchmarks run a stage by name through `runtime.run_stage`, as `python -m` would.)"""
    assert stage_imports("from offline_opd.stages import distill\nimport offline_opd.stages.sft as s\n"
                         "def f():\n    from offline_opd.stages.distill import check\n") == {
        "offline_opd.stages.distill", "offline_opd.stages.sft", "offline_opd.stages.distill.check"}
    stages, graph = ROOTS["offline_opd"] / "offline_opd" / "stages", import_graph(top_level_only=False)
    relative = [name for name, path in modules().items()      # relative imports too
                if stages not in path.parents and any(dep.startswith("offline_opd.stages") for dep in graph[name])]
    files = [p for p in (REPO / "bench").rglob("*.py") if stage_imports(p.read_text())]
    files += [p for root in ROOTS.values() for p in root.rglob("*.py")
              if stages not in p.parents and stage_imports(p.read_text())]
    assert relative == [] and files == [], f"import a stage module: {relative + [str(p) for p in files]}"


def test_bench_does_not_import_tests():
    """Benchmarks are scripts over the library: what they share with the tests (toy models, scratch DVC
    projects) lives in offline_opd, which both import."""
    assert {n for n in imported_names("def f():\n    from tests.tiny_models import save_model\n")
            if n.split(".")[0] == "tests"} == {"tests.tiny_models", "tests.tiny_models.save_model"}
    found = {str(p): sorted(n for n in imported_names(p.read_text()) if n.split(".")[0] == "tests")
             for p in (REPO / "bench").rglob("*.py")}
    assert {p: names for p, names in found.items() if names} == {}


def test_only_the_scratch_teacher_builds_toy_models():
    """The character tokenizer and toy Llamas (models/toy.py) are the toy path's: generic code (loading,
    backends, training, the other stages) never imports them, so a real model's path cannot depend on them."""
    graph = import_graph(top_level_only=False)
    assert {"offline_opd.models.loading"} <= graph["offline_opd.models.toy"]     # the edge the test looks for
    assert {name for name, deps in graph.items() if "offline_opd.models.toy" in deps} == {"offline_opd.train.scratch_teacher"}


def test_stages_do_not_import_each_other():
    """What two stages share (teacher_topk's and sft_topk's scoring) lives in the library, so a stage's dvc.yaml
    deps never include another stage's entry point."""
    graph = import_graph(top_level_only=False)
    stages = {name for name in graph if name.startswith("offline_opd.stages.")}
    assert {(s, d) for s in stages for d in graph[s] & stages} == set()
