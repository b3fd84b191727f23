"""The module-level import graph of ``peft_kernels/`` has no circle larger than ``MAX_CIRCLE_FILES`` files.

The graph: one node per ``.py`` file; an edge for every ``import``/``from … import`` of a ``peft_kernels`` module
that runs when the file is imported (module level, class bodies, module-level ``if``/``try``), resolved to the
file it executes (``from .x import y`` → ``x``, and ``x/y.py`` too when ``y`` is a submodule). Imports inside
functions and under ``if TYPE_CHECKING:`` run later or never and do not count; neither does the implicit import
of a parent package's ``__init__.py``, which Python finishes before any child runs. A circle is a strongly
connected component of more than one file. docs/ARCHITECTURE.md §6 lists the circles that remain and why.

Run as a script for the numbers: ``python tests/test_import_graph.py [package dir]`` (any package, e.g. peft's).
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peft_kernels")
MAX_CIRCLE_FILES = 8


def _modules(package_dir: str) -> dict[str, str]:
    """Dotted module name (relative to the package, "" = its ``__init__``) → file path."""
    found = {}
    for dirpath, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), package_dir)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            found[".".join(rel)] = os.path.join(dirpath, name)
    return found


def _import_nodes(node, function_local: bool):
    """Import statements under ``node`` that run when it runs: not under ``if TYPE_CHECKING:``, and not in
    function bodies unless ``function_local``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not function_local:
            continue
        elif isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for branch in child.orelse:
                yield from _import_nodes(ast.Module(body=[branch], type_ignores=[]), function_local)
        else:
            yield from _import_nodes(child, function_local)


