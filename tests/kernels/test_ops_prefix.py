"""prefix_kv_fill / kv_append / prefix_kv_fill_bwd: bitwise against the torch.cat construction PEFT + DynamicCache
produce, the prefix gradient against the fp32 sum over the batch, opcheck (docs/KERNELS.md §7, §11).
"""

from __future__ import annotations

import pytest
import torch
from _tolerances import EXACT, FP32_SAME_MATH, assert_close, assert_close_to_ref

from peft_kernels.ops import _dispatch, kv_append, prefix_kv_write

# (L, B, Hkv, P, T, hd): one layer, batch 1, P = 1, head dims that break 16-byte vectors (59) or need them (128).
SHAPES = {
    "tiny": (1, 1, 1, 1, 1, 8),
    "odd_hd": (3, 2, 2, 5, 3, 59),
    "gqa": (2, 3, 4, 7, 6, 64),
    "wide": (2, 2, 1, 16, 9, 128),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _backend_params():
    params = [pytest.param("reference", "cpu", id="reference-cpu")]
    params += [pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu) for name in ("triton", "cuda")]
    return params


def _skip_unless_available(backend):
    reason = _dispatch.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)


def _skip_unless_runs(backend, op_name, *args):
    reasons = _dispatch.call_reasons(backend, op_name, *args)
    if reasons:
        pytest.skip(f"{backend} does not run this call: {'; '.join(reasons)}")


def _buffers(n_layers, batch, heads, rows, head_dim, dtype, device, sentinel=float("nan")):
    """Per-layer buffers pre-filled with a sentinel, so a row written by mistake or left unwritten shows."""

    def make():
        return torch.full((batch, heads, rows, head_dim), sentinel, dtype=dtype, device=device)

    return [make() for _ in range(n_layers)], [make() for _ in range(n_layers)]


@pytest.mark.parametrize("backend, device", _backend_params())
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fill_then_append_equals_cat(backend, device, shape_id, dtype):
    """K_l[:, :, :P+2T] == cat([prefix[l,0] expanded over B, k_1, k_2], dim=2), bitwise; rows beyond untouched."""
    _skip_unless_available(backend)
    n_layers, batch, heads, prefix_len, new, head_dim = SHAPES[shape_id]
    rows = prefix_len + 2 * new + 3
    prefix = torch.randn(n_layers, 2, heads, prefix_len, head_dim).to(device, dtype)
    k_bufs, v_bufs = _buffers(n_layers, batch, heads, rows, head_dim, dtype, device)
    _skip_unless_runs(backend, "prefix_kv_fill", prefix, k_bufs, v_bufs)
    prefix_kv_write(prefix, k_bufs, v_bufs, backend=backend)

    steps = [[torch.randn(2, batch, heads, new, head_dim).to(device, dtype) for _ in range(n_layers)] for _ in "ab"]
    for step, kv in enumerate(steps):
        for layer in range(n_layers):
            offset = prefix_len + step * new
            kv_append(k_bufs[layer], v_bufs[layer], kv[layer][0], kv[layer][1], offset, backend=backend)

    for layer in range(n_layers):
        for index, buf in ((0, k_bufs[layer]), (1, v_bufs[layer])):
            expected = torch.cat(
                [
                    prefix[layer, index].unsqueeze(0).expand(batch, -1, -1, -1),
                    steps[0][layer][index],
                    steps[1][layer][index],
                ],
                dim=2,
            )
            filled = prefix_len + 2 * new
            assert torch.equal(buf[:, :, :filled], expected), (layer, index)
            assert torch.isnan(buf[:, :, filled:]).all(), "rows past offset+T must stay untouched"


