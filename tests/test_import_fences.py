"""Import never fails, and optional packages are imported only where docs/ARCHITECTURE.md §3 allows."""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "peft_kernels")
PEFT_COMPARING_TOOLS = {"bench/providers.py", "bench/qlora.py", "bench/mixed.py", "demo.py"}


def _python_files():
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield os.path.relpath(path, ROOT).replace(os.sep, "/"), path


def _imports(path):
    """(module name, at module level?) for every import statement of a file."""
    tree = ast.parse(open(path).read())
    top_level = set(id(node) for node in tree.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module is None:
                names = [alias.name for alias in node.names]
            elif node.level:
                names = [node.module]
            else:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            found.append((name or "", id(node) in top_level, node))
    return found


def _root(name):
    return name.split(".")[0]


def test_fenced_imports():
    problems = []
    for rel, path in _python_files():
        for name, top_level, node in _imports(path):
            root = _root(name)
            if root == "triton" and not rel.startswith("backends/triton/"):
                problems.append(f"{rel}:{node.lineno} imports triton")
            # peft: the integration module, and, inside functions only, the rest of integration/ (patch_peft) and
            # the tools whose job is to compare with PEFT (peft-kernels bench / demo); the library path never
            # imports it.
            in_functions_ok = rel.startswith("integration/") or rel in PEFT_COMPARING_TOOLS
            peft_ok = rel == "integration/hf_peft.py" or (in_functions_ok and not top_level)
            if root == "peft" and not peft_ok:
                problems.append(f"{rel}:{node.lineno} imports peft")
            if (
                name.endswith("_C")
                and ("peft_kernels._C" in name or name == "_C")
                and rel != "backends/cuda/__init__.py"
            ):
                problems.append(f"{rel}:{node.lineno} imports the CUDA extension")
            if root == "bitsandbytes" and top_level:
                problems.append(f"{rel}:{node.lineno} imports bitsandbytes at module level")
            if root == "transformers" and rel.split("/")[0] in ("layers", "ops", "backends"):
                problems.append(f"{rel}:{node.lineno} imports transformers below the API half")
    assert not problems, "\n".join(problems)


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"triton", "peft", "bitsandbytes", "peft_kernels._C"}
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in BLOCKED or name.split(".")[0] in BLOCKED - {"peft_kernels._C"}:
                raise ImportError(f"blocked for the test: {name}")
            return None
    sys.meta_path.insert(0, Blocker())
    """
)


def test_import_and_cpu_lora_without_optional_packages():
    script = BLOCKER + textwrap.dedent(
        """
        import torch, peft_kernels as pk
        from peft_kernels import cli
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        pm = pk.get_peft_model(model, pk.LoraConfig(target_modules=["0"], init_lora_weights=False))
        pm(torch.randn(2, 8)).sum().backward()
        assert cli.main(["info"]) == 0
        for name in ("triton", "peft", "bitsandbytes", "peft_kernels._C"):
            assert name not in sys.modules, name
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "triton     unavailable: triton is not importable" in result.stdout
    assert "cuda       unavailable: extension peft_kernels._C not built or not loadable" in result.stdout
    assert result.stdout.strip().endswith("OK")


def test_forced_unavailable_backend_lists_every_reason():
    import torch

    from peft_kernels.ops import lora_linear

    x, w = torch.randn(3, 4), torch.randn(5, 4)
    a, b = torch.randn(2, 4), torch.randn(5, 2)
    with pytest.raises(NotImplementedError) as info:
        lora_linear(x, w, None, a, b, 1.0, backend="cuda")
    message = str(info.value)
    for name in ("reference", "triton", "cuda"):
        assert f"  {name}: " in message
    with pytest.raises(ValueError, match="Unknown backend backend='nope'"):
        lora_linear(x, w, None, a, b, 1.0, backend="nope")
    assert torch.equal(lora_linear(x, w, None, a, b, 1.0, backend="reference"), lora_linear(x, w, None, a, b, 1.0))


def _package_of(rel: str, node, name: str) -> str | None:
    """The first-level peft_kernels package (``ops``, ``layers``, ``backends``, a module name…) an import names."""
    if isinstance(node, ast.ImportFrom) and node.level:
        parts = rel.split("/")[:-1]
        base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
        target = [*base, *(node.module.split(".") if node.module else [name])]
        return target[0] if target else None
    parts = name.split(".")
    return parts[1] if parts[0] == "peft_kernels" and len(parts) > 1 else None


def test_kernel_half_imports_downward_only():
    """backends → ops → layers: layers never reach into backends, backends never import ops or layers, and no
    kernel-half package imports the API half (tuners, peft_model, mapping)."""
    forbidden = {
        "layers": {"backends", "tuners", "peft_model", "mapping"},
        "ops": {"layers", "tuners", "peft_model", "mapping"},
        "backends": {"ops", "layers", "tuners", "peft_model", "mapping"},
    }
    problems = []
    for rel, path in _python_files():
        top = rel.split("/")[0]
        if top not in forbidden:
            continue
        for name, _, node in _imports(path):
            target = _package_of(rel, node, name)
            if target in forbidden[top]:
                problems.append(f"{rel}:{node.lineno} imports {target}")
    assert not problems, "\n".join(problems)
