"""Ahead-of-time compile of every Triton LoRA kernel for sm_80 and sm_90, on a machine without a GPU: compiles,
spills, shared memory.

What it catches that the interpreter runs silently (docs/KERNELS.md §11): dot operand dtype mismatches, 16-bit dots with
K < 16 (the unpadded-rank trap), fp32 dots without a valid input_precision, constexpr branches that only break when
lowered, configs whose shared memory exceeds the architecture's limit (``compiled.metadata.shared`` against
``_configs.SHARED_MEMORY_LIMIT``), and **register spills**: ``ptxas -v`` (the ptxas Triton ships, nvcc's as a
fallback) on each compiled kernel must report 0 bytes of spill stores and loads for bf16 and fp16 models, with
16-bit and fp32 adapters, dropout off and on, 16-bit and int8 weights. A spill in these kernels sits in the K loop
(ptxas spills the wgmma accumulator around every MMA) or in the per-tile dropout prologue; either costs 2-4x.

Coverage: ``ci_variants`` (112 compiles, about 3 minutes on 2 cores with a fresh Triton cache per run) covers every
config the autotuner or the rank heuristic can pick, each in its register-heaviest form; ``gated_variants`` is the
full product (512), compiled by ``benchmarks/kernel_resources.py`` into docs/KERNEL_RESOURCES.md. Compiles run in a
spawn pool (one worker per core, at most 4); failures are collected and reported together.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import NamedTuple

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peft_kernels.backends.triton import _configs, lora  # noqa: E402

pytestmark = pytest.mark.skipif(
    not isinstance(lora._lora_shrink_kernel, triton.runtime.JITFunction),
    reason="TRITON_INTERPRET=1 replaces kernels with interpreted functions; AOT compile needs the JIT ones",
)


def declared_memory_bound_configs(op: str) -> list[tuple[int, triton.Config]]:
    """Every (R, config) ``_configs.heuristic_config`` can return for ``op``: what this test compiles."""
    return [(rb, _configs.heuristic_config(op, rb)) for rb in _configs.RANK_BLOCKS]


def declared_gemm_configs(op: str, capability: int) -> list[triton.Config]:
    """Every 16-bit config a GEMM op may autotune over on ``capability`` (80, 90, or anything else -> defaults)."""
    table = _configs.CUDA_GEMM_CONFIGS.get(capability, _configs.DEFAULT_GEMM_CONFIGS)
    seen, out = set(), []
    for bucket in _configs.M_BUCKETS:
        for c in table[bucket]:
            key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


# Realistic launch arguments: Llama-class sizes, contiguous tensors (unit strides become constexpr 1 at runtime,
# which is what the specialisation below mirrors), dropout on, atomics on.
_M = _N = _K = 4096


def _example_args(op: str, xd: str, ad: str, rank: int) -> dict:
    r = rank
    if op == "lora_shrink":
        return dict(
            x_ptr=f"*{xd}", a_ptr=f"*{ad}", s_ptr="*fp32", bits_ptr="*i32",
            M=_M, K=_K, r=r, k_tiles_per_split=16, inv_keep=1 / 0.9,
            stride_xm=_K, stride_xk=1, stride_ar=_K, stride_ak=1, stride_ss=_M * r, stride_sm=r, stride_sr=1,
            stride_bm=_K // 32,
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
            M=_M, N=_N, r=r, n_tiles_per_split=8, db_slots=16, scaling=2.0,
            stride_dym=_N, stride_dyn=1, stride_bn=r, stride_br=1, stride_sm=r, stride_sr=1,
            stride_dss=_M * r, stride_dsm=r, stride_dbs=_N * r, stride_dbn=r,
            BLOCK_R=_configs.rank_block(r), NEED_DB=True, ATOMIC_DS=True, ATOMIC_DB=True,
        )  # fmt: skip
    if op == "linear_lora_bwd_dx":
        return dict(
            dy_ptr=f"*{xd}", w_ptr=f"*{xd}", wscale_ptr="*fp32", ds_ptr="*fp32", a_ptr=f"*{ad}", bits_ptr="*i32",
            dx_ptr=f"*{xd}", M=_M, N=_N, K=_K, r=r, inv_keep=1 / 0.9,
            stride_dym=_N, stride_dyn=1, stride_wn=_K, stride_wk=1, stride_ws=1, stride_dsm=r, stride_dsr=1,
            stride_ar=_K, stride_ak=1, stride_dxm=_K, stride_dxk=1, stride_bm=_K // 32,
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_DROPOUT=True, IS_INT8=False,
        )  # fmt: skip
    if op == "lora_bwd_da":
        return dict(
            x_ptr=f"*{xd}", ds_ptr="*fp32", bits_ptr="*i32", da_ptr="*fp32",
            M=_M, K=_K, r=r, m_tiles_per_split=8, inv_keep=1 / 0.9,
            stride_xm=_K, stride_xk=1, stride_dsm=r, stride_dsr=1, stride_das=r * _K, stride_dar=_K,
            stride_bm=_K // 32,
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


# ---------------------------------------------------------------------------------------------------------------
# ptxas -v: registers, spills, stack of one compiled kernel
# ---------------------------------------------------------------------------------------------------------------

_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_path(cap: int) -> str:
    """The ptxas Triton itself assembles sm_<cap> with (it ships one); nvcc's on PATH when Triton's is missing."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(cap).path
        if path and os.path.exists(path):
            return path
    except Exception:  # an older or newer triton layout: fall back to the CUDA toolkit's
        pass
    path = shutil.which("ptxas")
    if path is None:
        raise FileNotFoundError("no ptxas: neither Triton's bundled one nor one on PATH (CUDA toolkit)")
    return path


