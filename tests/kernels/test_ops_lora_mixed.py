"""``ops.lora_linear_mixed`` on CPU (the reference backend): semantics, shapes, errors, gradients, torch.compile.

The semantics are checked against an independent formulation: each row through ``ops.lora_linear`` with its own
adapter (or ``F.linear`` for -1), one row at a time.
"""

from __future__ import annotations

import pytest
import torch
from _tolerances import FP32_SAME_MATH, assert_close

from peft_kernels import ops
from peft_kernels.backends.reference import lora_mixed as ref

K, N = 24, 20
RANKS = (4, 8, 16)


def _adapters(gen, dtype=torch.float32):
    a = [torch.randn(r, K, generator=gen, dtype=dtype) for r in RANKS]
    b = [torch.randn(N, r, generator=gen, dtype=dtype) for r in RANKS]
    return a, b, [0.5, 1.0, 2.0]


def _per_row(x2d, w, bias, a, b, s, g, bb=None):
    rows = []
    for i in range(x2d.shape[0]):
        j = int(g[i])
        if j < 0:
            rows.append(torch.nn.functional.linear(x2d[i : i + 1], w, bias))
        else:
            lb = None if bb is None else bb[j]
            rows.append(ops.lora_linear(x2d[i : i + 1], w, bias, a[j], b[j], s[j], lora_b_bias=lb))
    return torch.cat(rows)


@pytest.mark.parametrize("rows", [7, ref.STACKED_MAX_ROWS + 36])  # the stacked (decode) and grouped paths
def test_rows_follow_their_adapter_2d_and_3d(rows):
    gen = torch.Generator().manual_seed(0)
    a, b, s = _adapters(gen)
    bb = [torch.randn(N, generator=gen), None, torch.randn(N, generator=gen)]
    w, bias = torch.randn(N, K, generator=gen), torch.randn(N, generator=gen)
    x = torch.randn(rows, K, generator=gen)
    g = torch.randint(-1, 3, (rows,), generator=gen)
    g[:4] = torch.tensor([2, -1, 0, 1])
    y = ops.lora_linear_mixed(x, w, bias, a, b, s, g, lora_b_bias_list=bb)
    assert_close(y, _per_row(x, w, bias, a, b, s, g, bb), FP32_SAME_MATH, "2-D")
    # 3-D: every position of sample i takes sample i's adapter.
    x3 = torch.randn(4, 5, K, generator=gen)
    g3 = torch.tensor([1, -1, 2, 0])
    y3 = ops.lora_linear_mixed(x3, w, bias, a, b, s, g3)
    assert y3.shape == (4, 5, N)
    expected = _per_row(x3.reshape(-1, K), w, bias, a, b, s, g3.repeat_interleave(5)).reshape(4, 5, N)
    assert_close(y3, expected, FP32_SAME_MATH, "3-D")


def test_bad_arguments_name_the_bad_value():
    gen = torch.Generator().manual_seed(1)
    a, b, s = _adapters(gen)
    w, x = torch.randn(N, K, generator=gen), torch.randn(3, K, generator=gen)
    with pytest.raises(ValueError, match=r"holds 3, outside \[-1, 3\)"):
        ops.lora_linear_mixed(x, w, None, a, b, s, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"holds -2"):
        ops.lora_linear_mixed(x, w, None, a, b, s, torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError, match=r"one entry per sample"):
        ops.lora_linear_mixed(x, w, None, a, b, s, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer tensor"):
        ops.lora_linear_mixed(x, w, None, a, b, s, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="one entry per adapter"):
        ops.lora_linear_mixed(x, w, None, a, b[:2], s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="lora_b has shape"):
        ops.lora_linear_mixed(x, w, None, a, [b[1], b[0], b[2]], s, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("rows", [6, ref.STACKED_MAX_ROWS + 16])
def test_gradients_flow_in_eval_mode(rows):
    """With gradients required the op runs the reference's differentiable ops (as PEFT's eager mixed path)."""
    gen = torch.Generator().manual_seed(2)
    a, b, s = _adapters(gen, torch.float64)
    for t in (*a, *b):
        t.requires_grad_(True)
    w = torch.randn(N, K, generator=gen, dtype=torch.float64)
    x = torch.randn(rows, K, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randint(-1, 3, (rows,), generator=gen)
    ops.lora_linear_mixed(x, w, None, a, b, s, g).pow(2).sum().backward()
    grads = [None if t.grad is None else t.grad.clone() for t in (x, *a, *b)]
    for t in (x, *a, *b):
        t.grad = None
    _per_row(x, w, None, a, b, s, g).pow(2).sum().backward()
    for got, t in zip(grads, (x, *a, *b)):
        assert (got is None) == (t.grad is None)  # an adapter no row uses gets no gradient, as in PEFT
        if got is not None:
            assert_close(got, t.grad, FP32_SAME_MATH, "grad")


def test_registered_op_and_compile():
    gen = torch.Generator().manual_seed(3)
    a, b, s = _adapters(gen)
    w, x = torch.randn(N, K, generator=gen), torch.randn(5, K, generator=gen)
    g = torch.tensor([0, -1, 2, 1, 0])
    expected = ops.lora_linear_mixed(x, w, None, a, b, s, g)
    direct = torch.ops.peft_kernels.lora_linear_mixed(x, w, None, a, b, [None] * 3, s, g)
    assert_close(direct, expected, (0.0, 0.0), "torch.ops")
    compiled = torch.compile(lambda *t: ops.lora_linear_mixed(*t), backend="eager", fullgraph=True)
    assert_close(compiled(x, w, None, a, b, s, g), expected, (0.0, 0.0), "compiled")
