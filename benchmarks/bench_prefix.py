"""Prefix tuning K/V cache: bytes allocated and time per training step and per generated token.

    python benchmarks/bench_prefix.py [--shapes 1x64x16 4x128x16 8x256x32] [--reps 11] [--out results.csv]
    python benchmarks/bench_prefix.py --gpu [--dry-run] [--out benchmarks/results/<gpu>.csv]

Providers (same weights, same inputs):
- ``peft``: peft 0.21.2 ``PrefixTuningConfig``: the encoder runs on B×P tokens, the prefix becomes a transformers
  ``DynamicCache`` and every attention layer ``torch.cat``s its new K/V onto it (P+T rows copied per layer per step);
- ``pk-dynamic``: peft_kernels with ``PEFT_KERNELS_PREFIX_CACHE=dynamic`` (encoder on P tokens, broadcast prefix,
  the same ``DynamicCache``): isolates the B-fold encoder work from the cache;
- ``pk-fused``: peft_kernels' default ``PrefixKVCache``: per-layer buffers [B, Hkv, P + T_max, hd] allocated once,
  the prefix written by one ``prefix_kv_write`` call, new K/V appended in place by ``kv_append``.

Model: a Llama-style decoder from a config with random weights (CPU: hidden 256, 4 layers, 8 query / 2 key-value
heads of 32, MLP 688, vocabulary 1024, fp32, SDPA attention; ``--gpu``: hidden 2048, 16 layers, 32 / 8 heads of
64, MLP 5632, vocabulary 32000, bf16). Inputs are random token ids, attention mask all ones.

Measured, per (B, T, P):
- ``train``: one step = forward with labels + backward (gradients of the trainable prefix encoder only; the
  optimizer step is the same for every provider and left out).
- ``decode``: ``generate`` greedy with exactly n new tokens (min_new_tokens = max_new_tokens = n) for n = n1 and
  n2; per generated token = (value(n2) - value(n1)) / (n2 - n1), which cancels the prefill and setup.

Method, CPU:
- Bytes allocated: ``torch.profiler.profile(profile_memory=True, record_shapes=True, with_stack=True)`` around one
  call; the profiler's memory timeline (``prof._memory_profile().timeline``, allocator-level events, so temporaries
  inside custom ops and in autograd's backward count too) gives every allocation (CREATE) and free (DESTROY).
  ``bytes`` = sum of all allocations; ``peak`` = the largest running total of live bytes allocated during the call
  (allocations minus frees since its start). Deterministic for a given shape (no sampling involved).
- Time: ``time.perf_counter`` around the call, providers interleaved in every repetition (drift hits all alike),
  medians with p20/p80 over ``--reps`` after ``--warmup`` rounds; ``torch.set_num_threads(--threads)``.
- Parity: the train loss and the generated ids of every provider are compared with ``peft``'s and reported.

Method, ``--gpu`` (needs a CUDA device; ``--dry-run`` prints the plan and exits): B=8, T=2048, P=32, bf16. Time
with CUDA events around each call after a synchronize (median of ``--reps``); memory as
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus the allocation before the call.
Train step and a 64-token generation from a T-token prompt; per-token decode time from n1 = 16 and n2 = 64.

CSV rows (``--out``, appended): op, provider, mode, metric, unit, B, T, P, p50, p20, p80, same_as_peft, device,
threads, torch, transformers, peft, peft_kernels, git_sha, timestamp.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import warnings

import torch

from peft_kernels.bench import measure

PROVIDERS = ("peft", "pk-dynamic", "pk-fused")
CPU_SHAPES = ("1x64x16", "4x128x16", "8x256x32")
CPU_MODEL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=688,
    vocab_size=1024,
)
GPU_MODEL = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=5632,
    vocab_size=32000,
)
GPU_SHAPE = (8, 2048, 32)
GPU_DECODE = (16, 64)  # 3 providers x 2 timed lengths: ~700 CPU-bound generate steps, not thousands


# ------------------------------------------------------------------------------------------------ models
def build_models(model_kwargs: dict, num_virtual_tokens: int, dtype, device):
    """{provider: model}: peft 0.21.2 and peft_kernels prefix-tuned copies of one random Llama, same weights."""
    import peft
    import transformers as tf

    import peft_kernels as pk

    config = tf.LlamaConfig(
        **model_kwargs,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    models = {}
    for name, lib in (("peft", peft), ("pk", pk)):
        torch.manual_seed(0)
        with torch.device(device):  # initialise on the device: a CPU init of the GPU model takes minutes
            base = tf.LlamaForCausalLM(config).to(dtype=dtype).eval()
        cfg = lib.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[name] = lib.get_peft_model(base, cfg)
    models["pk"].load_state_dict(models["peft"].state_dict())
    return {"peft": models["peft"], "pk-dynamic": models["pk"], "pk-fused": models["pk"]}


@contextlib.contextmanager
def cache_mode(provider: str):
    """Selects peft_kernels' prefix cache path for one call (read per call from PEFT_KERNELS_PREFIX_CACHE)."""
    previous = os.environ.get("PEFT_KERNELS_PREFIX_CACHE")
    if provider.startswith("pk-"):
        os.environ["PEFT_KERNELS_PREFIX_CACHE"] = provider.removeprefix("pk-")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PEFT_KERNELS_PREFIX_CACHE", None)
        else:
            os.environ["PEFT_KERNELS_PREFIX_CACHE"] = previous


