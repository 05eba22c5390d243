"""The house rules, checked from the source: imports point down only, and shared logic lives once.

Layers, bottom to top (README "Layout"): io, config, models, data -> checkpoint -> engine -> the task
packages (never importing each other) -> evaluation -> cli. Every import (also inside functions) of
one package of mae_transfer by another must go to a lower layer; that also rules out circles.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mae_transfer"

LAYER = {
    "__init__": 0,
    "io": 0,
    "config": 1,
    "spec": 1,
    "models": 1,
    "data": 1,
    "checkpoint": 2,
    "engine": 3,
    "pretrain": 4,
    "classification": 4,
    "detection": 4,
    "segmentation": 4,
    "evaluation": 5,
    "cli": 6,
    "__main__": 7,
}


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(path_or_module: str) -> str:
    """The top-level unit of mae_transfer a file or module belongs to (``detection``, ``cli``...)."""
    parts = re.split(r"[./]", path_or_module.removesuffix(".py"))
    return parts[1] if len(parts) > 1 else "__init__"


# A module named in a string, as importlib / the registry's resolve() take it: "mae_transfer.x.y[:attr]".
MODULE_STRING = re.compile(r"^mae_transfer(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_.]*)?$")


def _module_of(path: str) -> str:
    """``mae_transfer/engine/trainer.py`` -> ``mae_transfer.engine.trainer`` (a package's __init__: the package)."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _absolute(path: str, node: ast.ImportFrom) -> str:
    """The absolute module of a (possibly relative) ``from ... import``, seen from ``path``."""
    if not node.level:
        return node.module or ""
    package = _module_of(path).split(".")
    if not path.endswith("__init__.py"):
        package = package[:-1]  # a module's relative imports start at its package
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported_modules(path: str, source: str) -> list[tuple[str, int]]:
    """(absolute module, line) of every mae_transfer import in a file: function-level ones, relative
    ones, and modules named in strings (importlib.import_module / registry.resolve targets)."""
    out = []
    tree = ast.parse(source, path)
    logger_names = {
        id(a)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) == "getLogger"
        for a in n.args
    }  # logging.getLogger("mae_transfer.cli") names a logger, not an import
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("mae_transfer")]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node)
            if module == "mae_transfer" or (node.level and module.count(".") == 0):
                out += [(f"mae_transfer.{a.name}", node.lineno) for a in node.names]
            elif module.startswith("mae_transfer."):
                out += [(f"{module}.{a.name}", node.lineno) for a in node.names]  # a submodule or a name in module
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and MODULE_STRING.match(node.value)
            and id(node) not in logger_names
        ):
            out.append((node.value.split(":")[0], node.lineno))
    return sorted(out, key=lambda item: item[1])


def _imports(path: str, source: str) -> list[tuple[str, int]]:
    """(imported unit, line) of every mae_transfer import in a file (see :func:`_imported_modules`)."""
    return [
        (u if (u := _unit(m)) in LAYER or m.count(".") > 1 else "__init__", line)
        for m, line in _imported_modules(path, source)
    ]


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in _sources()}
    assert units <= set(LAYER), f"give these a layer in tests/test_layering.py: {sorted(units - set(LAYER))}"