def ptxas_resources(compiled, cap: int) -> dict:
    """{regs, spill_stores, spill_loads, stack, shared} of a compiled kernel: ``ptxas -v`` on its PTX with the
    flags Triton's own cubin step uses (-lineinfo, --regAllocOptLevel=2, FMA contraction on, sm_90a for sm_90)."""
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        cmd = [ptxas_path(cap), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src]
        proc = subprocess.run([*cmd, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    props, regs = _PTXAS_PROPS.search(log), _PTXAS_REGS.search(log)
    if proc.returncode != 0 or props is None or regs is None:
        raise RuntimeError(f"ptxas -v gave no resource report (rc {proc.returncode}):\n{log[-2000:]}")
    stack, spill_st, spill_ld = (int(v) for v in props.groups())
    return dict(
        regs=int(regs.group(1)), spill_stores=spill_st, spill_loads=spill_ld, stack=stack,
        shared=compiled.metadata.shared,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The variants: every kernel x config x dtype x dropout x weight format the runtime can launch
# ---------------------------------------------------------------------------------------------------------------

# Element type of the int8 (W8A16) variants' weight pointer.
INT8_WEIGHT = {"w_ptr": "*i8", "IS_INT8": True}
# Activation x adapter dtypes of the spill gate: bf16 and fp16 models with 16-bit and with fp32 adapters (PEFT's
# autocast_adapter_dtype default).
GATED_DTYPES = (("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"))
_HAS_DROPOUT = ("lora_shrink", "linear_lora_bwd_dx", "lora_bwd_da")


class Variant(NamedTuple):
    op: str
    cap: int
    xd: str
    ad: str
    rank: int
    kwargs: tuple
    warps: int
    stages: int
    dropout: bool
    int8: bool = False

    @property
    def config(self):
        return triton.Config(dict(self.kwargs), num_warps=self.warps, num_stages=self.stages)

    def label(self) -> str:
        w = "int8 " if self.int8 else ""
        return (
            f"{self.op} sm_{self.cap} {w}x={self.xd} adapters={self.ad} R={_configs.rank_block(self.rank)} "
            f"dropout={self.dropout} {dict(self.kwargs)} w{self.warps} s{self.stages}"
        )


def _variant(op, cap, xd, ad, rank, config, dropout, int8=False) -> Variant:
    kwargs = tuple(sorted(config.kwargs.items()))
    return Variant(op, cap, xd, ad, rank, kwargs, config.num_warps, config.num_stages, dropout, int8)


def gated_variants() -> list[Variant]:
    """What the spill gate compiles: on sm_80 and sm_90, every config the autotuner (GEMMs, all M buckets) or the
    rank heuristic (memory-bound kernels, every padded rank) can pick, x GATED_DTYPES, x dropout off/on for the
    kernels that draw the mask, x 16-bit / int8 weight for the GEMMs (the only kernels that read W)."""
    out = []
    for cap in (80, 90):
        for op in _configs.GEMM_OPS:
            for config in declared_gemm_configs(op, cap):
                for xd, ad in GATED_DTYPES:
                    for int8 in (False, True):
                        for dropout in (False, True) if op in _HAS_DROPOUT else (False,):
                            if _configs.pickable(config, dropout, int8):  # what the autotuner may try
                                out.append(_variant(op, cap, xd, ad, 64, config, dropout, int8))
        for op in _configs.MEMORY_BOUND_OPS:
            for rank_block, config in declared_memory_bound_configs(op):
                for xd, ad in GATED_DTYPES:
                    for dropout in (False, True) if op in _HAS_DROPOUT else (False,):
                        out.append(_variant(op, cap, xd, ad, rank_block, config, dropout))
    return out


def ci_variants() -> list[Variant]:
    """The CI gate, a cover of ``gated_variants`` sized for ~3 minutes on 2 cores: on sm_80 and sm_90 every config
    the autotuner or the rank heuristic can pick, each in its register-heaviest form: fp32 adapters (three-way
    split LoRA dots), dropout on (F1, B2, B3 draw the mask), F2 and B2 with a 16-bit and with an int8 weight; bf16
    and fp16 alternate between those forms (they lower to the same MMA shapes). Then fp32 models for the shared-
    memory limit (BLOCK_K halved: sm_90's largest footprints) and sm_86's DEFAULT lists. ``kernel_resources.py``
    compiles every gated variant; its table shows the rest spill-free too."""
    out = []
    for cap in (80, 90):
        for op in _configs.GEMM_OPS:
            for config in declared_gemm_configs(op, cap):
                # dropout on where the autotuner may pick this config with it (B2), else off
                dropout = op in _HAS_DROPOUT and _configs.pickable(config, True)
                if not _configs.pickable(config, dropout):
                    continue
                out.append(_variant(op, cap, "bf16", "fp32", 64, config, dropout))
                if _configs.pickable(config, dropout, int8=True):
                    out.append(_variant(op, cap, "fp16", "fp32", 64, config, dropout, int8=True))
        for op in _configs.MEMORY_BOUND_OPS:
            for i, (rank_block, config) in enumerate(declared_memory_bound_configs(op)):
                xd = ("bf16", "fp16")[i % 2]
                out.append(_variant(op, cap, xd, "fp32", rank_block, config, op in _HAS_DROPOUT))
    return out + [v for v in fp32_variants() if v.cap != 80 and v.op in _configs.GEMM_OPS]


def fp32_variants() -> list[Variant]:
    """fp32 models (BLOCK_K halved), every config, sm_80 / sm_90, plus the DEFAULT lists on sm_86: compiled for the
    shared-memory check (fp32 has the largest footprint on sm_90) and listed in the resource table; not gated on
    spills (their fp32 x fp32 base GEMM runs at torch's fp32 precision, tf32x3 by default)."""
    out = []
    for cap in (80, 90):
        for op in _configs.GEMM_OPS:
            for config in _configs.for_element_size(declared_gemm_configs(op, cap), 4):
                out.append(_variant(op, cap, "fp32", "fp32", 64, config, op in _HAS_DROPOUT))
        for op in _configs.MEMORY_BOUND_OPS:
            for rank_block, config in declared_memory_bound_configs(op):
                out.append(_variant(op, cap, "fp32", "fp32", rank_block, config, op in _HAS_DROPOUT))
    for op in _configs.GEMM_OPS:
        for config in declared_gemm_configs(op, 86):
            out.append(_variant(op, 86, "bf16", "fp32", 64, config, False))
    return out


def is_gated(v: Variant) -> bool:
    """Spill-gated: bf16/fp16 models on sm_80 and sm_90 (fp32 models and sm_86's DEFAULT lists are only listed)."""
    return v.cap in (80, 90) and v.xd != "fp32"


def compile_variant(v: Variant):
    return compile_kernel(v.op, v.cap, v.xd, v.ad, v.rank, v.config, v.dropout, INT8_WEIGHT if v.int8 else None)


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def _resources_job(v: Variant):
    """Pool worker: (variant, resources dict or None, error text or None, seconds)."""
    start = time.perf_counter()
    try:
        compiled = compile_variant(v)
        return v, ptxas_resources(compiled, v.cap), None, time.perf_counter() - start
    except Exception as exc:  # every failure is reported, not just the first
        return v, None, f"{type(exc).__name__}: {str(exc)[:400]}", time.perf_counter() - start


def compile_all(variants, workers: int | None = None):
    """[(variant, resources, error, seconds)] compiled in a spawn pool (one worker per core, at most 4) with a
    fresh Triton cache directory, so every kernel really goes through LLVM and ptxas in this run."""
    return pool_map(_resources_job, variants, workers or max(1, min(4, os.cpu_count() or 1)))


def pool_map(fn, items, workers: int = 2) -> list:
    """[fn(item)] in a spawn pool (workers must not inherit a forked torch/triton state) sharing a fresh Triton
    cache directory, so every kernel really goes through LLVM and ptxas in this run."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="pk-aot-cache-") as cache:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(cache,)
        ) as pool:
            return list(pool.map(fn, items, chunksize=1))


def test_declared_lists_are_well_formed():
    for op in _configs.GEMM_OPS:
        for cap in (80, 86, 90):
            configs = declared_gemm_configs(op, cap)
            assert configs, (op, cap)
            for c in configs:
                assert set(c.kwargs) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}, c
                assert c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16 and c.kwargs["BLOCK_K"] >= 16, c
        for bucket in _configs.M_BUCKETS:
            # An unknown GPU gets defaults, never an error (docs/KERNELS.md §10.6).
            assert _configs.cuda_configs(op, (12, 0), 2, bucket)
            assert _configs.cuda_configs(op, None, 4, bucket)
            assert _configs.hip_configs(op, 2, bucket)
    for op in _configs.MEMORY_BOUND_OPS:
        for rank_block in _configs.RANK_BLOCKS:
            c = _configs.heuristic_config(op, rank_block)
            assert min(c.kwargs.values()) >= 16, (op, rank_block, c)
    assert [_configs.rank_block(r) for r in (1, 8, 16, 17, 64, 65, 256)] == [16, 16, 16, 32, 64, 128, 256]


def test_ci_variants_cover_every_config_the_runtime_can_pick():
    """The gate's cover: each config the autotuner or the rank heuristic can pick, on both archs, with fp32
    adapters, the dropout form and (GEMMs) both weight formats; both 16-bit dtypes appear."""
    ci = ci_variants()
    gated = gated_variants()
    assert set(v for v in ci if is_gated(v)) <= set(gated)
    key = lambda v: (v.op, v.cap, v.kwargs, v.warps, v.stages, v.rank if v.op in _configs.MEMORY_BOUND_OPS else 0)  # noqa: E731
    assert {key(v) for v in gated} == {key(v) for v in ci if is_gated(v)}
    for op in _configs.GEMM_OPS:
        forms = {(v.int8, v.dropout) for v in ci if v.op == op and is_gated(v)}
        assert forms == (
            {(False, False), (True, False)} | ({(False, True), (True, True)} if op in _HAS_DROPOUT else set())
        )
    assert {key(v) for v in gated if v.int8} == {key(v) for v in ci if is_gated(v) and v.int8}
    assert {v.xd for v in ci} == {"bf16", "fp16", "fp32"}


def test_no_spill_and_shared_memory_fits():
    """Every CI variant compiles; ptxas -v reports no spill store or load (registers only, no local memory) for
    bf16/fp16 models; shared memory within the architecture's limit for all, fp32 models included."""
    variants = ci_variants()
    start = time.perf_counter()
    results = compile_all(variants)
    elapsed = time.perf_counter() - start
    failures = []
    for v, res, error, _seconds in results:
        if error is not None:
            failures.append(f"{v.label()}: compile failed: {error}")
            continue
        if is_gated(v) and (res["spill_stores"] or res["spill_loads"]):
            failures.append(
                f"{v.label()}: ptxas spills {res['spill_stores']} B stored / {res['spill_loads']} B loaded "
                f"({res['regs']} registers, {res['stack']} B stack)"
            )
        if res["shared"] > _configs.SHARED_MEMORY_LIMIT[v.cap]:
            failures.append(
                f"{v.label()}: shared memory {res['shared']} B > limit {_configs.SHARED_MEMORY_LIMIT[v.cap]} B"
            )
    assert not failures, f"{len(failures)} problems in {len(variants)} compiles ({elapsed:.0f} s):\n" + "\n".join(
        failures
    )


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
            dy_ptr=f"*{xd}", **quant, ds_ptr="*fp32", a_ptr=f"*{ad}", bits_ptr="*i32",
            dx_ptr=f"*{xd}", M=_M, N=_N, K=_K, r=r, inv_keep=1 / 0.9, stride_dym=_N, stride_dyn=1,
            stride_dsm=r, stride_dsr=1, stride_ar=_K, stride_ak=1, stride_dxm=_K, stride_dxk=1, stride_bm=_K // 32,
            LORA_CHUNK=_configs.LORA_CHUNK, HAS_DROPOUT=True, PREC="tf32x3", UPCAST=False,
        )  # fmt: skip
    raise KeyError(kind)


def _job_4bit(job):
    """Pool worker: (job, ptxas_resources or None, error text or None)."""
    from peft_kernels.backends.triton import lora_4bit as tri4

    kind, cap, xd, ad, kwargs, warps, stages = job
    config = triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)
    try:
        values = {**_example_args_4bit(kind, xd, ad), **config.kwargs}
        return job, ptxas_resources(compile_jit(tri4.KERNELS[kind], values, config, cap), cap), None
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


def test_qlora_kernels_compile_no_spill_and_fit_shared_memory():
    """The gate of ``test_no_spill_and_shared_memory_fits`` on the QLoRA kernels: each compiles; no ptxas spill
    for 16-bit models; shared memory within the architecture's limit."""
    jobs = jobs_4bit()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, min(4, os.cpu_count() or 1)), mp_context=ctx
    ) as pool:
        results = list(pool.map(_job_4bit, jobs))
    failures = []
    for job, res, error in results:
        kind, cap, xd, ad, kwargs, warps, stages = job
        label = f"4bit {kind} sm_{cap} x={xd} adapters={ad} {dict(kwargs)} w{warps} s{stages}"
        if error is not None:
            failures.append(f"{label}: compile failed: {error}")
            continue
        if xd != "fp32" and (res["spill_stores"] or res["spill_loads"]):
            failures.append(
                f"{label}: ptxas spills {res['spill_stores']} B stored / {res['spill_loads']} B loaded "
                f"({res['regs']} registers, {res['stack']} B stack)"
            )
        if res["shared"] > _configs.SHARED_MEMORY_LIMIT[cap]:
            failures.append(f"{label}: shared memory {res['shared']} B > limit {_configs.SHARED_MEMORY_LIMIT[cap]} B")
    assert not failures, f"{len(failures)} problems in {len(jobs)} compiles:\n" + "\n".join(failures)