def train_fn(model, input_ids, mask):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        out = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
        out.loss.backward()
        return out.loss.detach()

    return run


def decode_fn(model, input_ids, mask, new_tokens: int):
    def run():
        with torch.no_grad():
            return model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    return run


def in_mode(provider: str, fn):
    """fn run under ``provider``'s cache mode (the measurements and timings of ``peft_kernels.bench.measure``
    call it like any other function)."""

    def run():
        with cache_mode(provider):
            return fn()

    return run


# ------------------------------------------------------------------------------------------------ CPU method
def run_cpu(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    rows = []
    n1, n2 = args.decode_tokens
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"
    )
    header = f"{'B':>2} {'T':>4} {'P':>3} {'mode':<7} {'provider':<11} {'MB alloc':>9} {'MB peak':>8}"
    print(header + f" {'ms p50 [p20,p80]':>24} {'same':>5}")
    for shape in args.shapes:
        batch, length, prefix = (int(v) for v in shape.split("x"))
        models = build_models(CPU_MODEL, prefix, torch.float32, "cpu")
        gen = torch.Generator().manual_seed(1)
        input_ids = torch.randint(3, CPU_MODEL["vocab_size"], (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)

        # ---- train step
        fns = {p: in_mode(p, train_fn(models[p], input_ids, mask)) for p in PROVIDERS}
        stats = {provider: measure.cpu_allocations(fns[provider]) for provider in PROVIDERS}
        times = measure.interleaved_times(fns, cpu, args.reps, args.warmup)
        for provider in PROVIDERS:
            total, peak, loss = stats[provider]
            same = bool(torch.allclose(loss, stats["peft"][2], rtol=1e-5, atol=1e-6))
            p50, p20, p80 = (1e3 * v for v in measure.quantiles(times[provider]))
            print(
                f"{batch:>2} {length:>4} {prefix:>3} {'train':<7} {provider:<11} {total / 1e6:>9.2f} {peak / 1e6:>8.2f}"
                f" {p50:>8.2f} [{p20:.2f},{p80:.2f}] {str(same):>5}"
            )
            base = dict(provider=provider, mode="train", B=batch, T=length, P=prefix, same_as_peft=same)
            rows.append({**base, "metric": "bytes_allocated", "unit": "B", "p50": total, "p20": total, "p80": total})
            rows.append({**base, "metric": "peak_bytes", "unit": "B", "p50": peak, "p20": peak, "p80": peak})
            rows.append({**base, "metric": "time", "unit": "ms", "p50": p50, "p20": p20, "p80": p80})
            paired = measure.paired_ratio(times["peft"], times[provider])  # PEFT's time / this one's, per round
            rows.append({**base, "metric": "ratio_vs_peft", "unit": "x", "p50": paired, "p20": "", "p80": ""})

        # ---- decode: per generated token from two lengths
        per_len = {}
        for n in (n1, n2):
            fns = {p: in_mode(p, decode_fn(models[p], input_ids, mask, n)) for p in PROVIDERS}
            mem = {provider: measure.cpu_allocations(fns[provider]) for provider in PROVIDERS}
            times = measure.interleaved_times(fns, cpu, args.reps, args.warmup)
            per_len[n] = (mem, times)
        for provider in PROVIDERS:
            (m1, t1), (m2, t2) = per_len[n1], per_len[n2]
            steps = n2 - n1
            per_token = (m2[provider][0] - m1[provider][0]) / steps
            same = all(torch.equal(per_len[n][0][provider][2], per_len[n][0]["peft"][2]) for n in (n1, n2))
            ms = 1e3 * (statistics.median(t2[provider]) - statistics.median(t1[provider])) / steps
            print(
                f"{batch:>2} {length:>4} {prefix:>3} {'decode':<7} {provider:<11} {per_token / 1e6:>9.3f}"
                f" {'':>8} {ms:>8.3f} {'(per token)':<15} {str(same):>5}"
            )
            base = dict(provider=provider, mode="decode", B=batch, T=length, P=prefix, same_as_peft=same)
            rows.append({**base, "metric": "bytes_per_token", "unit": "B", "p50": per_token, "p20": "", "p80": ""})
            rows.append({**base, "metric": "time_per_token", "unit": "ms", "p50": ms, "p20": "", "p80": ""})
    return rows


# ------------------------------------------------------------------------------------------------ GPU method
def gpu_plan(args) -> str:
    batch, length, prefix = GPU_SHAPE
    n1, n2 = GPU_DECODE
    return (
        f"GPU plan: Llama-style {GPU_MODEL} bf16, SDPA; B={batch}, T={length}, P={prefix}; providers {PROVIDERS}\n"
        f"  train: forward(labels) + backward, {args.warmup} warmup + {args.reps} timed (CUDA events, median),"
        " peak memory above the start\n"
        f"  decode: generate greedy with exactly {n1} and {n2} new tokens from the T-token prompt,"
        f" {max(1, args.reps // 3)} timed each; ms per token = (t({n2}) - t({n1})) / {n2 - n1}; peak memory of the"
        f" {n2}-token call\n"
        f"  rows: --out {args.out or '(none)'}"
    )


def prefix_backend() -> str:
    """The backend the CUDA dispatch picks for kv_append on bf16 tensors (priority list of ops/_dispatch.py)."""
    from peft_kernels.ops import _dispatch

    buf = torch.zeros(1, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    new = torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    for name in _dispatch.PRIORITY["kv_append"]:
        if not _dispatch.call_reasons(name, "kv_append", buf, buf.clone(), new, new, 0):
            return name
    return "none"


def run_gpu(args, emit=lambda rows: None) -> list[dict]:
    """The GPU method; ``emit`` receives each mode's rows as soon as they are measured (a killed run keeps them)."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (torch.cuda.is_available() is False); use --dry-run for the plan")
    batch, length, prefix = GPU_SHAPE
    n1, n2 = GPU_DECODE
    models = build_models(GPU_MODEL, prefix, torch.bfloat16, "cuda")
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, GPU_MODEL["vocab_size"], (batch, length), generator=gen).cuda()
    mask = torch.ones(batch, length, dtype=torch.long, device="cuda")
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; prefix ops on: {prefix_backend()}")

    cuda = torch.device("cuda")
    fns = {p: in_mode(p, train_fn(models[p], input_ids, mask)) for p in PROVIDERS}
    times = measure.interleaved_times(fns, cuda, args.reps, args.warmup)
    for provider in PROVIDERS:
        peak = measure.allocations(fns[provider], cuda)[1]
        p50, p20, p80 = (1e3 * v for v in measure.quantiles(times[provider]))
        print(f"train  {provider:<11} {p50:9.2f} ms [{p20:.2f},{p80:.2f}]  peak {peak / 2**30:.2f} GiB")
        base = dict(provider=provider, mode="train", B=batch, T=length, P=prefix, same_as_peft="")
        rows.append({**base, "metric": "time", "unit": "ms", "p50": p50, "p20": p20, "p80": p80})
        rows.append({**base, "metric": "peak_bytes", "unit": "B", "p50": peak, "p20": peak, "p80": peak})
    emit(rows)

    decode_reps = max(1, args.reps // 3)
    per_len = {}
    for n in (n1, n2):
        fns = {p: in_mode(p, decode_fn(models[p], input_ids, mask, n)) for p in PROVIDERS}
        per_len[n] = (fns, measure.interleaved_times(fns, cuda, decode_reps, 1))
    for provider in PROVIDERS:
        t1, t2 = per_len[n1][1][provider], per_len[n2][1][provider]
        ms = 1e3 * (statistics.median(t2) - statistics.median(t1)) / (n2 - n1)
        total = 1e3 * statistics.median(t2)
        peak = measure.allocations(per_len[n2][0][provider], cuda)[1]
        print(f"decode {provider:<11} {ms:9.3f} ms/token, {n2} tokens {total:.1f} ms, peak {peak / 2**30:.2f} GiB")
        base = dict(provider=provider, mode="decode", B=batch, T=length, P=prefix, same_as_peft="")
        rows.append({**base, "metric": "time_per_token", "unit": "ms", "p50": ms, "p20": "", "p80": ""})
        rows.append({**base, "metric": f"time_{n2}_tokens", "unit": "ms", "p50": total, "p20": "", "p80": ""})
        rows.append({**base, "metric": "peak_bytes", "unit": "B", "p50": peak, "p20": "", "p80": ""})
    emit(rows[-3 * len(PROVIDERS) :])
    return rows


# ------------------------------------------------------------------------------------------------ output
def write_rows(rows: list[dict], path: str, device: str, threads: int) -> None:
    import peft
    import transformers

    import peft_kernels as pk

    fields = ["op", "provider", "mode", "metric", "unit", "B", "T", "P", "p50", "p20", "p80", "same_as_peft"]
    fields += ["device", "threads", "torch", "transformers", "peft", "peft_kernels", "git_sha", "timestamp"]
    extra = dict(
        op="prefix_kv",
        device=device,
        threads=threads,
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        peft_kernels=pk.__version__,
        git_sha=measure.git_sha(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )
    measure.append_rows(path, [{**extra, **row} for row in rows], fields)
    print(f"wrote {len(rows)} rows to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(CPU_SHAPES), help="BxTxP, CPU mode")
    parser.add_argument("--decode-tokens", nargs=2, type=int, default=(8, 24), metavar=("N1", "N2"))
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU mode)")
    parser.add_argument("--gpu", action="store_true", help="B=8, T=2048, P=32 on a CUDA device")
    parser.add_argument("--dry-run", action="store_true", help="print the GPU plan and exit")
    parser.add_argument("--out", default=None, help="append CSV rows here")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped
    if args.gpu or args.dry_run:
        print(gpu_plan(args))
        if args.dry_run:
            return
        device = torch.cuda.get_device_name()
        # rows are written per mode as they are measured (the GPU suite may kill this step)
        run_gpu(args, lambda rows: args.out and write_rows(rows, args.out, device, torch.get_num_threads()))
        return
    rows, device = run_cpu(args), platform.processor() or platform.machine() or "cpu"
    if args.out and rows:
        write_rows(rows, args.out, device, torch.get_num_threads())


if __name__ == "__main__":
    main()
