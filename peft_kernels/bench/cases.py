"""What the op benchmarks measure: ops × modes × shapes from real models, with their FLOP and byte counts.

Ops and modes::

    lora_linear       y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ        fwd | bwd | fwd+bwd | no-grad-fwd
    lora_linear_int8  the same over W = W_int8·scale[:, None]   fwd | bwd | fwd+bwd | no-grad-fwd
    lora_linear_4bit  the same over a bnb NF4 W (nested scales)  fwd | bwd | fwd+bwd | no-grad-fwd
    prefix_kv         prefix encoder → per-layer K/V caches     fwd | fwd+bwd | decode
                      holding the prefix and T new tokens
    lora_linear_mixed a batch mixed over 8 adapters              no-grad-fwd   (bench/mixed.py)

``fwd`` records the autograd graph, ``bwd`` replays the backward of one recorded forward, ``fwd+bwd`` is a
training step of the layer, ``no-grad-fwd`` is inference (dropout off). Decode-sized linears (M ≤ 16 tokens) run
``no-grad-fwd`` only; ``prefix_kv``'s ``decode`` appends one token to every layer of a cache holding P + T rows.

FLOPs (linear, W frozen: no dW): forward 2MNK + 2Mr(K+N); backward 2MNK (dx) + 4Mr(K+N) (dS, dB, dA, dx term).
Minimal bytes (what a perfect kernel must move; the GB/s column divides these by the median time):
    linear forward: x (MK) + y (MN) in the activation dtype, W (NK, or NK + 4N int8 + scales, or NK/2 + NK/64
    4-bit codes + nested scales), A and B r(K+N) in
    the adapter dtype; backward adds dy (MN), x again, dx (MK).
    prefix_kv: the cache writes L·2·B·Hkv·(P+T)·hd (fwd), one row per layer for decode, reads of the prefix and of
    the new K/V; backward adds the batch reduction (reads L·2·B·Hkv·P·hd, writes the prefix gradient).
"""

from __future__ import annotations

import dataclasses

OPS = ("lora_linear", "lora_linear_int8", "lora_linear_4bit", "prefix_kv", "lora_linear_mixed")
LINEAR_MODES = ("fwd", "bwd", "fwd+bwd", "no-grad-fwd")
PREFIX_MODES = ("fwd", "fwd+bwd", "decode")
DECODE_TOKENS_MAX = 16

# (K in, N out) of the projections the issue names; k/v and q/o, gate/up share a shape.
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
GPT2 = {"c_attn": (768, 2304)}
BERT_BASE = {"query": (768, 768)}
# (layers, key/value heads, head dim) for prefix K/V.
PREFIX_MODELS = {"llama3-8b": (32, 8, 128), "gpt2": (12, 12, 64), "bert-base": (12, 12, 64)}


@dataclasses.dataclass(frozen=True)
class LinearShape:
    model: str
    proj: str
    M: int  # tokens
    K: int
    N: int
    r: int
    p: float = 0.0  # LoRA dropout

    @property
    def label(self) -> str:
        drop = f" p={self.p}" if self.p else ""
        return f"{self.model} {self.proj} M={self.M} r={self.r}{drop}"

    @property
    def dims(self) -> str:
        return f"M={self.M} K={self.K} N={self.N} r={self.r} p={self.p}"


