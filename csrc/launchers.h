// Host launchers of the peft_kernels CUDA extension, as bindings.cpp exposes them to Python.
//
// Conventions (csrc/README.md): device tensors arrive as raw addresses (uintptr_t, 0 = absent), sizes and strides
// as int64 in elements, dtypes as DType codes (common.h), the stream as a cudaStream_t cast to uintptr_t. A
// launcher validates its arguments (ValueError), makes `device` current (RuntimeError without a driver or GPU),
// enqueues its kernels on `stream`, checks the launch and returns: it never allocates, never synchronizes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace peft_kernels {

// S[m, r] = Σ_k x[m, k]·A[r, k] in fp32, for M <= 16 rows (lora.cu).
void lora_shrink_launch(std::uintptr_t x, std::uintptr_t lora_a, std::uintptr_t s_out, std::int64_t m,
                        std::int64_t k, std::int64_t r, std::int64_t stride_xm, std::int64_t stride_ar,
                        std::int64_t stride_sm, int dtype, int adapter_dtype, int device, std::uintptr_t stream);

// y = x·Wᵀ + b + s·(S·Bᵀ + b_B) with S = x·Aᵀ, M <= 16, W fp16/bf16 of x's dtype (lora.cu). r = 0: no LoRA.
void lora_linear_fwd_launch(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t lora_a,
                            std::uintptr_t lora_b, std::uintptr_t lora_b_bias, std::uintptr_t s_out, std::uintptr_t y,
                            std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t r, std::int64_t stride_xm,
                            std::int64_t stride_wn, std::int64_t stride_ar, std::int64_t stride_bn,
                            std::int64_t stride_br, std::int64_t stride_sm, std::int64_t stride_ym, int dtype,
                            int adapter_dtype, double scaling, int device, std::uintptr_t stream);

// The same with an int8 W and fp32 per-row scales: y = (x·W_int8ᵀ)⊙scale + b + s·(S·Bᵀ + b_B) (lora_int8.cu).
void lora_linear_int8_fwd_launch(std::uintptr_t x, std::uintptr_t weight_int8, std::uintptr_t weight_scale,
                                 std::uintptr_t bias, std::uintptr_t lora_a, std::uintptr_t lora_b,
                                 std::uintptr_t lora_b_bias, std::uintptr_t s_out, std::uintptr_t y, std::int64_t m,
                                 std::int64_t n, std::int64_t k, std::int64_t r, std::int64_t stride_xm,
                                 std::int64_t stride_wn, std::int64_t stride_ar, std::int64_t stride_bn,
                                 std::int64_t stride_br, std::int64_t stride_sm, std::int64_t stride_ym, int dtype,
                                 int adapter_dtype, double scaling, int device, std::uintptr_t stream);

// K_l[b, h, p, :] = prefix[l, 0, h, p, :], V_l likewise, p < P, for every b (prefix_kv.cu).
// Strides: prefix (layer, kv, head, row), buffers (batch, head, row), shared by all 2L buffers; last dims dense.
void prefix_kv_fill_launch(std::uintptr_t prefix, const std::vector<std::uintptr_t>& k_bufs,
                           const std::vector<std::uintptr_t>& v_bufs, std::int64_t batch, std::int64_t heads,
                           std::int64_t prefix_len, std::int64_t head_dim, const std::vector<std::int64_t>& prefix_strides,
                           const std::vector<std::int64_t>& buf_strides, int dtype, int device, std::uintptr_t stream);

// K[b, h, offset + t, :] = k[b, h, t, :], V likewise (prefix_kv.cu). Strides (batch, head, row) per tensor.
void kv_append_launch(std::uintptr_t k_buf, std::uintptr_t v_buf, std::uintptr_t k, std::uintptr_t v,
                      std::int64_t batch, std::int64_t heads, std::int64_t rows, std::int64_t head_dim,
                      std::int64_t buf_rows, std::int64_t offset, const std::vector<std::int64_t>& k_buf_strides,
                      const std::vector<std::int64_t>& v_buf_strides, const std::vector<std::int64_t>& k_strides,
                      const std::vector<std::int64_t>& v_strides, int dtype, int device, std::uintptr_t stream);

// out[l, 0] = Σ_b dK_l[b, :, :P], out[l, 1] = Σ_b dV_l[b, :, :P], b in order, fp32 (prefix_kv.cu). `out` is a
// dense [L, 2, H, P, hd] tensor; gradient strides (batch, head, row, col) are shared by all 2L inputs.
void prefix_kv_fill_bwd_launch(const std::vector<std::uintptr_t>& dk_bufs, const std::vector<std::uintptr_t>& dv_bufs,
                               std::uintptr_t out, std::int64_t batch, std::int64_t heads, std::int64_t prefix_len,
                               std::int64_t head_dim, const std::vector<std::int64_t>& grad_strides, int dtype,
                               int device, std::uintptr_t stream);

// "" when a driver new enough for this build and at least one sm_80+ device are present, else the reason.
std::string runtime_check();

}  // namespace peft_kernels