def test_imports_point_down_only():
    bad = []
    for path, source in _sources().items():
        here = _unit(path)
        for there, line in _imports(path, source):
            if there != here and LAYER[there] >= LAYER[here]:
                bad.append(f"{path}:{line} imports {there} (layer {LAYER[there]}) from {here} (layer {LAYER[here]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import():
    # The rule above must be able to fail: an engine module importing the evaluation layer.
    imports = _imports("mae_transfer/engine/x.py", "def f():\n    from mae_transfer.evaluation.registry import TASKS\n")
    assert imports == [("evaluation", 2)] and LAYER["evaluation"] > LAYER["engine"]


def test_the_checker_sees_a_relative_upward_import():
    # `from ..evaluation import registry` inside engine/ is the same upward import.
    assert _imports("mae_transfer/engine/x.py", "from ..evaluation import registry\n") == [("evaluation", 1)]
    assert _imports("mae_transfer/engine/__init__.py", "from ..evaluation.runner import run_jobs\n") == [
        ("evaluation", 1)
    ]
    assert _imports("mae_transfer/engine/x.py", "from .locks import FileLock\n") == [
        ("engine", 1)
    ]  # inside the package


def test_the_checker_sees_modules_named_in_strings():
    # importlib.import_module("mae_transfer.evaluation.runner") or a resolve() target in engine/ is upward too.
    source = (
        'import importlib\nm = importlib.import_module("mae_transfer.evaluation.runner")\nT = "mae_transfer.cli:main"\n'
    )
    assert _imports("mae_transfer/engine/x.py", source) == [("evaluation", 2), ("cli", 3)]
    assert (
        _imports("mae_transfer/engine/x.py", 'text = "see mae_transfer.cli for the options"\n') == []
    )  # prose is not a module


def _module_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules of its own package it imports (at any level, strings included)."""
    modules = {_module_of(p): p for p in sources}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        here = _unit(path)
        targets = set()
        for name, _ in _imported_modules(path, sources[path]):
            while name and name not in modules:  # "pkg.module.attr" -> "pkg.module"
                name = name.rpartition(".")[0]
            if name and name != module and _unit(name) == here and name != f"mae_transfer.{here}":
                targets.add(name)
        graph[module] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), set(), [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# Circles inside a package that are allowed (none: checkpoint/'s was removed by giving CheckpointError
# its own module, reading its own module above the formats, and the HF export its own module).
KNOWN_CIRCLES: set[frozenset[str]] = set()


def test_no_new_circle_inside_a_package():
    found = _circles(_module_graph(_sources()))
    new = found - KNOWN_CIRCLES
    assert not new, "import circles inside a package:\n" + "\n".join(" <-> ".join(sorted(c)) for c in new)
    assert not KNOWN_CIRCLES - found, f"gone, remove from KNOWN_CIRCLES: {KNOWN_CIRCLES - found}"


def test_the_checker_sees_a_circle_inside_a_package():
    sources = {
        "mae_transfer/checkpoint/a.py": "def f():\n    from mae_transfer.checkpoint.b import g\n",
        "mae_transfer/checkpoint/b.py": "from .a import f\n",
        "mae_transfer/checkpoint/c.py": "from .a import f\n",
    }
    assert _circles(_module_graph(sources)) == {frozenset({"mae_transfer.checkpoint.a", "mae_transfer.checkpoint.b"})}


def _calls(source: str, path: str, name: str) -> list[int]:
    """Lines that call ``name`` (a function or a method of that name)."""
    lines = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                lines.append(node.lineno)
    return lines


def _where(name: str) -> dict[str, list[int]]:
    return {p: lines for p, s in _sources().items() if (lines := _calls(s, p, name))}


def test_one_atomic_write():
    # Files are replaced in one place (io.atomic_write); the toy-data writer and the dataset index
    # cache publish whole folders.
    replaced = {p for p, s in _sources().items() if re.search(r"\bos\.(replace|rename)\(", s)}
    assert replaced <= {"mae_transfer/io.py", "mae_transfer/data/toy.py", "mae_transfer/data/index.py"}, replaced
    assert set(_where("rename")) <= {"mae_transfer/data/toy.py"}


def test_one_backbone_start():
    # Loading the backbone (or warning about random weights) and SyncBN are the shared helpers'.
    for name in ("load_backbone", "convert_sync_batchnorm"):
        users = {p for p in _where(name) if p.split("/")[1] in ("classification", "detection", "segmentation")}
        assert name != "load_backbone" or not users - {"mae_transfer/classification/frozen.py"}, users
    assert {p.split("/")[1] for p in _where("init_backbone")} >= {"classification", "detection", "segmentation"}


def test_one_evaluation_and_run_glue():
    # Precision, autocast and workers of an evaluation are set up by the engine alone; distributed
    # setup and the run's log file by the engine and the one task front.
    for name in ("resolve_precision", "autocast_context", "default_num_workers"):
        assert {p.split("/")[1] for p in _where(name)} <= {"engine"}, (name, _where(name))
    assert set(_where("init_distributed")) <= {"mae_transfer/evaluation/front.py"} | {
        p for p in _where("init_distributed") if "/engine/" in p
    }
    assert set(_where("Trainer")) <= {"mae_transfer/evaluation/front.py"}, _where("Trainer")


def test_one_flag_table():
    # The task commands' options exist once, in evaluation/options.py; no parser spells them out again.
    from mae_transfer.evaluation.options import FAMILY_OPTIONS, FLAGS

    shared = {FLAGS[n].flags[0] for names in FAMILY_OPTIONS.values() for n in names}
    only_tasks = shared - {
        "--data",
        "--backbone",
        "--preset",
        "--model",
        "--output",
        "--batch-size",
        "--device",
        "--img-size",
        "--trainable-blocks",  # bench: a grid of values (Figure 9), not the one value of `finetune`
    }
    spelled = [
        (p, m.group(1))
        for p, s in _sources().items()
        for m in re.finditer(r"add_argument\(\s*\"(--[a-z-]+)\"", s)
        if m.group(1) in only_tasks
    ]
    assert not spelled, f"task options added outside the flag table: {spelled}"


def test_one_result_row():
    # Every results.jsonl row is a ResultRow: nobody writes result rows as loose dicts.
    writers = {p for p, s in _sources().items() if "atomic_write_jsonl(" in s and p != "mae_transfer/io.py"}
    assert writers <= {"mae_transfer/engine/results.py"}, writers


def test_distributed_code_lives_in_the_engine():
    # Task packages use the engine's reductions and evaluation loop; none talks to torch.distributed.
    tasks = ("pretrain", "classification", "detection", "segmentation")

    def talks_to_distributed(path: str, source: str) -> bool:
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
                return True
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
                return True
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "distributed"
                and getattr(node.value, "id", None) == "torch"
            ):
                return True
        return False

    direct = [p for p, s in _sources().items() if p.split("/")[1] in tasks and talks_to_distributed(p, s)]
    assert not direct, direct
    evaluators = {p for p, s in _sources().items() if re.search(r"class \w+\(DatasetEvaluator\)", s)}
    assert {p.split("/")[1] for p in evaluators} == {"classification", "detection", "segmentation"}
