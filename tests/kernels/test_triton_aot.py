"""Ahead-of-time compile of every Triton LoRA kernel for sm_80 and sm_90, on a machine without a GPU.

What it catches that the interpreter runs silently (KERNELS.md §11): dot operand dtype mismatches, 16-bit dots with
K < 16 (the unpadded-rank trap), fp32 dots without a valid input_precision, constexpr branches that only break when
lowered, and configs whose shared memory exceeds the architecture's limit (``compiled.metadata.shared`` against
``_configs.SHARED_MEMORY_LIMIT``).

Coverage, sized for ~2 minutes on 2 cores with a cold Triton cache (one compile takes 1-9 s, mostly LLVM):
- every declared config of every kernel, for sm_80 and sm_90 (GEMMs: each capability's lists; memory-bound
  kernels: each distinct config at the largest rank it serves), in the dtype with the largest shared-memory
  footprint on that architecture (``_SWEEP_DTYPE``); the DEFAULT GEMM lists for sm_86 against its 99 KiB;
- every kernel with dropout on, in bf16 and fp16 with fp32 adapters (the split-operand dots next to plain 16-bit
  ones), with its smallest config, on sm_90 and sm_80 (``_DTYPE_SWEEP``). fp32 and 16-bit-only adapters are
  lowered by the config sweeps.
Compiles run in a process pool (one per core, at most 4); failures are collected and reported together.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peft_kernels.backends.triton import _configs, lora  # noqa: E402

pytestmark = pytest.mark.skipif(
    not isinstance(lora._lora_shrink_kernel, triton.runtime.JITFunction),
    reason="TRITON_INTERPRET=1 replaces kernels with interpreted functions; AOT compile needs the JIT ones",
)

# Realistic launch arguments: Llama-class sizes, contiguous tensors (unit strides become constexpr 1 at runtime,
# which is what the specialisation below mirrors), dropout on, atomics on.
_M = _N = _K = 4096


def _example_args(op: str, xd: str, ad: str, rank: int) -> dict:
    r = rank
    if op == "lora_shrink":
        return dict(
            x_ptr=f"*{xd}", a_ptr=f"*{ad}", s_ptr="*fp32", seed_ptr="*i64",
            M=_M, K=_K, r=r, k_tiles_per_split=16, p=0.1, inv_keep=1 / 0.9,
            stride_xm=_K, stride_xk=1, stride_ar=_K, stride_ak=1, stride_ss=_M * r, stride_sm=r, stride_sr=1,
            BLOCK_R=_configs.rank_block(r), HAS_DROPOUT=True, ATOMIC=True,
        )  # fmt: skip
    if op == "linear_lora_fwd":
        return dict(
            x_ptr=f"*{xd}", w_ptr=f"*{xd}", wscale_ptr="*fp32", bias_ptr=f"*{xd}", s_ptr="*fp32", b_ptr=f"*{ad}",
            bb_ptr=f"*{ad}", y_ptr=f"*{xd}", M=_M, N=_N, K=_K, r=r, scaling=2.0,
            stride_xm=_K, stride_xk=1, stride_wn=_K, stride_wk=1, stride_ws=1, stride_bias=1, stride_sm=r,
            stride_sr=1, stride_bn=r, stride_br=1, stride_bb=1, stride_ym=_N, stride_yn=1,
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_BIAS=True, HAS_LORA_BIAS=True, IS_INT8=False,
        )  # fmt: skip
    if op == "lora_bwd_dys_dyb":
        return dict(
            dy_ptr=f"*{xd}", b_ptr=f"*{ad}", s_ptr="*fp32", ds_ptr="*fp32", db_ptr="*fp32",
            M=_M, N=_N, r=r, n_tiles_per_split=8, scaling=2.0,
            stride_dym=_N, stride_dyn=1, stride_bn=r, stride_br=1, stride_sm=r, stride_sr=1,
            stride_dss=_M * r, stride_dsm=r, stride_dbs=_N * r, stride_dbn=r,
            BLOCK_R=_configs.rank_block(r), NEED_DB=True, ATOMIC_DS=True, ATOMIC_DB=True,
        )  # fmt: skip
    if op == "linear_lora_bwd_dx":
        return dict(
            dy_ptr=f"*{xd}", w_ptr=f"*{xd}", wscale_ptr="*fp32", ds_ptr="*fp32", a_ptr=f"*{ad}", seed_ptr="*i64",
            dx_ptr=f"*{xd}", M=_M, N=_N, K=_K, r=r, p=0.1, inv_keep=1 / 0.9,
            stride_dym=_N, stride_dyn=1, stride_wn=_K, stride_wk=1, stride_ws=1, stride_dsm=r, stride_dsr=1,
            stride_ar=_K, stride_ak=1, stride_dxm=_K, stride_dxk=1,
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_DROPOUT=True, IS_INT8=False,
        )  # fmt: skip
    if op == "lora_bwd_da":
        return dict(
            x_ptr=f"*{xd}", ds_ptr="*fp32", seed_ptr="*i64", da_ptr="*fp32",
            M=_M, K=_K, r=r, m_tiles_per_split=8, p=0.1, inv_keep=1 / 0.9,
            stride_xm=_K, stride_xk=1, stride_dsm=r, stride_dsr=1, stride_das=r * _K, stride_dar=_K,
            BLOCK_R=_configs.rank_block(r), HAS_DROPOUT=True, ATOMIC=True,
        )  # fmt: skip
    raise KeyError(op)


def compile_kernel(
    op: str, cap: int, xd: str, ad: str, rank: int, config: triton.Config, dropout: bool = True, overrides=None
):
    """triton.compile of lora.KERNELS[op] for sm_<cap>, specialised as the runtime would for these arguments
    (``overrides`` replaces example arguments, e.g. the int8 variant's ``w_ptr="*i8", IS_INT8=True``)."""
    kernel = lora.KERNELS[op]
    values = {
        **_example_args(op, xd, ad, rank),
        **(overrides or {}),
        **config.kwargs,
        "PREC": "tf32x3",
        "UPCAST": False,
    }
    if "HAS_DROPOUT" in values:
        values["HAS_DROPOUT"] = dropout
    return compile_jit(kernel, values, config, cap)


def compile_jit(kernel, values: dict, config: triton.Config, cap: int):
    """triton.compile of a JIT kernel for sm_<cap> with ``values`` for every parameter, specialised as the runtime
    would (integers equal to 1 become constants, pointers and multiples of 16 get divisibility 16)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(kernel.params):
        v = values[param.name]
        if param.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            # Triton specialises integer arguments equal to 1 into constants.
            signature[param.name] = "constexpr"
            constexprs[param.name] = v
        elif isinstance(v, str):  # pointer, 16-byte aligned as torch allocations are
            signature[param.name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32" if v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)


def _job(job):
    """Pool worker: (job, shared bytes or None, error text or None, seconds)."""
    op, cap, xd, ad, rank, kwargs, warps, stages, dropout = job
    config = triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)
    start = time.perf_counter()
    try:
        compiled = compile_kernel(op, cap, xd, ad, rank, config, dropout)
        return job, compiled.metadata.shared, None, time.perf_counter() - start
    except Exception as exc:  # every failure is reported, not just the first
        return job, None, f"{type(exc).__name__}: {str(exc)[:400]}", time.perf_counter() - start


def _make_job(op, cap, xd, ad, rank, config, dropout):
    kwargs = tuple(sorted(config.kwargs.items()))
    return (op, cap, xd, ad, rank, kwargs, config.num_warps, config.num_stages, dropout)


def _memory_bound_by_config(op: str) -> list[tuple[int, triton.Config]]:
    """Each distinct declared config once, at the largest rank block it serves (the largest footprint)."""
    best: dict[tuple, tuple[int, triton.Config]] = {}
    for rank_block, config in _configs.declared_memory_bound_configs(op):
        key = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
        if key not in best or best[key][0] < rank_block:
            best[key] = (rank_block, config)
    return list(best.values())


# The dtype sweep: each kernel with dropout on, in its smallest config (dtype legality does not depend on the tile),
# with fp32 adapters on 16-bit activations (the split-operand dots next to plain 16-bit ones), on both architectures.
_DTYPE_SWEEP = ((90, "bf16", "fp32"), (80, "fp16", "fp32"))
# Config sweeps: the dtype with the largest shared-memory footprint per architecture (measured on F2: fp32 with
# BLOCK_K halved exceeds bf16 on sm_90, e.g. 184 vs 160 KiB for (64, 256, 64), and equals it on sm_80; sm_86 is
# lowered like sm_80).
_SWEEP_DTYPE = {80: ("bf16", "bf16"), 86: ("bf16", "bf16"), 90: ("fp32", "fp32")}


def _sweep_configs(configs, cap):
    return _configs.for_element_size(configs, 4 if _SWEEP_DTYPE[cap][0] == "fp32" else 2)


def all_jobs() -> list[tuple]:
    """(op, cap, x dtype, adapter dtype, rank, config kwargs, warps, stages, dropout) for every compile."""
    jobs = []
    # Shared memory does not depend on HAS_DROPOUT (Philox is register arithmetic; measured equal on B2's
    # (128, 256, 64) tile), and the Philox code triples LLVM time on large tiles, so the sweeps compile without it.
    for cap in (80, 90, 86):
        xd, ad = _SWEEP_DTYPE[cap]
        for op in _configs.GEMM_OPS:
            for config in _sweep_configs(_configs.declared_gemm_configs(op, cap), cap):
                jobs.append(_make_job(op, cap, xd, ad, 64, config, dropout=False))
        if cap == 86:
            continue  # the memory-bound configs are the same on every GPU and small (< 64 KiB)
        for op in _configs.MEMORY_BOUND_OPS:
            for rank_block, config in _memory_bound_by_config(op):
                jobs.append(_make_job(op, cap, xd, ad, rank_block, config, dropout=False))
    for cap, xd, ad in _DTYPE_SWEEP:
        for op in _configs.GEMM_OPS:
            config = min(
                _configs.declared_gemm_configs(op, cap), key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
            )
            jobs.append(_make_job(op, cap, xd, ad, 17, config, dropout=True))
        for op in _configs.MEMORY_BOUND_OPS:
            config = _configs.heuristic_config(op, _configs.rank_block(17))
            jobs.append(_make_job(op, cap, xd, ad, 17, config, dropout=True))
    return jobs


def test_declared_lists_are_well_formed():
    for op in _configs.GEMM_OPS:
        for cap in (80, 86, 90):
            configs = _configs.declared_gemm_configs(op, cap)
            assert configs, (op, cap)
            for c in configs:
                assert set(c.kwargs) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}, c
                assert c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16 and c.kwargs["BLOCK_K"] >= 16, c
        for bucket in _configs.M_BUCKETS:
            # An unknown GPU gets defaults, never an error (KERNELS.md §10.6).
            assert _configs.cuda_configs(op, (12, 0), 2, bucket)
            assert _configs.cuda_configs(op, None, 4, bucket)
            assert _configs.hip_configs(op, 2, bucket)
    for op in _configs.MEMORY_BOUND_OPS:
        for rank_block in _configs.RANK_BLOCKS:
            c = _configs.heuristic_config(op, rank_block)
            assert min(c.kwargs.values()) >= 16, (op, rank_block, c)
    assert [_configs.rank_block(r) for r in (1, 8, 16, 17, 64, 65, 256)] == [16, 16, 16, 32, 64, 128, 256]


def test_every_kernel_config_compiles_and_fits_shared_memory():
    jobs = all_jobs()
    workers = max(1, min(4, os.cpu_count() or 1))
    start = time.perf_counter()
    # spawn: workers must not inherit a forked torch/triton state.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        results = list(pool.map(_job, jobs))
    elapsed = time.perf_counter() - start
    failures = []
    for job, shared, error, _seconds in results:
        op, cap, xd, ad, rank, kwargs, warps, stages, dropout = job
        label = (
            f"{op} sm_{cap} x={xd} adapters={ad} R={_configs.rank_block(rank)} dropout={dropout} {dict(kwargs)} "
            f"w{warps} s{stages}"
        )
        if error is not None:
            failures.append(f"{label}: compile failed: {error}")
        elif shared > _configs.SHARED_MEMORY_LIMIT[cap]:
            failures.append(f"{label}: shared memory {shared} B > limit {_configs.SHARED_MEMORY_LIMIT[cap]} B")
    assert not failures, f"{len(failures)} of {len(jobs)} compiles failed ({elapsed:.0f} s):\n" + "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# QLoRA kernels (backends/triton/lora_4bit.py): every kernel × declared config for sm_80 and sm_90 (bf16, nested
# scales, dropout on: the largest variant), and each kernel in fp16 with fp32 adapters and in fp32 with its first
# config. F1, B1 and B3 are lora.py's, compiled above.
# ---------------------------------------------------------------------------------------------------------------


def _example_args_4bit(kind: str, xd: str, ad: str) -> dict:
    r = 16
    quant = dict(p_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8", nabs_ptr="*fp32", ncode_ptr="*fp32",
                 offset_ptr="*fp32", blocksize=64, nested_blocksize=256, NESTED=True)  # fmt: skip
    if kind == "fwd":
        return dict(
            x_ptr=f"*{xd}", **quant, bias_ptr=f"*{xd}", s_ptr="*fp32", b_ptr=f"*{ad}", bb_ptr=f"*{ad}",
            y_ptr=f"*{xd}", M=_M, N=_N, K=_K, r=r, scaling=2.0, stride_xm=_K, stride_xk=1, stride_sm=r,
            stride_sr=1, stride_bn=r, stride_br=1, stride_ym=_N, stride_yn=1, LORA_CHUNK=_configs.LORA_CHUNK,
            HAS_BIAS=True, HAS_LORA_BIAS=True, PREC="tf32x3", UPCAST=False,
        )  # fmt: skip
    if kind == "gemv":
        return dict(
            x_ptr=f"*{xd}", **quant, bias_ptr=f"*{xd}", s_ptr="*fp32", b_ptr=f"*{ad}", bb_ptr=f"*{ad}",
            y_ptr=f"*{xd}", N=_N, K=_K, r=r, scaling=2.0, stride_xm=_K, stride_xk=1, stride_sm=r, stride_sr=1,
            stride_bn=r, stride_br=1, stride_ym=_N, stride_yn=1, HAS_BIAS=True, HAS_LORA_BIAS=True,
        )  # fmt: skip
    if kind == "bwd_dx":
        return dict(
            dy_ptr=f"*{xd}", **quant, ds_ptr="*fp32", a_ptr=f"*{ad}", seed_ptr="*i64",
            dx_ptr=f"*{xd}", M=_M, N=_N, K=_K, r=r, p=0.1, inv_keep=1 / 0.9, stride_dym=_N, stride_dyn=1,
            stride_dsm=r, stride_dsr=1, stride_ar=_K, stride_ak=1, stride_dxm=_K, stride_dxk=1,
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_DROPOUT=True, PREC="tf32x3", UPCAST=False,
        )  # fmt: skip
    raise KeyError(kind)


def _job_4bit(job):
    """Pool worker: (job, shared bytes or None, error text or None)."""
    from peft_kernels.backends.triton import lora_4bit as tri4

    kind, cap, xd, ad, kwargs, warps, stages = job
    config = triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)
    try:
        values = {**_example_args_4bit(kind, xd, ad), **config.kwargs}
        return job, compile_jit(tri4.KERNELS[kind], values, config, cap).metadata.shared, None
    except Exception as exc:  # every failure is reported, not just the first
        return job, None, f"{type(exc).__name__}: {str(exc)[:400]}"


def jobs_4bit() -> list[tuple]:
    from peft_kernels.backends.triton import lora_4bit as tri4

    jobs = []
    for kind, configs in tri4.CONFIGS.items():
        for cap in (80, 90):
            for config in configs:
                jobs.append((kind, cap, "bf16", "bf16", tuple(sorted(config.kwargs.items())), config.num_warps,
                             config.num_stages))  # fmt: skip
        # One dtype variant per kernel (each compile costs seconds on the 2-core CI box): fp32 on sm_80 for the
        # forward, 16-bit activations with fp32 adapters (split-operand dots) on sm_90 for the others.
        for cap, xd, ad in [(80, "fp32", "fp32")] if kind == "fwd" else [(90, "fp16", "fp32")]:
            config = configs[0]
            if xd == "fp32" and "BLOCK_M" in config.kwargs:  # fp32 operands: half the reduction tile (_configs)
                config = _configs.for_element_size([config], 4)[0]
            jobs.append((kind, cap, xd, ad, tuple(sorted(config.kwargs.items())), config.num_warps,
                         config.num_stages))  # fmt: skip
    return jobs


def test_qlora_kernels_compile_and_fit_shared_memory():
    jobs = jobs_4bit()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, min(4, os.cpu_count() or 1)), mp_context=ctx
    ) as pool:
        results = list(pool.map(_job_4bit, jobs))
    failures = []
    for job, shared, error in results:
        kind, cap, xd, ad, kwargs, warps, stages = job
        label = f"4bit {kind} sm_{cap} x={xd} adapters={ad} {dict(kwargs)} w{warps} s{stages}"
        if error is not None:
            failures.append(f"{label}: compile failed: {error}")
        elif shared > _configs.SHARED_MEMORY_LIMIT[cap]:
            failures.append(f"{label}: shared memory {shared} B > limit {_configs.SHARED_MEMORY_LIMIT[cap]} B")
    assert not failures, f"{len(failures)} of {len(jobs)} compiles failed:\n" + "\n".join(failures)
