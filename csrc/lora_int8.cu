// LoRA over an int8 weight-only base at decode shapes (W8A16, M <= 16):
//
//   y[m, n] = (Σ_k x[m, k]·CB[n, k])·scale[n] + b[n] + s·(Σ_r S[m, r]·B[n, r] + b_B[n]),   S = x·Aᵀ
//
// CB is int8 [N, K] (bitsandbytes' layout), scale fp32 [N] (SCB/127, backends/reference/lora_int8.py). Each lane
// converts 16 int8 weights per 16-byte load to fp32 in registers (exact: |CB| <= 127) and the scale multiplies
// the fp32 dot product once per output, before the LoRA term is added, so the LoRA term is never scaled. W is
// read once at 1 byte per weight: half the bf16 GEMV's traffic, the whole point at decode (docs/KERNELS.md §6, §8).
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "small_m.cuh"

namespace peft_kernels {

void lora_linear_int8_fwd_launch(std::uintptr_t x, std::uintptr_t weight_int8, std::uintptr_t weight_scale,
                                 std::uintptr_t bias, std::uintptr_t lora_a, std::uintptr_t lora_b,
                                 std::uintptr_t lora_b_bias, std::uintptr_t s_out, std::uintptr_t y, std::int64_t m,
                                 std::int64_t n, std::int64_t k, std::int64_t r, std::int64_t stride_xm,
                                 std::int64_t stride_wn, std::int64_t stride_ar, std::int64_t stride_bn,
                                 std::int64_t stride_br, std::int64_t stride_sm, std::int64_t stride_ym, int dtype,
                                 int adapter_dtype, double scaling, int device, std::uintptr_t stream) {
  const SmallMArgs a{x,         weight_int8, weight_scale, bias,      lora_a,    lora_b,
                     lora_b_bias, s_out,     y,            m,         n,         k,
                     r,         stride_xm,   stride_wn,    stride_ar, stride_bn, stride_br,
                     stride_sm, stride_ym,   to_dtype(dtype), to_dtype(adapter_dtype), static_cast<float>(scaling)};
  run_small_m<std::int8_t>(a, device, stream);
}

}  // namespace peft_kernels
