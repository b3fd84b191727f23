"""Registers, spills, stack and shared memory of every Triton LoRA kernel variant, from an ahead-of-time compile.

No GPU needed: each variant is compiled with ``triton.compile`` for sm_80 / sm_90 exactly as
tests/kernels/test_triton_aot.py does (same specialisation, same variant lists), then ``ptxas -v`` (Triton's own)
reports registers, spill bytes and stack, and Triton's metadata the shared memory. ``--sass`` adds the dropout
cost: SASS instructions per iteration of the main loop (the loop holding the MMAs), dropout off vs on, read from
the SASS Triton's bundled cuobjdump/nvdisasm produce.

    python benchmarks/kernel_resources.py                      # docs/KERNEL_RESOURCES.md, every variant (slow)
    python benchmarks/kernel_resources.py --set gemm-large     # a subset, printed only
    python benchmarks/kernel_resources.py --workers 2 --out docs/KERNEL_RESOURCES.md

Static numbers only: nothing here was run on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))  # the AOT test's compile helpers and variant lists
sys.path.insert(0, ROOT)

import test_triton_aot as aot  # noqa: E402
import triton  # noqa: E402
from test_dropout_sass import MASK_KERNEL_ARGS, dropout_pairs, mask_kernel_job, pool_map, sass_job  # noqa: E402

from peft_kernels.backends.triton import _configs  # noqa: E402


def variant_sets() -> dict[str, list]:
    gated = aot.gated_variants()
    return {
        "all": gated + aot.fp32_variants(),
        "gated": gated,
        "gemm-large": [
            v for v in gated if v.op in _configs.GEMM_OPS and v.cap == 90 and dict(v.kwargs)["BLOCK_M"] >= 64
        ],
        "ci": aot.ci_variants(),
        "audit": audit_variants(),
    }


def audit_variants() -> list:
    """The headline form on sm_90 (bf16 x, fp32 adapters, R = 16): F2 and B2 at their large tiles with 16-bit and
    int8 weights (B2 with dropout at the tile the autotuner may pick for it), F1/B1/B3 at R = 16."""
    out = []
    for config in aot.declared_gemm_configs("linear_lora_fwd", 90):
        if config.kwargs["BLOCK_M"] < 128 and config.kwargs["BLOCK_N"] < 256:
            continue
        for op in _configs.GEMM_OPS:
            for int8 in (False, True):
                for dropout in (False, True) if op == "linear_lora_bwd_dx" else (False,):
                    if _configs.pickable(config, dropout, int8) and not (
                        int8 and op == "linear_lora_bwd_dx" and not dropout
                    ):
                        out.append(aot._variant(op, 90, "bf16", "fp32", 16, config, dropout, int8))
    for op in _configs.MEMORY_BOUND_OPS:
        out.append(
            aot._variant(op, 90, "bf16", "fp32", 16, _configs.heuristic_config(op, 16), op != "lora_bwd_dys_dyb")
        )
    return out


def _sass_job(v):
    """``sass_job`` with its failure and wall time recorded, as ``aot._resources_job`` does."""
    start = time.perf_counter()
    try:
        return (*sass_job(v), None, time.perf_counter() - start)
    except Exception as exc:
        return v, None, f"{type(exc).__name__}: {str(exc)[:300]}", time.perf_counter() - start


def _cfg_text(v) -> str:
    kw = dict(v.kwargs)
    blocks = "×".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in kw)
    return f"{blocks} w{v.warps}s{v.stages}"


def resource_table(results) -> list[str]:
    rows = [
        "| kernel | sm | W | x / adapters | R | tile (BM×BN×BK) warps, stages | dropout | regs | spill st/ld B | stack B "
        "| smem B | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, res, err, sec in sorted(results, key=lambda r: (r[0].op, r[0].cap, r[0].int8, r[0].xd, r[0].ad, r[0].rank)):
        w = "int8" if v.int8 else "16-bit" if v.xd != "fp32" else "fp32"
        head = f"| {v.op} | {v.cap} | {w} | {v.xd} / {v.ad} | {_configs.rank_block(v.rank)} | {_cfg_text(v)} | "
        head += f"{'p>0' if v.dropout else '–'} |"
        if err is not None:
            rows.append(f"{head} compile failed: {err[:80]} | | | | | {sec:.1f} |")
            continue
        spill = f"{res['spill_stores']}/{res['spill_loads']}"
        if res["spill_stores"] or res["spill_loads"]:
            spill = f"**{spill}**"
        rows.append(f"{head} {res['regs']} | {spill} | {res['stack']} | {res['shared']} | {sec:.1f} |")
    return rows


def sass_table(results) -> list[str]:
    rows = [
        "| kernel | sm | tile | dropout | main-loop SASS instr/iter | ratio p>0 / p=0 | LDL/STL in main loop | "
        "whole kernel SASS instr | regs | spill st/ld B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {}
    for v, res, err, _sec in results:
        if err is None and not v.dropout:
            base[(v.op, v.cap)] = res
    for v, res, err, _sec in results:
        if err is not None:
            rows.append(f"| {v.op} | {v.cap} | {_cfg_text(v)} | {v.dropout} | failed: {err[:80]} | | | | | |")
            continue
        ref = base.get((v.op, v.cap))
        ratio = f"{res['instr'] / ref['instr']:.2f}×" if (v.dropout and ref and ref["instr"]) else "1"
        rows.append(
            f"| {v.op} | {v.cap} | {_cfg_text(v)} | {'p>0' if v.dropout else 'p=0'} | {res['instr']} | {ratio} | "
            f"{res['ldl']}/{res['stl']} | {res['total_instr']} | {res['regs']} | "
            f"{res['spill_stores']}/{res['spill_loads']} |"
        )
    return rows


def mask_kernel_rows(results) -> list[str]:
    rows = [
        "| kernel | sm | tile | regs | spill st/ld B | smem B | whole kernel SASS instr | elements per thread "
        "| SASS instr per element |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cap, res, per_thread in results:
        tile = f"{MASK_KERNEL_ARGS['BLOCK_M']}×{MASK_KERNEL_ARGS['BLOCK_W'] * 32} w4"
        rows.append(
            f"| lora_dropout_bits | {cap} | {tile} | {res['regs']} | {res['spill_stores']}/{res['spill_loads']} | "
            f"{res['shared']} | {res['total_instr']} | {per_thread} | {res['total_instr'] / per_thread:.1f} |"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--set", default="all", choices=("all", "gated", "gemm-large", "ci", "audit"), help="which variants"
    )
    parser.add_argument(
        "--sass", action="store_true", help="also the dropout SASS comparison (on by default with --out)"
    )
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/KERNEL_RESOURCES.md)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    variants = variant_sets()[args.set]
    print(f"compiling {len(variants)} variants with {args.workers} workers ...", flush=True)
    results = aot.compile_all(variants, args.workers)
    sass_results = pool_map(_sass_job, dropout_pairs(), args.workers) if (args.sass or args.out) else []
    mask_results = pool_map(mask_kernel_job, [80, 90], args.workers) if sass_results else []
    elapsed = time.perf_counter() - start

    failed = [r for r in results if r[2] is not None]
    spilling = [r for r in results if r[2] is None and (r[1]["spill_stores"] or r[1]["spill_loads"])]
    gated_spills = [r for r in spilling if aot.is_gated(r[0])]
    by_kernel = collections.Counter(r[0].op for r in results)
    lines = [
        "# Triton kernel resources (static, generated)",
        "",
        f"Generated by `python benchmarks/kernel_resources.py --set {args.set} --out docs/KERNEL_RESOURCES.md`; do not"
        " edit by hand (`--set ci`: the CI gate's variants; `--set all`: every variant). Every",
        "number comes from an ahead-of-time compile on a CPU machine (`triton.compile` for the target, then the",
        "`ptxas -v` Triton ships); **none is a GPU measurement**. The same variant lists and the same compile are",
        "what `tests/kernels/test_triton_aot.py` gates CI on (no spill store or load in any bf16/fp16 variant).",
        "",
        f"- triton {triton.__version__}, ptxas `{os.path.basename(aot.ptxas_path(90))}` for sm_90 / "
        f"`{os.path.basename(aot.ptxas_path(80))}` for sm_80; generated {datetime.date.today().isoformat()} in "
        f"{elapsed / 60:.1f} min with {args.workers} workers (compile s: wall time of one compile on a shared box).",
        f"- {len(results)} variants ({', '.join(f'{k} {n}' for k, n in sorted(by_kernel.items()))}); "
        f"{len(failed)} failed to compile; {len(spilling)} spill, of which {len(gated_spills)} are gated "
        "(bf16/fp16 models).",
        "- W: the weight format of F2/B2 (16-bit, or int8 = W8A16 with `IS_INT8`); x / adapters: activation and "
        "LoRA A/B dtypes; R: padded rank (the GEMM kernels loop over rank chunks of 16, so R does not change them);",
        "  dropout p>0: the kernel reads the packed mask (F1, B2, B3). fp32 models halve BLOCK_K (`for_element_size`); they",
        "  are listed, not gated: their base GEMM runs at torch's fp32 precision (tf32x3 by default).",
        "- Kernels: `lora_shrink` F1, `linear_lora_fwd` F2, `lora_bwd_dys_dyb` B1, `linear_lora_bwd_dx` B2, "
        "`lora_bwd_da` B3.",
        "",
    ]
    if sass_results:
        lines += [
            "## Dropout cost in SASS (main loop = the loop holding the MMAs; per thread, per iteration)",
            "",
            "bf16 x, fp32 adapters, R = 16. With p > 0 a mask kernel first evaluates the Philox spec once per",
            "element of x into a packed bitmask (1 bit per element, int32 words [M, ceil(K/32)]); F1 and B3 read",
            "one word per 32 elements of x and mask two 16-bit elements with a shift, an AND, a multiply and an",
            "AND. B2 masks its LoRA tile once per output tile before its K loop, so its main loop is unchanged by",
            "dropout and the cost shows in the whole-kernel count. Gate: tests/kernels/test_dropout_sass.py",
            "(ratio <= 1.5, no LDL/STL in the main loop).",
            "",
            *sass_table(sass_results),
            "",
            "The mask kernel (`dropout.dropout_bits`, no main loop: each program draws one 32×128 tile, one word of",
            "32 elements per thread; Philox4x32-10 once per 4 elements, one integer compare and an OR per element):",
            "",
            *mask_kernel_rows(mask_results),
            "",
        ]
    lines += ["## Every variant", "", *resource_table(results), ""]
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    for v, _res, err, _sec in failed:
        print(f"FAILED {v.label()}: {err}", file=sys.stderr)
    for v, res, _err, _sec in gated_spills:
        print(f"SPILL {v.label()}: {res}", file=sys.stderr)
    return 1 if failed or gated_spills else 0


if __name__ == "__main__":
    sys.exit(main())
