"""The implementations a benchmark case compares, on identical weights and inputs.

Providers::

    peft               peft 0.21.2's eager code: ``lora.Linear`` / ``lora.bnb.Linear8bitLt`` from get_peft_model on a
                       one-linear model; for prefix_kv its ``PrefixEncoder`` on B copies of the prompt tokens,
                       reshaped as ``PeftModel.get_prompt`` does, in a transformers ``DynamicCache`` (a ``torch.cat``
                       per layer per update)
    reference          peft_kernels' ops with every op pinned to the reference backend (torch; the CPU path)
    reference+compile  the reference formula written in torch ops, ``torch.compile``d (autograd derives backward)
    triton, cuda       peft_kernels' ops pinned to that backend (Triton kernels / the CUDA C++ extension)
    base               the ceiling of the float-weight LoRA linear rows: the base layer's product alone,
                       ``F.linear(x, W, b)``, no adapter; its backward is dY·W (a quantized row would need a
                       dense copy of its weight, which neither library holds: ``NO_CEILING``). Both libraries
                       call this GEMM with the same shapes, so no LoRA layer can beat it by more than its own
                       LoRA half. No error column (it is another function).

A provider that cannot run a case (no GPU, no extension, no bitsandbytes, an unsupported shape) raises
``Unavailable`` with the reason; the reason goes into the result row's note. Backends are pinned through the
dispatcher's priority lists for the duration of each call, so backward (which autograd may run on another
thread) is pinned too.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cases import Case, LinearShape

PROVIDERS = ("peft", "reference", "reference+compile", "triton", "cuda", "base")
CEILING_PROVIDER = "base"
# Why a quantized row has no ceiling: a dense copy of its weight (4-8x the bytes) that neither library holds; timed
# between their rounds it evicted their weights from the last-level cache (int8 M = 1 went from 1.15x to 0.90x).
NO_CEILING = "the base GEMM ceiling is measured on the float-weight rows only"
BACKEND_PROVIDERS = ("reference", "triton", "cuda")
_OPS_OF = {
    "lora_linear": ("lora_linear_fwd", "lora_linear_bwd"),
    "lora_linear_int8": ("lora_linear_fwd", "lora_linear_bwd"),  # one op pair for every weight format
    "lora_linear_4bit": ("lora_linear_4bit_fwd", "lora_linear_4bit_bwd"),
    "prefix_kv": ("prefix_kv_fill", "kv_append", "prefix_kv_fill_bwd"),
    "lora_linear_mixed": ("lora_linear_mixed",),
}


class Unavailable(Exception):
    """This provider cannot run this case here; the message says why."""


@contextlib.contextmanager
def pinned(op: str, backend: str | None):
    """Every dispatcher op of ``op`` runs on ``backend`` inside the block (None: unchanged)."""
    from ..ops import _dispatch

    if backend is None:
        yield
        return
    saved = {name: _dispatch.PRIORITY[name] for name in _OPS_OF[op]}
    try:
        _dispatch.PRIORITY.update(dict.fromkeys(saved, (backend,)))
        yield
    finally:
        _dispatch.PRIORITY.update(saved)


@functools.cache
def _compiled(fn):
    # dynamic=True: one compilation serves every shape of a run (CPU inductor takes ~10 s per compilation).
    # Donated buffers make a compiled backward refuse retain_graph=True, which the ``bwd`` mode replays with.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    return torch.compile(fn, dynamic=True)


def check_backend(provider: str, device: torch.device) -> None:
    """Raises Unavailable when ``provider``'s backend cannot run on ``device`` at all."""
    from ..ops import _dispatch

    backend = backend_of(provider)
    if backend in ("triton", "cuda"):
        if device.type != "cuda":
            raise Unavailable(f"the {backend} backend runs on CUDA tensors; this run is on {device.type}")
        reason = _dispatch.unavailable_reason(backend)
        if reason:
            raise Unavailable(reason)


def _quiet_get_peft_model(model, config):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, config)


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"peft not installed ({exc}); pip install peft==0.21.2") from exc