@pytest.mark.parametrize("backend, device", _backend_params())
def test_noncontiguous_buffers_and_inputs(backend, device):
    """Buffers sliced from a larger allocation (odd strides) and a transposed new-token tensor."""
    _skip_unless_available(backend)
    big = torch.zeros(2, 2, 3, 20, 40, device=device)  # [L, B, Hkv, S, hd + pad]
    k_bufs = [big[layer, :, :, :, :32] for layer in range(2)]
    v_bufs = [torch.zeros(2, 3, 20, 32, device=device) for _ in range(2)]
    prefix = torch.randn(2, 2, 3, 4, 32, device=device)
    _skip_unless_runs(backend, "prefix_kv_fill", prefix, k_bufs, v_bufs)
    prefix_kv_write(prefix, k_bufs, v_bufs, backend=backend)
    k = torch.randn(2, 5, 3, 32, device=device).transpose(1, 2)  # [B, Hkv, T, hd], non-contiguous
    kv_append(k_bufs[1], v_bufs[1], k, k * 2, 4, backend=backend)
    assert torch.equal(k_bufs[0][:, :, :4], prefix[0, 0].expand(2, -1, -1, -1))
    assert torch.equal(k_bufs[1][:, :, 4:9], k) and torch.equal(v_bufs[1][:, :, 4:9], k * 2)
    assert (big[..., 32:] == 0).all(), "padding columns of the parent allocation must stay untouched"


