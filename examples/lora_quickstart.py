"""LoRA quickstart, exactly as with Hugging Face PEFT but importing peft_kernels.

Builds a tiny Llama-style causal LM from a config (random weights, no download), LoRA-trains it for a few steps
on a synthetic "count up" task, saves the adapter, reloads it onto a fresh copy of the base model and checks
that the reloaded model predicts exactly what the trained one does.

    python examples/lora_quickstart.py [--steps 30] [--out /tmp/lora-quickstart]
"""

import argparse
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_kernels import LoraConfig, PeftModel, TaskType, get_peft_model


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def batch(size: int = 16, length: int = 12) -> torch.Tensor:
    """Sequences that count up modulo the vocabulary: the next token is always previous + 1."""
    start = torch.randint(3, 64, (size, 1))
    return (start + torch.arange(length)) % 61 + 3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None, help="where to save the adapter (default: a temporary folder)")
    args = parser.parse_args()

    model = get_peft_model(
        base_model(),
        LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
        ),
    )
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = batch()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")

    out = args.out or tempfile.mkdtemp(prefix="lora-quickstart-")
    model.save_pretrained(out)
    model.eval()
    probe = batch(4)
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(base_model(), out).eval()
        got = reloaded(input_ids=probe).logits
    same = torch.equal(got, expected)
    print(f"adapter saved to {out}; reloaded model gives identical logits: {same}")
    if not same:
        raise SystemExit("reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
