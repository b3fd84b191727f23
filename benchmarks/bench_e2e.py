"""End to end: a Llama-style model, PEFT 0.21.2 vs peft_kernels, per method — training steps/s, activation bytes
kept for backward, peak memory (CUDA), and greedy decode tokens/s.

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--steps 10] [--out rows.csv] [--methods lora,lora_int8,prefix]

Model: LlamaConfig(hidden 256, 4 layers, 8 heads, 2 KV heads, intermediate 688, vocab 512) on CPU; a 1B-class
config (hidden 2048, 16 layers, 32/8 heads) on CUDA. Random weights from a fixed seed; both libraries get the same
base weights and the same adapter weights (copied), batch (B, T) = (4, 128) on CPU, (8, 1024) on CUDA.
Methods: LoRA r=16 on q,k,v,o,gate,up,down with dropout 0.05; int8 LoRA (bitsandbytes load_in_8bit for PEFT and us —
the same CB/SCB weights; CPU only if bitsandbytes imports); prefix tuning with 32 virtual tokens.
Timing: the two libraries alternate step by step (interleaved), medians with p20/p80 over --steps steps after 2
warm-up steps. "saved bytes" = unique storages saved for backward (saved_tensors_hooks), parameters excluded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import os
import statistics
import tempfile
import time
import warnings

import torch


def llama(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if device == "cuda":
        config = LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=5504,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
    else:
        config = LlamaConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=688,
            vocab_size=512,
            max_position_embeddings=1024,
        )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config_for(lib, method):
    if method.startswith("lora"):
        return lib.LoraConfig(
            task_type="CAUSAL_LM",
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=LORA_TARGETS,
            init_lora_weights=False,
        )
    return lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=32)


def build_pair(method, device, dtype):
    import peft

    import peft_kernels as pk

    base = llama(device).to(dtype)
    if method == "lora_int8":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        path = tempfile.mkdtemp(prefix="bench-e2e-")
        base.save_pretrained(path)

        def load():
            return AutoModelForCausalLM.from_pretrained(
                path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map=device
            )

        theirs_base, ours_base = load(), load()
    else:
        theirs_base, ours_base = base.to(device), copy.deepcopy(base).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, config_for(peft, method))
        ours = pk.get_peft_model(ours_base, config_for(pk, method))
    ours.load_state_dict(theirs.state_dict())
    return {"peft": theirs, "peft_kernels": ours}


def saved_bytes(model, batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def q(values):
    deciles = statistics.quantiles(values, n=10)
    return statistics.median(values), deciles[1], deciles[7]


def run_method(method, device, steps, decode_tokens):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = build_pair(method, device, dtype)
    b, t = (8, 1024) if device == "cuda" else (4, 128)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, models["peft"].config.vocab_size, (b, t), generator=generator).to(device)
    batch = {"input_ids": ids, "labels": ids}
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }
    times = {k: [] for k in models}
    peaks = {}
    for step in range(steps + 2):
        for key, model in models.items():
            model.train()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad(set_to_none=True)
            sync(device)
            if step >= 2:
                times[key].append(time.perf_counter() - start)
            if device == "cuda":
                peaks[key] = torch.cuda.max_memory_allocated()
    rows = []
    for key, model in models.items():
        kept = saved_bytes(model, batch)
        model.eval()
        prompt = ids[:1, :16]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(input_ids=prompt, max_new_tokens=2, do_sample=False)  # warm-up
            sync(device)
            start = time.perf_counter()
            out = model.generate(
                input_ids=prompt, max_new_tokens=decode_tokens, do_sample=False, min_new_tokens=decode_tokens
            )
            sync(device)
        elapsed = time.perf_counter() - start
        p50, p20, p80 = q(times[key])
        rows.append(
            {
                "method": method,
                "provider": key,
                "device": device if device == "cpu" else torch.cuda.get_device_name(),
                "dtype": str(dtype).replace("torch.", ""),
                "batch": f"{b}x{t}",
                "train_step_p50_s": round(p50, 4),
                "train_step_p20_s": round(p20, 4),
                "train_step_p80_s": round(p80, 4),
                "train_steps_per_s": round(1 / p50, 3),
                "saved_bytes_mb": round(kept / 1e6, 2),
                "peak_mem_mb": round(peaks.get(key, float("nan")) / 1e6, 1) if device == "cuda" else "",
                "decode_tok_per_s": round((out.shape[1] - prompt.shape[1]) / elapsed, 1),
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--methods", default="lora,lora_int8,prefix")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if args.dry_run:
        print(
            f"bench_e2e plan: device={args.device} methods={methods} steps={args.steps} "
            f"decode_tokens={args.decode_tokens}"
        )
        return 0
    import peft

    import peft_kernels as pk

    all_rows = []
    for method in methods:
        if method == "lora_int8":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                print(f"skipping lora_int8: bitsandbytes unavailable ({exc})")
                continue
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            rows = run_method(method, args.device, args.steps, args.decode_tokens)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for row in rows:
            row.update(torch=torch.__version__, peft=peft.__version__, peft_kernels=pk.__version__, timestamp=stamp)
        all_rows += rows
        theirs, ours = rows
        print(
            f"{method:<10} train step p50 [p20, p80]: peft {theirs['train_step_p50_s'] * 1e3:8.1f} ms "
            f"[{theirs['train_step_p20_s'] * 1e3:.1f}, {theirs['train_step_p80_s'] * 1e3:.1f}]  ours "
            f"{ours['train_step_p50_s'] * 1e3:8.1f} ms [{ours['train_step_p20_s'] * 1e3:.1f}, "
            f"{ours['train_step_p80_s'] * 1e3:.1f}]  speedup {theirs['train_step_p50_s'] / ours['train_step_p50_s']:.2f}x"
            f" | saved for backward: peft {theirs['saved_bytes_mb']} MB, ours {ours['saved_bytes_mb']} MB"
            f" | decode: peft {theirs['decode_tok_per_s']} tok/s, ours {ours['decode_tok_per_s']} tok/s"
        )
    if args.out and all_rows:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(all_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
