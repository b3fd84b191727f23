"""Dropout at near-zero cost, checked in SASS without a GPU (sm_90, ahead-of-time compile as test_triton_aot.py).

F1 (shrink) and B3 (dA) touch every element of x once; they read the packed keep mask of ``dropout.dropout_bits``
(one int32 word per 32 columns) instead of drawing Philox. The gate: per iteration of each kernel's main loop (the
loop holding the MMAs), the SASS instruction count with dropout is at most ``MAX_DROPOUT_RATIO`` times the count
without, and the loop has no local-memory load or store (LDL/STL, a spill); B2 (dx) applies the mask once per
output tile, so its main loop must stay within the same bound. The mask kernel itself compiles without a spill on
sm_80 and sm_90. ``benchmarks/kernel_resources.py --sass`` prints the same numbers into docs/KERNEL_RESOURCES.md.
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

import test_triton_aot as aot  # noqa: E402

from peft_kernels.backends.triton import _configs, dropout  # noqa: E402

pytestmark = aot.pytestmark  # JIT kernels only (not under TRITON_INTERPRET=1)

MAX_DROPOUT_RATIO = 1.5

_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_LABEL = re.compile(r"^(\.?L\w+):")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(\.?L\w+)")


def main_loop(sass: str) -> dict:
    """{instr, ldl, stl, mma, total_instr, loops} of the loop with the most MMA instructions (a label and a
    backward branch to it); instr counts the SASS instructions between them, i.e. per iteration."""
    labels, instr_index, loops = {}, 0, []
    body: list[str] = []
    for ln in (line.strip() for line in sass.splitlines()):
        m = _LABEL.match(ln)
        if m:
            labels[m.group(1)] = instr_index
            continue
        if not ln or ln.startswith(("Function", ".", "//")):
            continue
        body.append(ln)
        b = _BRANCH.search(ln)
        if b and b.group(1) in labels and labels[b.group(1)] <= instr_index:
            loops.append((labels[b.group(1)], instr_index))
        instr_index += 1
    best = None
    for start, end in loops:
        chunk = body[start : end + 1]
        mma = sum(bool(_MMA.search(x)) for x in chunk)
        if best is None or mma > best["mma"]:
            best = {
                "instr": len(chunk),
                "mma": mma,
                "ldl": sum(" LDL" in f" {x}" for x in chunk),
                "stl": sum(" STL" in f" {x}" for x in chunk),
            }
    return {**(best or {"instr": 0, "mma": 0, "ldl": 0, "stl": 0}), "total_instr": len(body), "loops": len(loops)}


def dropout_pairs() -> list:
    """(kernel, config) compiled with dropout off and on, sm_90, bf16 x, fp32 adapters: F1 and B3 at R = 16 (the
    benchmark's rank), B2 at the large tile it may autotune to with dropout."""
    out = []
    for op in ("lora_shrink", "lora_bwd_da"):
        cfg = _configs.heuristic_config(op, 16)
        out += [aot._variant(op, 90, "bf16", "fp32", 16, cfg, d) for d in (False, True)]
    cfg = _configs._gemm(128, 128, 64, 8, 8, 3)
    out += [aot._variant("linear_lora_bwd_dx", 90, "bf16", "fp32", 16, cfg, d) for d in (False, True)]
    return out


# The mask kernel at its launch tile, for a 4096 x 4096 x: one program per 32 rows x 4 words (128 columns).
MASK_KERNEL_ARGS = dict(
    seed_ptr="*i64", bits_ptr="*i32", M=4096, K=4096, threshold=dropout.keep_threshold(0.1), stride_bm=128,
    BLOCK_M=dropout._BITS_BLOCK_M, BLOCK_W=dropout._BITS_BLOCK_W,
)  # fmt: skip
MASK_KERNEL_WARPS = 4  # Triton's default num_warps, which dropout_bits launches with


def mask_kernel_job(cap: int):
    """(cap, ptxas resources + SASS counts, elements per thread) of the mask kernel for sm_<cap>."""
    config = triton.Config({}, num_warps=MASK_KERNEL_WARPS, num_stages=3)
    compiled = aot.compile_jit(dropout._lora_dropout_bits_kernel, dict(MASK_KERNEL_ARGS), config, cap)
    res = aot.ptxas_resources(compiled, cap)
    res.update(main_loop(compiled.asm["sass"]))
    per_thread = MASK_KERNEL_ARGS["BLOCK_M"] * MASK_KERNEL_ARGS["BLOCK_W"] * 32 // (32 * MASK_KERNEL_WARPS)
    return cap, res, per_thread


def sass_job(v):
    """Pool worker: (variant, ptxas resources + main-loop counts)."""
    compiled = aot.compile_variant(v)
    res = aot.ptxas_resources(compiled, v.cap)
    res.update(main_loop(compiled.asm["sass"]))
    return v, res


pool_map = aot.pool_map  # kernel_resources.py imports it from here


def test_main_loop_parser_on_a_synthetic_listing():
    """The parser finds the loop with the MMAs and counts its spills (a synthetic listing)."""
    sass = "\n".join(
        ["Function : k", ".L_x_0:", "IMAD R1, R2, R3, RZ ;", "LDL R4, [R1] ;", "HGMMA.64x16x16.F32.BF16 R24, R40 ;",
         "STL [R1], R4 ;", "@P0 BRA `(.L_x_0) ;", "EXIT ;"]
    )  # fmt: skip
    assert main_loop(sass) == {"instr": 5, "mma": 1, "ldl": 1, "stl": 1, "total_instr": 6, "loops": 1}


def test_dropout_costs_at_most_1_5x_in_the_main_loop():
    results = pool_map(sass_job, dropout_pairs())
    base = {v.op: res for v, res in results if not v.dropout}
    failures, report = [], []
    for v, res in results:
        if not v.dropout:
            continue
        ratio = res["instr"] / base[v.op]["instr"]
        report.append(f"{v.op}: {base[v.op]['instr']} -> {res['instr']} instr/iter ({ratio:.2f}x)")
        assert res["mma"] > 0 and base[v.op]["mma"] == res["mma"], (v.op, res, base[v.op])
        if ratio > MAX_DROPOUT_RATIO:
            failures.append(f"{v.label()}: main loop {ratio:.2f}x > {MAX_DROPOUT_RATIO}x")
        if res["ldl"] or res["stl"]:
            failures.append(f"{v.label()}: {res['ldl']} LDL / {res['stl']} STL in the main loop")
    assert not failures, "\n".join(failures + report)


def test_mask_kernel_compiles_without_spills():
    for cap, res, _per_thread in pool_map(mask_kernel_job, [80, 90]):
        assert not (res["spill_stores"] or res["spill_loads"]), (cap, res)
        assert res["shared"] <= _configs.SHARED_MEMORY_LIMIT[cap], (cap, res)
