"""End to end: a Llama-style model, PEFT 0.21.2 vs peft_kernels, per method — training steps/s, memory of a step,
activation bytes kept for backward, and greedy decode tokens/s.

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--steps 10] [--decode-reps 5] [--out rows.csv]
        [--methods lora,lora_no_dropout,lora_patch_peft,lora_int8,qlora,prefix]

Model: LlamaConfig(hidden 256, 4 layers, 8 heads, 2 KV heads, intermediate 688, vocab 512) on CPU; a 1B-class
config (hidden 2048, 16 layers, 32/8 heads) on CUDA. Random weights from a fixed seed; both libraries get the same
base weights and the same adapter weights (copied), batch (B, T) = (4, 128) on CPU, (8, 1024) on CUDA.
Methods: LoRA r=16 on q,k,v,o,gate,up,down with dropout 0.05; lora_no_dropout: the same with dropout 0;
lora_patch_peft: the same LoRA built by plain
``peft.get_peft_model`` after ``peft_kernels.patch_peft()`` (provider "patch_peft()") vs unpatched peft; int8 LoRA
(bitsandbytes load_in_8bit for PEFT and us — the same CB/SCB weights; CPU only if bitsandbytes imports); QLoRA (the
same LoRA over bitsandbytes load_in_4bit NF4 with double quantization, compute dtype = the run's dtype, bnb's CPU
inference repack off for both); prefix tuning with 32 virtual tokens.
A training step is forward + backward + AdamW step + zero_grad. Timing (``peft_kernels.bench.measure``): the two
libraries alternate step by step (interleaved), medians with p20/p80 over --steps steps after 2 warm-up steps;
decode (before any training step, on equal weights): a 16-token prompt, exactly --decode-tokens new tokens, --decode-reps interleaved runs (tokens/s at the
median; the p20/p80 columns come from the p80/p20 times). Memory of one step: on CPU the bytes allocated and the
peak of live bytes from the profiler's allocator timeline; on CUDA the peak above the start. "saved bytes" =
unique storages saved for backward (saved_tensors_hooks), parameters excluded. Rows carry the versions, device
and git revision.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import tempfile
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
    if method.startswith("lora") or method == "qlora":
        return lib.LoraConfig(
            task_type="CAUSAL_LM",
            r=16,
            lora_alpha=32,
            lora_dropout=0.0 if method == "lora_no_dropout" else 0.05,
            target_modules=LORA_TARGETS,
            init_lora_weights=False,
        )
    return lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=32)


def build_pair(method, device, dtype):
    import peft

    import peft_kernels as pk

    base = llama(device).to(dtype)
    if method in ("lora_int8", "qlora"):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        path = tempfile.mkdtemp(prefix="bench-e2e-")
        base.save_pretrained(path)
        if method == "lora_int8":
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        else:
            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)  # fmt: skip

        def load():
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map=device)
            for module in model.modules():
                # bnb's AVX512-BF16 CPU repack on the first no-grad forward changes PEFT's base layout mid-run
                # (and its forward on that layout disagrees with the dequantized product on this CPU): off for both.
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            return model

        theirs_base, ours_base = load(), load()
    else:
        theirs_base, ours_base = base.to(device), copy.deepcopy(base).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, config_for(peft, method))
        if method == "lora_patch_peft":
            # Plain peft after peft_kernels.patch_peft(): a peft.PeftModel whose LoRA layers run our op.
            pk.patch_peft()
            try:
                ours = peft.get_peft_model(ours_base, config_for(peft, method))
            finally:
                pk.unpatch_peft()
        else:
            ours = pk.get_peft_model(ours_base, config_for(pk, method))
    state = theirs.state_dict()
    if method == "qlora":
        # bnb's Linear4bit saves its quant state under weight.* keys but cannot load them back (both libraries
        # alike); the base weights are identical already (same checkpoint, deterministic quantization).
        state = {k: v for k, v in state.items() if "lora_" in k}
    ours.load_state_dict(state, strict=method != "qlora")
    return {"peft": theirs, "patch_peft()" if method == "lora_patch_peft" else "peft_kernels": ours}


def train_step(model, optimizer, batch):
    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def decode(model, prompt, tokens: int):
    def run():
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model.generate(input_ids=prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    return run


def run_method(method, device, steps, decode_tokens, decode_reps):
    from peft_kernels.bench import measure

    dev = torch.device(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = build_pair(method, device, dtype)
    b, t = (8, 1024) if device == "cuda" else (4, 128)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, models["peft"].config.vocab_size, (b, t), generator=generator).to(device)
    batch = {"input_ids": ids, "labels": ids}
    # Decode first, while both models hold the same weights (training steps with different dropout masks make
    # the two adapters drift apart, and then their greedy tokens may differ).
    for model in models.values():
        model.eval()
    prompt = ids[:1, :16]
    decode_fns = {key: decode(model, prompt, decode_tokens) for key, model in models.items()}
    decode_times = measure.interleaved_times(decode_fns, dev, decode_reps, warmup=1)
    outputs = {key: fn() for key, fn in decode_fns.items()}
    for model in models.values():
        model.train()
    steps_fns = {
        key: train_step(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), batch)
        for key, model in models.items()
    }
    times = measure.interleaved_times(steps_fns, dev, steps, warmup=2)
    memory = {key: measure.allocations(fn, dev) for key, fn in steps_fns.items()}
    saved = {}
    for key, model in models.items():
        params = list(model.parameters())
        saved[key] = measure.saved_for_backward_bytes(lambda model=model: model(**batch).loss, params)
        model.zero_grad(set_to_none=True)
    rows = []
    meta = measure.run_metadata(dev)
    for key in models:
        p50, p20, p80 = measure.quantiles(times[key])
        d50, d20, d80 = measure.quantiles(decode_times[key])
        alloc, peak = memory[key]
        rows.append(
            {
                "method": method,
                "provider": key,
                "dtype": str(dtype).replace("torch.", ""),
                "batch": f"{b}x{t}",
                "train_step_p50_ms": round(p50 * 1e3, 3),
                "train_step_p20_ms": round(p20 * 1e3, 3),
                "train_step_p80_ms": round(p80 * 1e3, 3),
                "train_steps_per_s": round(1 / p50, 3),
                "speedup_vs_peft": round(measure.quantiles(times["peft"])[0] / p50, 4),
                "ratio_vs_peft": round(measure.paired_ratio(times["peft"], times[key]), 4),
                "step_alloc_bytes": "" if alloc is None else alloc,
                "step_peak_bytes": peak,
                "saved_bytes": saved[key],
                "decode_tokens": decode_tokens,
                "decode_tok_per_s_p50": round(decode_tokens / d50, 2),
                "decode_tok_per_s_p20": round(decode_tokens / d80, 2),
                "decode_tok_per_s_p80": round(decode_tokens / d20, 2),
                "same_tokens_as_peft": bool(torch.equal(outputs[key], outputs["peft"])),
                "reps": f"{steps} steps, {decode_reps} decodes",
                **meta,
            }
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-reps", type=int, default=5)
    parser.add_argument("--methods", default="lora,lora_no_dropout,lora_patch_peft,lora_int8,qlora,prefix")
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
    all_rows = []
    for method in methods:
        if method in ("lora_int8", "qlora"):
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                print(f"skipping {method}: bitsandbytes unavailable ({exc})")
                continue
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            rows = run_method(method, args.device, args.steps, args.decode_tokens, args.decode_reps)
        all_rows += rows
        for row in rows:
            mem = f"alloc {row['step_alloc_bytes'] / 1e6:.1f} MB, " if row["step_alloc_bytes"] != "" else ""
            print(
                f"{method:<10} {row['provider']:<13} train step {row['train_step_p50_ms']:9.1f} ms "
                f"[{row['train_step_p20_ms']:.1f}, {row['train_step_p80_ms']:.1f}] x{row['speedup_vs_peft']:.2f} vs peft"
                f" | {mem}peak {row['step_peak_bytes'] / 1e6:.1f} MB, saved {row['saved_bytes'] / 1e6:.1f} MB"
                f" | decode {row['decode_tok_per_s_p50']} tok/s [{row['decode_tok_per_s_p20']},"
                f" {row['decode_tok_per_s_p80']}] same tokens: {row['same_tokens_as_peft']}"
            )
    if args.out and all_rows:
        from peft_kernels.bench import measure

        measure.append_rows(args.out, all_rows, list(all_rows[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