@pytest.mark.parametrize("backend, device", _backend_params())
@pytest.mark.parametrize("shape_id", ["odd_hd", "gqa", "wide"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_gradient_is_fp32_batch_sum(backend, device, shape_id, dtype):
    """dprefix[l, i] = Σ_b dBuf[b, :, :P]: bitwise the sequential fp32 sum rounded once, and within the 2x rule of
    the fp64 sum (eager baseline: torch.sum in the dtype)."""
    _skip_unless_available(backend)
    n_layers, batch, heads, prefix_len, new, head_dim = SHAPES[shape_id]
    rows = prefix_len + new
    grads_k = [torch.randn(batch, heads, rows, head_dim).to(device, dtype) for _ in range(n_layers)]
    grads_v = [torch.randn(batch, heads, rows, head_dim).to(device, dtype) for _ in range(n_layers)]
    _skip_unless_runs(backend, "prefix_kv_fill_bwd", grads_k, grads_v, prefix_len)
    with _dispatch.force_backend(backend):
        out = torch.ops.peft_kernels.prefix_kv_fill_bwd(grads_k, grads_v, prefix_len)
    assert out.shape == (n_layers, 2, heads, prefix_len, head_dim) and out.dtype == dtype

    stacked = torch.stack([torch.stack([gk, gv]) for gk, gv in zip(grads_k, grads_v)])[..., :prefix_len, :]
    sequential = torch.zeros(stacked[:, :, 0].shape, dtype=torch.float32, device=device)
    for b in range(batch):
        sequential += stacked[:, :, b].float()
    assert torch.equal(out, sequential.to(dtype))
    truth = stacked.double().sum(2)
    assert_close_to_ref(out, stacked.sum(2), truth, dtype, "dprefix")


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_through_fill_and_append(dtype):
    """prefix.grad = Σ_b of the buffer gradient's prefix rows; k/v grads = their rows; same as the cat graph."""
    n_layers, batch, heads, prefix_len, new, head_dim = SHAPES["odd_hd"]
    prefix = torch.randn(n_layers, 2, heads, prefix_len, head_dim, dtype=dtype, requires_grad=True)
    new_kv = [torch.randn(2, batch, heads, new, head_dim, dtype=dtype, requires_grad=True) for _ in range(n_layers)]
    weights = [torch.randn(2, batch, heads, prefix_len + new, head_dim, dtype=dtype) for _ in range(n_layers)]

    k_bufs, v_bufs = _buffers(n_layers, batch, heads, prefix_len + new + 2, head_dim, dtype, "cpu", sentinel=0.0)
    k_bufs, v_bufs = prefix_kv_write(prefix, k_bufs, v_bufs)
    loss = 0
    for layer in range(n_layers):
        k_l, v_l = kv_append(k_bufs[layer], v_bufs[layer], new_kv[layer][0], new_kv[layer][1], prefix_len)
        keys, values = k_l[:, :, : prefix_len + new], v_l[:, :, : prefix_len + new]
        loss = loss + (keys.float() * weights[layer][0]).sum() + (values.float() * weights[layer][1]).sum()
    loss.backward()

    # The same graph built with torch.cat (what DynamicCache does), in fp32.
    prefix_ref = prefix.detach().float().requires_grad_()
    kv_ref = [t.detach().float().requires_grad_() for t in new_kv]
    loss_ref = 0
    for layer in range(n_layers):
        for index in range(2):
            full = torch.cat([prefix_ref[layer, index].expand(batch, -1, -1, -1), kv_ref[layer][index]], dim=2)
            loss_ref = loss_ref + (full * weights[layer][index]).sum()
    loss_ref.backward()

    # The buffers' gradient rows are the weights (exact in dtype); their sequential fp32 sum over b, rounded once.
    expected = torch.zeros(prefix.shape, dtype=torch.float32)
    for layer in range(n_layers):
        for b in range(batch):
            expected[layer] += weights[layer][:, b, :, :prefix_len].float()
    assert prefix.grad.dtype == dtype
    assert torch.equal(prefix.grad, expected.to(dtype))
    assert_close_to_ref(prefix.grad, prefix_ref.grad.to(dtype), prefix_ref.grad.double(), dtype, "dprefix")
    for layer in range(n_layers):
        assert torch.equal(new_kv[layer].grad, kv_ref[layer].grad.to(dtype))


def test_forced_backend_that_cannot_run_lists_reasons():
    prefix = torch.randn(1, 2, 1, 2, 8)
    k_bufs, v_bufs = _buffers(1, 1, 1, 4, 8, torch.float32, "cpu")
    with pytest.raises(NotImplementedError, match="cuda"):
        prefix_kv_write(prefix, k_bufs, v_bufs, backend="cuda")


def test_invalid_arguments_raise_before_writing():
    prefix = torch.randn(2, 2, 3, 4, 8)
    k_bufs, v_bufs = _buffers(2, 2, 3, 10, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="key and value buffers"):
        prefix_kv_write(prefix, k_bufs[:1], v_bufs)
    with pytest.raises(ValueError, match="fewer than the prefix"):
        prefix_kv_write(prefix, [b[:, :, :3] for b in k_bufs], v_bufs)
    with pytest.raises(ValueError, match="float32"):
        prefix_kv_write(prefix, [b.half() for b in k_bufs], v_bufs)
    with pytest.raises(ValueError, match="do not fit"):
        kv_append(k_bufs[0], v_bufs[0], torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), 7)
    assert all(torch.isnan(b).all() for b in (*k_bufs, *v_bufs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cpu(dtype):
    prefix = torch.randn(2, 2, 3, 4, 8, dtype=dtype)
    k_bufs, v_bufs = _buffers(2, 2, 3, 10, 8, dtype, "cpu", sentinel=0.0)
    torch.library.opcheck(torch.ops.peft_kernels.prefix_kv_fill.default, (prefix, k_bufs, v_bufs))
    k, v = torch.randn(2, 3, 5, 8, dtype=dtype), torch.randn(2, 3, 5, 8, dtype=dtype)
    torch.library.opcheck(torch.ops.peft_kernels.kv_append.default, (k_bufs[0], v_bufs[0], k, v, 4))
    torch.library.opcheck(torch.ops.peft_kernels.prefix_kv_fill_bwd.default, (k_bufs, v_bufs, 4))


def test_prefix_kv_fill_is_the_public_name_and_prefix_kv_write_its_alias():
    from peft_kernels import ops

    assert ops.prefix_kv_write is ops.prefix_kv_fill


# ---- the dispatcher's per-call work (#16) ---------------------------------------------------------------------


def test_kv_append_choice_is_made_once_for_every_offset(monkeypatch):
    """A decode loop appends at a new offset every step; no capability check reads the offset, so the cached choice
    must serve every step (keyed on it, each step was a cache miss running the checks again)."""
    calls = []
    real = _dispatch._choose
    monkeypatch.setattr(_dispatch, "_choose", lambda *args: calls.append(args[0]) or real(*args))
    _dispatch.clear_choices()
    k_buf, v_buf = torch.zeros(2, 3, 12, 8), torch.zeros(2, 3, 12, 8)
    with _dispatch.force_backend("reference"):  # a forced backend takes the full call signature as its key
        for offset in range(10):
            k, v = torch.full((2, 3, 1, 8), float(offset)), torch.full((2, 3, 1, 8), -float(offset))
            kv_append(k_buf, v_buf, k, v, offset)
    _dispatch.clear_choices()
    assert calls == ["kv_append"]
    assert torch.equal(k_buf[0, 0, :10, 0], torch.arange(10.0)) and torch.equal(
        v_buf[1, 2, :10, 7], -torch.arange(10.0)
    )


def test_backend_environment_variable_is_read_on_every_call(monkeypatch):
    """PEFT_KERNELS_BACKEND set or removed after import takes effect on the next call (read through os.environ's
    own dict, which every os.environ write updates)."""
    seen = []
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    _dispatch.run_with_backend(None, lambda: seen.append(_dispatch.forced_backend()))
    monkeypatch.setenv(_dispatch.ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        _dispatch.run_with_backend(None, lambda: seen.append("ran"))
    monkeypatch.delenv(_dispatch.ENV_VAR)
    _dispatch.run_with_backend(None, lambda: seen.append(_dispatch.forced_backend()))
    assert seen == ["reference", None]


def test_zero_layer_fill_writes_nothing():
    prefix = torch.randn(0, 2, 3, 4, 8)
    k_bufs, v_bufs = prefix_kv_write(prefix, [], [])
    assert k_bufs == [] and v_bufs == []


def test_cpu_cache_buffers_keep_saved_views_of_earlier_layers_valid():
    """Each layer's K and V are written in place; a product saved for backward from layer 0 must survive the
    appends to layers 1 and 2 (as attention saves every layer's K/V), and the gradients equal the cat graph's."""
    from peft_kernels.layers.prefix import prefix_kv_buffers

    n_layers, batch, heads, prefix_len, new, head_dim = SHAPES["odd_hd"]
    prefix = torch.randn(n_layers, 2, heads, prefix_len, head_dim, dtype=torch.float64, requires_grad=True)
    ks = [torch.randn(batch, heads, new, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(n_layers)]
    buffers = prefix_kv_buffers(prefix, batch, prefix_len + new)
    loss = 0
    for layer, buffer in enumerate(buffers):
        keys, values = buffer.append(ks[layer], 2 * ks[layer])
        loss = loss + (keys * values).sum()  # saves keys and values of this layer for backward
    loss.backward()
    got = prefix.grad.clone(), [k.grad.clone() for k in ks]
    prefix.grad = None
    for k in ks:
        k.grad = None
    truth = 0
    for layer in range(n_layers):
        keys = torch.cat([prefix[layer, 0].expand(batch, -1, -1, -1), ks[layer]], dim=2)
        values = torch.cat([prefix[layer, 1].expand(batch, -1, -1, -1), 2 * ks[layer]], dim=2)
        truth = truth + (keys * values).sum()
    truth.backward()
    # fp64 on both sides, only the summation order over the batch differs: the same-math tolerance is ample
    assert_close(got[0], prefix.grad, FP32_SAME_MATH, "dprefix")
    for grad, k in zip(got[1], ks):
        assert_close(grad, k.grad, EXACT, "dk")  # rows of the gradient, copied: bitwise
