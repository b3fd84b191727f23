"""Multi-adapter serving: tokens/s of ``generate`` on one batch mixed over 8 LoRA adapters, PEFT 0.21.2 vs ours.

    python benchmarks/bench_mixed_serving.py [--device cpu|cuda] [--batch 16] [--adapters 8] [--new-tokens 16]
        [--reps 5] [--threads N] [--out rows.csv] [--dry-run]

Model: a Llama-style config with random weights from a fixed seed (CPU: hidden 256, 4 layers, 8/2 heads,
intermediate 688, vocab 512; CUDA: hidden 2048, 16 layers, 32/8 heads, intermediate 5504, vocab 32000, bf16), LoRA
r=16 on q,k,v,o,gate,up,down, adapters a0..a{n-1} with distinct random weights (both libraries get the same,
copied). Batch: --batch prompts of 16 tokens, sample i served by adapter ``a{i % n}`` (``adapter_names=``);
greedy, exactly --new-tokens new tokens. Rows (interleaved repetitions, ``peft_kernels.bench.measure``; median
tokens/s with the p20/p80 range):

    peft mixed         PeftModel.generate(..., adapter_names=names)
    ours mixed         the same call on peft_kernels (one ops.lora_linear_mixed per LoRA layer and step)
    ours one adapter   the same batch on adapter a0 alone, no adapter_names: what mixing costs

Before timing, the generated tokens of ours and PEFT are compared (the ``same_tokens`` column).
Ceiling first (printed): every decode step reads every weight once, so tokens/s <= batch × bandwidth / weight bytes
(CUDA: the card's HBM peak where ``measure.device_peaks`` knows it; CPU: the bytes are printed, no peak is known).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import warnings

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if device == "cuda":
        sizes = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=5504, vocab_size=32000)  # fmt: skip
    else:
        sizes = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=688, vocab_size=512)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, pad_token_id=0, **sizes))
    return model.to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()


def with_adapters(lib, base, n: int):
    model = None
    for i in range(n):
        config = lib.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=TARGETS,
                                init_lora_weights=False)  # fmt: skip
        torch.manual_seed(100 + i)
        if model is None:
            model = lib.get_peft_model(base, config, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", config)
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 16 on CPU, 64 on CUDA")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the imports")
    args = parser.parse_args(argv)
    new_tokens = args.new_tokens or (64 if args.device == "cuda" else 16)
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    print(f"plan: {args.batch} prompts x 16 tokens, {args.adapters} adapters round robin, {new_tokens} new tokens, "
          f"{args.reps} interleaved reps on {args.device}; peft mixed / ours mixed / ours one adapter")  # fmt: skip
    import peft

    import peft_kernels as pk
    from peft_kernels.bench import measure

    if args.dry_run:
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    base = llama(args.device)
    ours = with_adapters(pk, copy.deepcopy(base), args.adapters)
    theirs = with_adapters(peft, base, args.adapters)
    theirs.load_state_dict(ours.state_dict())

    gen = torch.Generator().manual_seed(1)
    vocab = base.config.vocab_size
    inputs = {
        "input_ids": torch.randint(3, vocab, (args.batch, 16), generator=gen).to(device),
        "attention_mask": torch.ones(args.batch, 16, dtype=torch.long, device=device),
    }
    kwargs = dict(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    bytes_per_step = weight_bytes(ours)
    _, bandwidth = measure.device_peaks(measure.device_name(device))
    print(f"ceiling: each decode step reads {bytes_per_step / 1e6:.1f} MB of weights (base + {args.adapters} "
          f"adapters) for {args.batch} tokens", end="")  # fmt: skip
    if bandwidth:
        print(f"; at {bandwidth / 1e9:.0f} GB/s: <= {args.batch * bandwidth / bytes_per_step:,.0f} tokens/s")
    else:
        print("; no bandwidth peak is known for this device (CPU), so no tokens/s ceiling is stated")

    with torch.no_grad():
        ours_tokens = ours.generate(**kwargs, adapter_names=names)
        peft_tokens = theirs.generate(**kwargs, adapter_names=names)
    same = bool(torch.equal(ours_tokens, peft_tokens))
    print(f"same tokens as peft: {same}")

    def run(model, mixed):
        def call():
            with torch.no_grad():
                return model.generate(**kwargs, adapter_names=names) if mixed else model.generate(**kwargs)

        return call

    runs = {"peft mixed": run(theirs, True), "ours mixed": run(ours, True), "ours one adapter": run(ours, False)}
    times = measure.interleaved_times(runs, device, args.reps, 1)
    tokens = args.batch * new_tokens
    meta = measure.run_metadata(device)
    peft_p50 = measure.quantiles(times["peft mixed"])[0]
    rows = []
    print(f"{'provider':<18} {'tokens/s p50 [p20, p80]':>32} {'vs peft mixed':>14}")
    for name, samples in times.items():
        p50, p20, p80 = measure.quantiles(samples)
        row = dict(provider=name, batch=args.batch, adapters=args.adapters, new_tokens=new_tokens,
                   tokens_per_s_p50=round(tokens / p50, 2), tokens_per_s_p20=round(tokens / p80, 2),
                   tokens_per_s_p80=round(tokens / p20, 2), speedup_vs_peft_mixed=round(peft_p50 / p50, 3),
                   same_tokens=same, reps=args.reps, **meta)  # fmt: skip
        rows.append(row)
        print(f"{name:<18} {tokens / p50:12.1f} [{tokens / p80:.1f}, {tokens / p20:.1f}] {peft_p50 / p50:13.2f}x")
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
