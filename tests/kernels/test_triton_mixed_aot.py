"""Ahead-of-time compile of the mixed-adapter kernels (backends/triton/lora_mixed.py) for sm_80 and sm_90.

Kept apart from test_triton_aot.py (the single-adapter kernels) so that each file states its own coverage. Every
declared config (decode and prefill, every rank block of the shrink) compiles for both architectures, within the
shared memory limit, and ``ptxas -v`` (the binary shipped inside the triton package) reports no register spills:
a spilling tile would run from local memory, far below the roofline these kernels are sized for.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pathlib
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peft_kernels.backends.triton import _configs, lora_mixed  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not isinstance(lora_mixed._mixed_shrink_kernel, triton.runtime.JITFunction),
        reason="TRITON_INTERPRET=1 replaces kernels with interpreted functions; AOT compile needs the JIT ones",
    ),
    pytest.mark.slow,
]

# Llama-class layer, 8 adapters, contiguous tensors.
_M, _N, _K, _ADAPTERS = 4096, 4096, 4096, 8
_PTX_VERSION = {80: "sm_80", 90: "sm_90a"}


def _args(kernel: str, xd: str, ad: str, rank_block: int) -> dict:
    if kernel == "mixed_shrink":
        return dict(
            x_ptr=f"*{xd}", a_ptr=f"*{ad}", g_ptr="*i32", s_ptr="*fp32",
            M=_M, K=_K, R=rank_block, n_adapters=_ADAPTERS, k_tiles_per_split=8,
            stride_xm=_K, stride_xk=1, stride_an=rank_block * _K, stride_ar=_K, stride_ak=1,
            stride_ss=_M * rank_block, stride_sm=rank_block, stride_sr=1,
            BLOCK_R=rank_block, ATOMIC=True,
        )  # fmt: skip
    return dict(
        x_ptr=f"*{xd}", w_ptr=f"*{xd}", bias_ptr=f"*{xd}", s_ptr="*fp32", b_ptr=f"*{ad}", bb_ptr=f"*{ad}",
        g_ptr="*i32", scale_ptr="*fp32", rank_ptr="*i32", y_ptr=f"*{xd}",
        M=_M, N=_N, K=_K, n_adapters=_ADAPTERS,
        stride_xm=_K, stride_xk=1, stride_wn=_K, stride_wk=1, stride_bias=1, stride_sm=rank_block, stride_sr=1,
        stride_bs=_N * rank_block, stride_bn=rank_block, stride_br=1, stride_bbs=_N, stride_bbn=1,
        stride_ym=_N, stride_yn=1,
        LORA_CHUNK=_configs.LORA_CHUNK, HAS_BIAS=True, HAS_LORA_BIAS=True,
    )  # fmt: skip


def compile_mixed(kernel: str, cap: int, xd: str, ad: str, rank_block: int, config: triton.Config):
    """triton.compile of lora_mixed.KERNELS[kernel] for sm_<cap>, specialised as the runtime would."""
    fn = lora_mixed.KERNELS[kernel]
    values = {**_args(kernel, xd, ad, rank_block), **config.kwargs, "PREC": "tf32x3", "UPCAST": False}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        v = values[param.name]
        if param.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[param.name] = "constexpr"
            constexprs[param.name] = v
        elif isinstance(v, str):
            signature[param.name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)


def ptxas_usage(ptx: str, cap: int) -> tuple[int, int]:
    """(registers per thread, spill stores + loads in bytes) from ``ptxas -v`` on the compiled PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(cap).path  # the ptxas Triton itself runs for this architecture (shipped in the package)
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={_PTX_VERSION[cap]}", str(src), "-o", str(pathlib.Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = proc.stdout + proc.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return regs, int(spill.group(1)) + int(spill.group(2))


def all_jobs() -> list[tuple]:
    """(kernel, cap, x dtype, adapter dtype, rank block, bucket, config kwargs, warps, stages) for every compile.

    Every declared config once per architecture in bf16, at the largest rank block it serves (the widest
    accumulator); fp32 adapters on bf16 activations (split-operand dots, twice the dot count) at each kernel's
    decode config, the smallest and largest rank.
    """
    jobs = []
    for cap in (80, 90):
        for bucket, config in lora_mixed.MIXED_FWD_CONFIGS.items():
            jobs.append(("linear_lora_mixed", cap, "bf16", "bf16", 64, bucket, config))
            jobs.append(("linear_lora_mixed", cap, "bf16", "fp32", 64, bucket, config))
        for bucket, per_rank in lora_mixed.MIXED_SHRINK_CONFIGS.items():
            largest: dict[tuple, tuple[int, triton.Config]] = {}
            for rank_block, config in per_rank.items():
                key = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
                if key not in largest or largest[key][0] < rank_block:
                    largest[key] = (rank_block, config)
            for rank_block, config in largest.values():
                jobs.append(("mixed_shrink", cap, "bf16", "bf16", rank_block, bucket, config))
        for rank_block in (16, 256):
            config = lora_mixed.MIXED_SHRINK_CONFIGS["decode"][rank_block]
            jobs.append(("mixed_shrink", cap, "bf16", "fp32", rank_block, "decode", config))
    return [
        (k, cap, xd, ad, rb, b, tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        for k, cap, xd, ad, rb, b, c in jobs
    ]


def _job(job):
    kernel, cap, xd, ad, rank_block, _bucket, kwargs, warps, stages = job
    try:
        config = triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)
        compiled = compile_mixed(kernel, cap, xd, ad, rank_block, config)
        regs, spills = ptxas_usage(compiled.asm["ptx"], cap)
        return job, compiled.metadata.shared, regs, spills, None
    except Exception as exc:  # every failure reported, not just the first
        return job, None, None, None, f"{type(exc).__name__}: {str(exc)[:400]}"


def test_mixed_configs_are_declared_for_both_buckets():
    assert set(lora_mixed.MIXED_FWD_CONFIGS) == {"decode", "prefill"}
    assert set(lora_mixed.MIXED_SHRINK_CONFIGS) == {"decode", "prefill"}
    for per_rank in lora_mixed.MIXED_SHRINK_CONFIGS.values():
        assert set(per_rank) == set(_configs.RANK_BLOCKS)
    assert lora_mixed.bucket(64) == "decode" and lora_mixed.bucket(65) == "prefill"


def test_mixed_kernels_compile_fit_shared_memory_and_do_not_spill():
    jobs = all_jobs()
    ctx = multiprocessing.get_context("spawn")
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        results = list(pool.map(_job, jobs))
    failures, table = [], []
    for job, shared, regs, spills, error in results:
        kernel, cap, xd, ad, rank_block, bucket, kwargs, warps, stages = job
        label = f"{kernel} sm_{cap} x={xd} adapters={ad} R={rank_block} {bucket} {dict(kwargs)} w{warps} s{stages}"
        if error is not None:
            failures.append(f"{label}: {error}")
            continue
        table.append(f"{label}: {regs} registers, {spills} B spilled, {shared} B shared")
        if shared > _configs.SHARED_MEMORY_LIMIT[cap]:
            failures.append(f"{label}: shared memory {shared} B > {_configs.SHARED_MEMORY_LIMIT[cap]} B")
        if spills:
            failures.append(f"{label}: {spills} B of register spills")
    print("\n".join(table))
    assert not failures, "\n".join(failures)