@dataclasses.dataclass(frozen=True)
class PrefixShape:
    model: str
    layers: int
    kv_heads: int
    head_dim: int
    B: int
    T: int  # new tokens per forward; for decode, the tokens already cached after the prefix
    P: int

    @property
    def label(self) -> str:
        return f"{self.model} B={self.B} T={self.T} P={self.P}"

    @property
    def dims(self) -> str:
        return f"L={self.layers} Hkv={self.kv_heads} hd={self.head_dim} B={self.B} T={self.T} P={self.P}"


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    mode: str
    shape: LinearShape | PrefixShape

    @property
    def label(self) -> str:
        return f"{self.op} {self.mode} {self.shape.label}"

    def flops(self) -> float | None:
        """FLOPs of one call (linear ops; None for the copy-shaped prefix op)."""
        if not isinstance(self.shape, LinearShape):
            return None
        s = self.shape
        fwd = 2 * s.M * s.N * s.K + 2 * s.M * s.r * (s.K + s.N)
        bwd = 2 * s.M * s.N * s.K + 4 * s.M * s.r * (s.K + s.N)
        return {"fwd": fwd, "no-grad-fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[self.mode]

    def min_bytes(self, act_bytes: int, adapter_bytes: int) -> int:
        """Bytes one call must move at least (see the module docstring)."""
        s = self.shape
        if isinstance(s, LinearShape):
            weight = s.N * s.K * act_bytes
            if self.op == "lora_linear_int8":
                weight = s.N * s.K + 4 * s.N
            elif self.op == "lora_linear_4bit":
                weight = s.N * s.K // 2 + s.N * s.K // 64  # codes + one uint8 nested scale per 64-element block
            adapters = s.r * (s.K + s.N) * adapter_bytes * getattr(s, "adapters", 1)  # bench/mixed.py: n adapters
            fwd = (s.M * s.K + s.M * s.N) * act_bytes + weight + adapters
            bwd = (s.M * s.N + 2 * s.M * s.K) * act_bytes + weight + 2 * adapters
            return {"fwd": fwd, "no-grad-fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[self.mode]
        row = s.layers * 2 * s.kv_heads * s.head_dim * act_bytes  # one token row of every layer's K and V
        if self.mode == "decode":
            return 2 * s.B * row  # read the new row, write it
        fwd = s.B * (s.P + s.T) * row + s.P * row + s.B * s.T * row
        if self.mode == "fwd":
            return fwd
        return fwd + s.B * s.P * row + 2 * s.P * row  # read dK/dV prefix rows, write dprefix, the table grad


def _linear_cases(op: str, shapes: list[LinearShape]) -> list[Case]:
    cases = []
    for s in shapes:
        modes = ("no-grad-fwd",) if s.M <= DECODE_TOKENS_MAX else LINEAR_MODES
        if s.p:  # dropout exists only in training; its inference row would repeat the p = 0 one
            modes = tuple(m for m in modes if m != "no-grad-fwd")
        cases += [Case(op, mode, s) for mode in modes]
    return cases


def _projections(models: dict[str, dict[str, tuple[int, int]]], tokens, ranks) -> list[LinearShape]:
    return [
        LinearShape(model, proj, m, k, n, r)
        for model, projs in models.items()
        for proj, (k, n) in projs.items()
        for r in ranks
        for m in tokens
    ]


def _prefix_cases(shapes: list[PrefixShape]) -> list[Case]:
    return [Case("prefix_kv", mode, s) for s in shapes for mode in PREFIX_MODES]


def _prefix_shape(model: str, batch: int, tokens: int, prefix: int) -> PrefixShape:
    layers, heads, head_dim = PREFIX_MODELS[model]
    return PrefixShape(model, layers, heads, head_dim, batch, tokens, prefix)


def select_cases(device_type: str, size: str, ops=OPS, modes=None) -> list[Case]:
    """The cases of a run: ``size`` "quick" (a few minutes on a 2-core CPU; the GPU suite's subset), "full"
    (every model shape × r ∈ {8, 16, 64} × tokens: decode 1, 16 and prefill 512, 8192 on a GPU; 1 and 256 on a
    CPU) or "tiny" (seconds: the smoke tests). Filtered to ``ops`` and ``modes``."""
    gpu = device_type == "cuda"
    all_models = {"llama3-8b": LLAMA3_8B, "gpt2": GPT2, "bert-base": BERT_BASE}
    q, k = LLAMA3_8B["q_proj"], LLAMA3_8B["k_proj"]
    if size == "tiny":
        lora = [LinearShape("tiny", "lin", 48, 96, 80, 4), LinearShape("tiny", "lin", 1, 96, 80, 4)]
        int8 = lora
        prefix = [PrefixShape("tiny", 2, 2, 16, 2, 8, 4)]
    elif size == "quick" and gpu:
        lora = [
            LinearShape("llama3-8b", "q_proj", 8192, *q, 16),
            LinearShape("llama3-8b", "q_proj", 8192, *q, 16, 0.1),
            LinearShape("llama3-8b", "q_proj", 1, *q, 16),
            LinearShape("llama3-8b", "q_proj", 16, *q, 16),
        ]
        int8 = [LinearShape("llama3-8b", "q_proj", 4096, *q, 16), LinearShape("llama3-8b", "q_proj", 1, *q, 16)]
        prefix = [_prefix_shape("llama3-8b", 8, 2048, 32)]
    elif size == "quick":
        lora = [
            *(LinearShape("bert-base", "query", 256, *BERT_BASE["query"], r) for r in (8, 16, 64)),
            LinearShape("bert-base", "query", 256, *BERT_BASE["query"], 16, 0.1),
            LinearShape("gpt2", "c_attn", 256, *GPT2["c_attn"], 8),
            LinearShape("llama3-8b", "k_proj", 1, *k, 16),
        ]
        int8 = [LinearShape("bert-base", "query", 256, *BERT_BASE["query"], 16), lora[-1]]  # + decode M=1
        prefix = [_prefix_shape("gpt2", 4, 128, 16)]
    elif size == "full":
        tokens = (1, 16, 512, 8192) if gpu else (1, 256)
        lora = _projections(all_models, tokens, (8, 16, 64))
        lora += [dataclasses.replace(s, p=0.1) for s in lora if s.M > DECODE_TOKENS_MAX and s.r == 16]
        int8 = [s for s in lora if s.model == "llama3-8b" and s.r == 16]
        prefix = [
            _prefix_shape("llama3-8b", 8, 2048, 32) if gpu else _prefix_shape("llama3-8b", 2, 128, 16),
            _prefix_shape("gpt2", 8, 1024, 32) if gpu else _prefix_shape("gpt2", 4, 128, 16),
            _prefix_shape("bert-base", 8, 512, 32) if gpu else _prefix_shape("bert-base", 8, 128, 32),
        ]
    else:
        raise ValueError(f"unknown size {size!r}; expected 'tiny', 'quick' or 'full'")
    cases = []
    if "lora_linear" in ops:
        cases += _linear_cases("lora_linear", lora)
    if "lora_linear_int8" in ops:
        cases += _linear_cases("lora_linear_int8", int8)
    if "lora_linear_4bit" in ops:
        cases += _linear_cases("lora_linear_4bit", int8)  # the int8 rows' shapes
    if "prefix_kv" in ops:
        cases += _prefix_cases(prefix)
    if "lora_linear_mixed" in ops:
        from .mixed import mixed_cases

        cases += mixed_cases(device_type, size)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; expected some of {OPS}")
    if modes is not None:
        cases = [c for c in cases if c.mode in modes]
    return cases
