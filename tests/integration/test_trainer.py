"""Issue #8 part 2: transformers Trainer with a peft_kernels PeftModel (TRL's trainers: test_trl.py)."""

import json
import os
import sys
import warnings

import pytest
import torch
from _models import logits_of, make_inputs, make_model
from _tolerances import EXACT, assert_close
from safetensors.torch import load_file

import peft_kernels as pk

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

STEPS, SAVE_EVERY = 4, 2


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class TokenDataset(torch.utils.data.Dataset):
    """16 random sequences of 8 tokens; labels = inputs (causal LM)."""

    def __init__(self):
        self.ids = torch.randint(3, 100, (16, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def lora_gpt2():
    model, task = make_model("gpt2")
    # lora_dropout > 0: resuming must also restore the RNG that draws the dropout seeds.
    return pk.get_peft_model(model, pk.LoraConfig(task_type=task, r=4, lora_alpha=8, lora_dropout=0.1)).train()


def trainer_for(model, output_dir):
    args = TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        per_device_train_batch_size=4,
        max_steps=STEPS,
        save_steps=SAVE_EVERY,
        logging_steps=1,
        learning_rate=5e-2,
        seed=0,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return Trainer(model=model, args=args, train_dataset=TokenDataset())


def losses(trainer, after_step=0):
    """Logged training losses of the steps after ``after_step`` (a resumed run also holds the earlier ones)."""
    return [e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > after_step]


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_saves_adapter_only_and_resumes_identically(tmp_path):
    first = lora_gpt2()
    assert transformers.trainer_utils._is_peft_model(first), "peft_kernels registered PeftModel with Trainer"
    trainer = trainer_for(first, tmp_path / "run")
    trainer.train()
    full_losses, full_adapter = losses(trainer), adapter_tensors(first)
    assert len(full_losses) == STEPS

    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}, files
    saved = load_file(checkpoint / "adapter_model.safetensors")
    assert saved and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved), sorted(saved)
    with open(checkpoint / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "LORA"

    resumed = lora_gpt2()
    trainer = trainer_for(resumed, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed_losses = losses(trainer, after_step=SAVE_EVERY)
    assert resumed_losses == full_losses[SAVE_EVERY:], "the resumed run continues with the same losses"
    for name, value in adapter_tensors(resumed).items():
        assert_close(value, full_adapter[name], EXACT, name)

    # The final checkpoint is a PEFT adapter folder: it loads onto a fresh base with the trained weights.
    loaded = pk.PeftModel.from_pretrained(make_model("gpt2")[0], tmp_path / "run" / f"checkpoint-{STEPS}")
    inputs = make_inputs("gpt2")
    assert_close(logits_of(loaded(**inputs)), logits_of(first.eval()(**inputs)), EXACT, "reloaded")


def test_trainer_accepts_int8_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make_model("opt")[0].save_pretrained(tmp_path / "opt")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "opt", quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    base = pk.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = pk.get_peft_model(base, pk.LoraConfig(task_type="CAUSAL_LM", r=4))
    # Without the registration Trainer refuses: "You cannot perform fine-tuning on purely quantized models".
    trainer = trainer_for(model, tmp_path / "run")
    trainer.args.max_steps = 1
    trainer.train()
    assert len(losses(trainer)) == 1


def test_registration_hook_runs_after_the_module_is_imported(tmp_path, monkeypatch):
    """The one-shot hook PeftModel installs when transformers.trainer is not imported yet, on a stand-in module."""
    from peft_kernels.integration.trainer import _AfterImport

    (tmp_path / "pk_standin_trainer.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = _AfterImport("pk_standin_trainer", lambda: seen.append(sys.modules["pk_standin_trainer"].VALUE))
    sys.meta_path.insert(0, hook)
    try:
        import pk_standin_trainer
    finally:
        hook.remove()
        sys.modules.pop("pk_standin_trainer", None)
    assert seen == [1], "the callback ran after the module body"
    assert hook not in sys.meta_path, "the hook removed itself"
    assert pk_standin_trainer.__spec__.loader.get_source("pk_standin_trainer") == "VALUE = 1\n"
