"""Every ```python block of docs/TRAINING_STACKS.md, and the README's mixed-batch example, runs as written (tiny
models, CPU)."""

import functools
import os
import re
import socket
import sys
import types
import warnings

import pytest
import torch
from _models import make_model

import peft_kernels

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "TRAINING_STACKS.md")


def _blocks():
    with open(DOC) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


BLOCKS = _blocks()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(3, 100, (8, 6), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture
def namespace(tmp_path):
    """What the examples take as given: a base-model factory, a PeftModel, tokens, a dataset, a folder."""
    tokens = _Tokens().ids[:2]
    model = peft_kernels.get_peft_model(
        make_model("llama")[0], peft_kernels.LoraConfig(task_type="CAUSAL_LM", r=8, lora_dropout=0.1)
    ).train()
    return {
        "torch": torch,
        "peft_kernels": peft_kernels,
        "make_base": lambda: make_model("llama")[0],
        "model": model,
        "tokens": tokens,
        "dataset": _Tokens(),
        "out_dir": str(tmp_path / "run"),
    }


@pytest.fixture
def process_group():
    """A one-process gloo group for the FSDP example (fully_shard needs a default group)."""
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def trl_inputs():
    """A word-level tokenizer and tiny text and preference datasets for the TRL examples."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from test_trl import tokenizer

    texts = ["t5 t6 t7 t8 t9 t10", "t20 t21 t22 t23 t24"] * 4
    pairs = {"prompt": ["t5 t6", "t20 t21"] * 4, "chosen": ["t7 t8"] * 8, "rejected": ["t30 t31"] * 8}
    return {
        "tokenizer": tokenizer(),
        "text_dataset": datasets.Dataset.from_dict({"text": texts}),
        "preference_dataset": datasets.Dataset.from_dict(pairs),
    }


@pytest.fixture
def framework_standins(monkeypatch, namespace):
    """Axolotl's ``do_cli`` and LLaMA-Factory's ``run_exp`` as stand-ins that, like the real ones, call peft
    themselves (get_peft_model, or PeftModel.from_pretrained for an adapter folder). Returns the models built."""
    import peft

    built = []
    adapter_dir = os.path.join(namespace["out_dir"], "adapter")
    peft.get_peft_model(make_model("llama")[0], peft.LoraConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(
        adapter_dir
    )

    def axolotl_do_cli(config, **kwargs):
        built.append(peft.get_peft_model(make_model("llama")[0], peft.LoraConfig(task_type="CAUSAL_LM", r=8)))

    def llamafactory_run_exp(args=None, callbacks=None):
        built.append(peft.PeftModel.from_pretrained(make_model("llama")[0], adapter_dir, is_trainable=True))

    modules = {
        "axolotl": {},
        "axolotl.cli": {},
        "axolotl.cli.train": {"do_cli": axolotl_do_cli},
        "llamafactory": {},
        "llamafactory.train": {},
        "llamafactory.train.tuner": {"run_exp": llamafactory_run_exp},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    namespace["training_args"] = {"stage": "sft", "finetuning_type": "lora"}
    return built


IDS = [
    "patch_peft",
    "patch_model",
    "convert",
    "trainer",
    "trl_sft_peft_config",
    "trl_dpo_native",
    "axolotl",
    "llamafactory",
    "fsdp",
    "checkpointing",
    "autocast",
    "compile",
]


def test_the_doc_has_the_examples():
    assert len(BLOCKS) == len(IDS), "update IDS when adding or removing examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=IDS)
def test_doc_example_runs(index, namespace, request, monkeypatch):
    code = BLOCKS[index]
    if "import peft" in code or "patch_peft()" in code:
        pytest.importorskip("peft")
        request.addfinalizer(peft_kernels.unpatch_peft)
    if "from trl" in code:
        namespace.update(request.getfixturevalue("trl_inputs"))
    built = request.getfixturevalue("framework_standins") if "axolotl" in code or "llamafactory" in code else None
    if "fully_shard" in code:
        request.getfixturevalue("process_group")
    if "torch.compile" in code:
        # Same graph capture (dynamo, fullgraph) and AOT autograd, without inductor's minute of C++ codegen on
        # 2 cores; test_training_features.py has the opt-in inductor run.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
        torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"TRAINING_STACKS.md example {index}", "exec"), namespace)
    if built is not None:
        from peft.tuners.lora import LoraLayer

        from peft_kernels.integration.hf_peft import is_patched

        layers = [m for m in built[0].modules() if isinstance(m, LoraLayer)]
        assert len(built) == 1 and layers and all(is_patched(m) for m in layers), "the one line fused the layers"


README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def _readme_section_blocks(heading: str) -> list[str]:
    with open(README) as f:
        section = f.read().split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_mixed_batch_example_runs(one_thread_quiet):
    """The README's ``adapter_names=`` example: it checks its own rows against set_adapter / disable_adapter."""
    (code,) = _readme_section_blocks("Many adapters in one batch")
    namespace = {"make_base": lambda: make_model("llama")[0]}
    exec(compile(code, "README.md adapter_names example", "exec"), namespace)
    assert namespace["logits"].shape[0] == 3
    assert namespace["tokens"].shape[0] == 3 and namespace["tokens"].shape[1] > 6