class _OneLinear(nn.Module):
    def __init__(self, lin: nn.Module, in_8bit: bool = False):
        super().__init__()
        self.lin = lin
        if in_8bit:
            self.is_loaded_in_8bit = True  # what transformers sets; PEFT's bnb dispatcher reads it

    def forward(self, x):
        return self.lin(x)


# ------------------------------------------------------------------------------------------------ problems
class Problem:
    """One case's weights and inputs; ``forward(provider)`` → a callable () -> output tensor(s)."""

    case: Case
    inputs: list[torch.Tensor]  # leaves that receive gradients in training modes
    frozen: list[torch.Tensor]  # storages not counted as saved-for-backward (weights)

    def forward(self, provider: str) -> Callable[[], object]:
        raise NotImplementedError

    def grad_outputs(self, outputs) -> list[torch.Tensor]:
        """Fixed random output gradients (one per output tensor), made once per shape."""
        outputs = _as_list(outputs)
        if getattr(self, "_grads", None) is None or len(self._grads) != len(outputs):
            gen = torch.Generator(device=outputs[0].device).manual_seed(7)
            self._grads = [
                torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype) for o in outputs
            ]
        return self._grads


def _as_list(outputs) -> list[torch.Tensor]:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _randn(shape, gen, device, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _lora_math(x, weight, bias, lora_a, lora_b, scaling: float, p: float):
    """The reference formula in torch ops: y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ, LoRA in the adapter dtype (PEFT)."""
    y = F.linear(x, weight, bias)
    x_hat = F.dropout(x.to(lora_a.dtype), p, True) if p > 0 else x.to(lora_a.dtype)
    return (y + scaling * ((x_hat @ lora_a.t()) @ lora_b.t())).to(x.dtype)


def _lora_int8_math(x, weight_int8, weight_scale, bias, lora_a, lora_b, scaling: float, p: float):
    """As _lora_math with W = (W_int8 · scale[:, None]) rounded once to x's dtype (the reference's dequantization)."""
    weight = (weight_int8.float() * weight_scale[:, None]).to(x.dtype)
    return _lora_math(x, weight, bias, lora_a, lora_b, scaling, p)


class LinearProblem(Problem):
    """x [M, K] (grad), W [N, K] (bf16 on CUDA, fp32 on CPU; int8 + fp32 row scales for lora_linear_int8),
    bias [N], A [r, K] and B [N, r] in fp32 (PEFT's autocast_adapter_dtype), scaling 2."""

    def __init__(self, case: Case, device: torch.device):
        s: LinearShape = case.shape
        self.case, self.device = case, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.scaling = 2.0
        gen = torch.Generator().manual_seed(0)
        weight = _randn((s.N, s.K), gen, "cpu", torch.float32, s.K**-0.5)
        self.bias = _randn((s.N,), gen, device, self.dtype, 0.1)
        self.lora_a = _randn((s.r, s.K), gen, device, torch.float32, s.K**-0.5).requires_grad_()
        self.lora_b = _randn((s.N, s.r), gen, device, torch.float32, 0.1).requires_grad_()
        self.x = _randn((s.M, s.K), gen, device, self.dtype).requires_grad_()
        self.int8 = case.op == "lora_linear_int8"
        if self.int8:
            absmax = weight.abs().amax(1).clamp_min(1e-8)  # bitsandbytes' row-wise absmax quantizer
            self.scb = absmax.to(device)
            self.weight_int8 = torch.round(weight * (127.0 / absmax)[:, None]).to(torch.int8).to(device)
            from ..formats import bnb_weight_scale

            self.weight_scale = bnb_weight_scale(self.scb)
            self.frozen = [self.weight_int8, self.weight_scale, self.bias]
        else:
            self.weight = weight.to(device=device, dtype=self.dtype)
            self.frozen = [self.weight, self.bias]
        self.inputs = [self.x, self.lora_a, self.lora_b]
        self._peft_layer = None

    def forward(self, provider: str) -> Callable[[], object]:
        p = self.case.shape.p
        training = self.case.mode != "no-grad-fwd"
        if provider == CEILING_PROVIDER:
            if self.int8:
                raise Unavailable(NO_CEILING)
            return lambda: F.linear(self.x, self.weight, self.bias)
        if provider == "peft":
            layer = self._peft()
            layer.train(training)
            return lambda: layer(self.x)
        if provider == "reference+compile":
            if self.int8:
                fn, args = _compiled(_lora_int8_math), (self.x, self.weight_int8, self.weight_scale)
            else:
                fn, args = _compiled(_lora_math), (self.x, self.weight)
            return lambda: fn(*args, self.bias, self.lora_a, self.lora_b, self.scaling, p if training else 0.0)
        if provider in BACKEND_PROVIDERS:
            from .. import ops

            if self.int8:
                return lambda: ops.lora_linear_int8(
                    self.x, self.weight_int8, self.weight_scale, self.bias, self.lora_a, self.lora_b,
                    self.scaling, p, training=training,
                )  # fmt: skip
            return lambda: ops.lora_linear(
                self.x, self.weight, self.bias, self.lora_a, self.lora_b, self.scaling, p, training=training
            )
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")

    def _peft(self):
        """peft 0.21.2's LoRA layer around this problem's base weight, its A and B set to this problem's."""
        if self._peft_layer is not None:
            return self._peft_layer
        _require_peft()
        import peft

        s = self.case.shape
        if self.int8:
            try:
                import bitsandbytes as bnb
            except Exception as exc:  # any import failure of bitsandbytes is this provider's reason
                raise Unavailable(f"bitsandbytes not importable ({type(exc).__name__}: {exc})") from exc
            # has_fp16_weights=False and threshold 6.0: what transformers' load_in_8bit builds (LLM.int8 with
            # outlier decomposition); the Int8Params quantize the same weight to the same CB/SCB on the move.
            lin = bnb.nn.Linear8bitLt(s.K, s.N, bias=True, has_fp16_weights=False, threshold=6.0)
            weight = (self.weight_int8.float() * self.weight_scale[:, None]).cpu().to(self.dtype)
            lin.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            lin.bias = nn.Parameter(self.bias.detach().cpu().clone(), requires_grad=False)
            base = _OneLinear(lin.to(self.device), in_8bit=True)
        else:
            lin = nn.Linear(s.K, s.N, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                lin.weight.copy_(self.weight)
                lin.bias.copy_(self.bias)
            base = _OneLinear(lin)
        config = peft.LoraConfig(r=s.r, lora_alpha=2 * s.r, lora_dropout=s.p, target_modules=["lin"])
        layer = _quiet_get_peft_model(base, config).base_model.model.lin
        if self.int8 and "bnb" not in type(layer).__module__:
            raise Unavailable(f"peft wrapped the int8 layer as {type(layer).__module__}.{type(layer).__name__}")
        # The problem's own A and B (same tensors: gradients land where every provider's land).
        layer.lora_A["default"].weight = nn.Parameter(self.lora_a.detach()).requires_grad_()
        layer.lora_B["default"].weight = nn.Parameter(self.lora_b.detach()).requires_grad_()
        self.inputs += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        self._peft_layer = layer
        return layer


class PrefixProblem(Problem):
    """A prefix encoder table [P, L·2·Hkv·hd] (grad) and each layer's new K and V [B, Hkv, T, hd] (separate leaves
    with grad, as each layer's projections make them); forward returns every layer's cached K and V
    [B, Hkv, P+T, hd]. Decode: a cache already holding P + T rows
    takes one more row per layer (then is cropped back, so every call sees the same length)."""

    def __init__(self, case: Case, device: torch.device):
        s = case.shape
        self.case, self.device = case, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        width = s.layers * 2 * s.kv_heads * s.head_dim
        self.table = _randn((s.P, width), gen, device, self.dtype).requires_grad_()
        kv_shape = (s.B, s.kv_heads, s.T, s.head_dim)
        self.new_kv = [
            [_randn(kv_shape, gen, device, self.dtype).requires_grad_() for _ in range(2)] for _ in range(s.layers)
        ]
        self.one_kv = _randn((s.layers, 2, s.B, s.kv_heads, 1, s.head_dim), gen, device, self.dtype)
        self.inputs, self.frozen = [self.table, *(t for kv in self.new_kv for t in kv)], []

    def _config(self, lib):
        s = self.case.shape
        return lib.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=s.P,
            token_dim=s.kv_heads * s.head_dim,
            num_layers=s.layers,
            num_attention_heads=s.kv_heads,
        )

    def _encoder(self, provider: str) -> nn.Module:
        if provider == "peft":
            _require_peft()
            import peft
            from peft.tuners.prefix_tuning import PrefixEncoder
        else:
            import peft_kernels as peft
            from peft_kernels.tuners.prefix_tuning import PrefixEncoder
        encoder = PrefixEncoder(self._config(peft)).to(self.device)
        encoder.embedding.weight = nn.Parameter(self.table.detach()).requires_grad_()
        self.inputs.append(encoder.embedding.weight)
        return encoder

    def forward(self, provider: str) -> Callable[[], object]:
        s = self.case.shape
        decode = self.case.mode == "decode"
        if provider == CEILING_PROVIDER:
            raise Unavailable(f"{self.case.op} has no base GEMM (the ceiling row is for the LoRA linear ops)")
        encoder = self._encoder(provider)
        tokens = torch.arange(s.P, device=self.device)
        if provider == "peft":
            from transformers import DynamicCache

            def build():
                # PeftModel.get_prompt (0.21.2): the encoder on B copies of the tokens, then
                # [B, P, 2L, H, hd] → permute → per layer (K, V) [B, H, P, hd] views, into a DynamicCache.
                flat = encoder(tokens.unsqueeze(0).expand(s.B, -1))
                kv = flat.view(s.B, s.P, 2 * s.layers, s.kv_heads, s.head_dim).permute([2, 0, 3, 1, 4]).split(2)
                return DynamicCache([(layer[0], layer[1]) for layer in kv])

        elif provider == "reference+compile":
            if decode:
                raise Unavailable("decode appends with torch.cat; compiled it is the same copy as the peft row")
            return self._compiled_forward(encoder, tokens)
        elif provider in BACKEND_PROVIDERS:
            from ..tuners.prefix_cache_builder import unbatched_prefix
            from ..tuners.prefix_kv_cache import PrefixKVCache

            capacity = s.P + s.T + (1 if decode else 0)

            def build():
                flat = encoder(tokens.unsqueeze(0))[0]  # the encoder once, on the unbatched prompt
                return PrefixKVCache(unbatched_prefix(flat, s.layers, s.kv_heads), s.B, capacity)

        else:
            raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")

        if decode:
            with torch.no_grad():
                cache = build()
                for layer in range(s.layers):
                    cache.update(*self.new_kv[layer], layer)

            def step():
                out = [cache.update(self.one_kv[layer, 0], self.one_kv[layer, 1], layer) for layer in range(s.layers)]
                cache.crop(-1)
                return out[-1][0]

            return step

        def forward():
            cache = build()
            out = []
            for layer in range(s.layers):
                out += cache.update(*self.new_kv[layer], layer)
            return out

        return forward

    def _compiled_forward(self, encoder, tokens):
        s = self.case.shape

        def caches(flat, new_kv):
            prefix = flat.view(s.P, s.layers, 2, s.kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)
            return [
                torch.cat([prefix[layer, kv].unsqueeze(0).expand(s.B, -1, -1, -1), new_kv[layer][kv]], dim=2)
                for layer in range(s.layers)
                for kv in range(2)
            ]

        compiled = _compiled(caches)
        return lambda: compiled(encoder(tokens.unsqueeze(0))[0], self.new_kv)


def build_problem(case: Case, device: torch.device) -> Problem:
    if case.op == "prefix_kv":
        return PrefixProblem(case, device)
    if case.op == "lora_linear_mixed":
        from .mixed import MixedProblem

        return MixedProblem(case, device)
    if case.op == "lora_linear_4bit":
        from .qlora import QLoraProblem

        return QLoraProblem(case, device)
    return LinearProblem(case, device)


def backend_of(provider: str) -> str | None:
    return provider if provider in BACKEND_PROVIDERS else None