def import_graph(package_dir: str = PACKAGE_DIR, function_local: bool = False) -> dict[str, set[str]]:
    """module → the package modules it imports at import time (names relative to the package).

    ``function_local=True`` adds the imports inside functions (what a call may import): the wider graph.
    """
    package_dir = os.path.abspath(package_dir)
    package = os.path.basename(package_dir)
    modules = _modules(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = os.path.basename(path) == "__init__.py"
        here = name.split(".") if name else []
        current_package = here if is_package else here[:-1]
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in _import_nodes(tree, function_local):
            targets = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package:
                        targets.append(".".join(parts[1:]))
            else:
                if node.level:
                    anchor = current_package[: len(current_package) - (node.level - 1)]
                    base = anchor + (node.module.split(".") if node.module else [])
                elif node.module and node.module.split(".")[0] == package:
                    base = node.module.split(".")[1:]
                else:
                    continue
                submodules = [".".join(base + [alias.name]) for alias in node.names]
                submodules = [m for m in submodules if m in modules]
                # ``from <a package above this file> import <its submodules>`` needs only the submodules: the
                # package itself is already being imported (it is this file's parent).
                is_ancestor = base == current_package[: len(base)] and (len(base) < len(here) or is_package)
                if not (is_ancestor and len(submodules) == len(node.names)):
                    targets.append(".".join(base))
                targets += submodules
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, largest first (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found, key=lambda c: (-len(c), c))


def _file(module: str, package_dir: str = PACKAGE_DIR) -> str:
    """The file of ``module``, relative to the package directory."""
    return os.path.relpath(_modules(package_dir)[module], package_dir).replace(os.sep, "/")


def test_the_graph_sees_a_known_edge():
    # The analysis must be able to see edges at all: peft_model.py imports the config module at module level.
    assert "config" in import_graph()["peft_model"]


def test_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("function_local", [False, True], ids=["module-level", "with-function-local"])
def test_no_import_circle_over_the_limit(function_local):
    # Module level is what can fail at import; with function-local imports it is the reading order (a call that
    # imports upward is an arrow a reader must follow too). Both stay within the limit.
    too_big = [c for c in circles(import_graph(function_local=function_local)) if len(c) > MAX_CIRCLE_FILES]
    assert not too_big, "import circles over {} files:\n{}".format(
        MAX_CIRCLE_FILES, "\n".join(", ".join(_file(m) for m in c) for c in too_big)
    )


def test_the_api_half_imports_downward():
    # The arrows issue #17 removed stay removed: the registry, the status functions, prompt learning and the
    # tuners never import the model classes or the trainer integration at import time.
    graph = import_graph()
    upward = {"peft_model", "task_models", "checkpoint", "mapping_func", "auto", "integration.trainer", ""}
    for module, imports in graph.items():
        if module == "mapping" or module.startswith(("tuners", "utils", "layers", "ops", "backends")):
            assert not imports & upward, f"{_file(module)} imports {sorted(imports & upward)}"


# Names issue #17 moved between modules, under the module paths PEFT 0.21.2 has them (and the old paths of ours
# that code outside the API half still imports).
MOVED_NAMES = [
    ("peft_model", "PeftModel"),
    ("peft_model", "PeftModelForCausalLM"),
    ("peft_model", "PeftModelForSeq2SeqLM"),
    ("peft_model", "PeftModelForSequenceClassification"),
    ("peft_model", "PeftModelForTokenClassification"),
    ("peft_model", "PeftModelForQuestionAnswering"),
    ("peft_model", "PeftModelForFeatureExtraction"),
    ("peft_model", "get_layer_status"),
    ("peft_model", "get_model_status"),
    ("peft_model", "TunerLayerStatus"),
    ("peft_model", "TunerModelStatus"),
    ("peft_model", "PEFT_TYPE_TO_TUNER_MAPPING"),
    ("mapping_func", "get_peft_model"),
    ("mapping", "PEFT_TYPE_TO_CONFIG_MAPPING"),
    ("mapping", "PEFT_TYPE_TO_TUNER_MAPPING"),
    ("mapping", "get_peft_config"),
    ("mapping", "inject_adapter_in_model"),
    ("auto", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING"),
    ("", "get_layer_status"),
    ("", "MODEL_TYPE_TO_PEFT_MODEL_MAPPING"),
]


@pytest.mark.parametrize("module, name", MOVED_NAMES, ids=[f"{m or 'peft'}.{n}" for m, n in MOVED_NAMES])
def test_moved_names_keep_their_peft_paths(module, name):
    import importlib

    ours = importlib.import_module("peft_kernels" + (f".{module}" if module else ""))
    assert getattr(ours, name, None) is not None, f"peft_kernels.{module}.{name} no longer resolves"
    if importlib.util.find_spec("peft") is not None:
        theirs = importlib.import_module("peft" + (f".{module}" if module else ""))
        assert hasattr(theirs, name), f"peft.{module}.{name} is not a PEFT path; the table above is wrong"


def test_the_registries_are_filled_and_point_at_the_public_classes():
    import peft_kernels as pk
    from peft_kernels.peft_model import PeftModelForCausalLM

    assert pk.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[pk.TaskType.CAUSAL_LM] is pk.PeftModelForCausalLM
    assert pk.PeftModelForCausalLM is PeftModelForCausalLM
    assert set(pk.MODEL_TYPE_TO_PEFT_MODEL_MAPPING) == set(pk.TaskType)
    assert set(pk.PEFT_TYPE_TO_CONFIG_MAPPING) == {
        pk.PeftType.LORA,
        pk.PeftType.PREFIX_TUNING,
        pk.PeftType.P_TUNING,
        pk.PeftType.PROMPT_TUNING,
    }
    assert pk.PEFT_TYPE_TO_TUNER_MAPPING == {pk.PeftType.LORA: pk.LoraModel}
    for task, cls in pk.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items():
        assert cls._task_type == task


if __name__ == "__main__":
    target = next((arg for arg in sys.argv[1:] if not arg.startswith("--")), PACKAGE_DIR)
    for function_local in (False, True):
        graph = import_graph(target, function_local=function_local)
        found = circles(graph)
        edges = sum(len(v) for v in graph.values())
        kind = "module-level and function-local" if function_local else "import-time (module-level)"
        print(f"{os.path.abspath(target)}: {len(graph)} files, {edges} {kind} edges, {len(found)} circle(s)")
        for component in found:
            print(f"  {len(component)} files: {', '.join(_file(m, target) for m in component)}")
