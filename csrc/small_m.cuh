// Small-M (decode, M <= 16) linear + LoRA, shared by lora.cu (fp16/bf16 weights) and lora_int8.cu (int8 weights).
//
//   S = x·Aᵀ                                              [M, r]  fp32   (lora_shrink_kernel, lora.cu)
//   y = (x·Wᵀ)⊙scale + b + s·(S·Bᵀ + b_B)                 [M, N]  x dtype (gemv_lora_kernel, below)
//
// At M <= 16 the linear is a read of W (2NK bytes in bf16, NK in int8); everything else is noise. Each warp owns
// two output columns n and streams their W rows once with 16-byte loads, keeping the M×2 partial dot products
// in registers; x (M·K·2 bytes) is re-read by every warp from L1/L2. The LoRA expand is folded into the same
// registers before the warp reduction (r·M FMAs per column), so y is written exactly once, rounded once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common.h"
#include "switch.h"

namespace peft_kernels {

// Largest M the decode kernels take; the dispatcher sends anything bigger to the GEMM-shaped backends.
constexpr int kSmallMMax = 16;
// K is consumed in chunks of 16 elements per lane (one 16-byte int8 load, two 16-byte fp16/bf16 loads).
constexpr int kChunkK = 16;

// Weight-type tag for launch_gemv_lora / run_small_m: W has the activation dtype (fp16 or bf16, no scale).
struct ActivationWeight {};

struct SmallMArgs {
  // Pointers (device addresses; 0 = absent)
  std::uintptr_t x, weight, weight_scale, bias, lora_a, lora_b, lora_b_bias, s_out, y;
  // Dimensions
  std::int64_t m, n, k, r;
  // Strides, in elements (the innermost stride of x, W and A is 1; bias, scale, b_B are dense)
  std::int64_t stride_xm, stride_wn, stride_ar, stride_bn, stride_br, stride_sm, stride_ym;
  // Types and scalars
  DType dtype, adapter_dtype;
  float scaling;
};

// ---- element conversion ------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- vector loads: 8 or 16 consecutive elements → fp32 registers (16-byte aligned addresses) ------------------

__device__ __forceinline__ void load8(const __half* p, float (&out)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&out)[8]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bf16 → fp32 is a 16-bit shift: the low half is element 2i, the high half element 2i+1.
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
  const float4 lo = __ldg(reinterpret_cast<const float4*>(p));
  const float4 hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
  out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
  out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
}

template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&out)[16]) {
  float lo[8], hi[8];
  load8(p, lo);
  load8(p + 8, hi);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = lo[i], out[8 + i] = hi[i];
}

__device__ __forceinline__ void load16(const std::int8_t* p, float (&out)[16]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Byte j of word i, sign-extended; integers in [-127, 127] are exact in fp32.
      out[4 * i + j] = static_cast<float>(static_cast<std::int8_t>((words[i] >> (8 * j)) & 0xffu));
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- fused GEMV + LoRA epilogue ----------------------------------------------------------------------------

constexpr int kGemvWarps = 4;        // 128 threads: enough CTAs for N >= 1024 on 132 SMs
constexpr int kGemvColsPerWarp = 2;  // two W rows per warp: each x chunk loaded once feeds 2 dot products

// y[m, n] = (Σ_k x[m, k]·W[n, k])·scale[n] + bias[n] + s·(Σ_r S[m, r]·B[n, r] + b_B[n]),  m < M <= 16.
// T: activation dtype (x, y, bias). WT: weight dtype (T, or int8 with scale). BT: adapter dtype (T or float).
template <typename T, typename WT, typename BT>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_lora_kernel(
    // Pointers
    const T* __restrict__ x, const WT* __restrict__ w, const float* __restrict__ w_scale, const T* __restrict__ bias,
    const float* __restrict__ lora_s, const BT* __restrict__ lora_b, const BT* __restrict__ lora_b_bias,
    T* __restrict__ y,
    // Dimensions
    int M, int N, int K, int R,
    // Strides (elements)
    std::int64_t stride_xm, std::int64_t stride_wn, std::int64_t stride_sm, std::int64_t stride_bn,
    std::int64_t stride_br, std::int64_t stride_ym,
    // Scalars
    float scaling) {
  constexpr bool kHasScale = std::is_same<WT, std::int8_t>::value;
  const int lane = threadIdx.x % 32;
  const int n0 = (blockIdx.x * kGemvWarps + threadIdx.x / 32) * kGemvColsPerWarp;
  if (n0 >= N) return;  // whole warp leaves; there is no block-level synchronisation in this kernel
  // N odd: the second column re-reads the first row (in bounds, result discarded) instead of branching per load.
  const bool has_n1 = n0 + 1 < N;
  const int n1 = has_n1 ? n0 + 1 : n0;

  float acc[kSmallMMax][kGemvColsPerWarp];
#pragma unroll
  for (int m = 0; m < kSmallMMax; ++m) acc[m][0] = acc[m][1] = 0.f;

  // ---- main loop: lane-strided 16-element chunks of K ----
  const WT* w0 = w + n0 * stride_wn;
  const WT* w1 = w + n1 * stride_wn;
  for (int k = lane * kChunkK; k < K; k += 32 * kChunkK) {
    float wa[kChunkK], wb[kChunkK];
    load16(w0 + k, wa);
    load16(w1 + k, wb);
#pragma unroll
    for (int m = 0; m < kSmallMMax; ++m) {
      if (m < M) {  // uniform across the grid: rows beyond M cost one compare, no loads or FMAs
        float xv[kChunkK];
        load16(x + m * stride_xm + k, xv);
#pragma unroll
        for (int i = 0; i < kChunkK; ++i) {
          acc[m][0] = fmaf(xv[i], wa[i], acc[m][0]);
          acc[m][1] = fmaf(xv[i], wb[i], acc[m][1]);
        }
      }
    }
  }

  // ---- epilogue: per-row scale, then the LoRA expand S·Bᵀ added to the same lane partials ----
  if constexpr (kHasScale) {
    const float scale0 = w_scale[n0], scale1 = w_scale[n1];
#pragma unroll
    for (int m = 0; m < kSmallMMax; ++m) acc[m][0] *= scale0, acc[m][1] *= scale1;
  }
  for (int r = lane; r < R; r += 32) {
    const float b0 = scaling * to_float(lora_b[n0 * stride_bn + r * stride_br]);
    const float b1 = scaling * to_float(lora_b[n1 * stride_bn + r * stride_br]);
#pragma unroll
    for (int m = 0; m < kSmallMMax; ++m) {
      if (m < M) {
        const float s = lora_s[m * stride_sm + r];
        acc[m][0] = fmaf(s, b0, acc[m][0]);
        acc[m][1] = fmaf(s, b1, acc[m][1]);
      }
    }
  }

  // ---- reduction over lanes, bias terms, one rounding to T ----
  float add0 = 0.f, add1 = 0.f;
  if (bias != nullptr) add0 += to_float(bias[n0]), add1 += to_float(bias[n1]);
  if (lora_b_bias != nullptr) add0 += scaling * to_float(lora_b_bias[n0]), add1 += scaling * to_float(lora_b_bias[n1]);
#pragma unroll
  for (int m = 0; m < kSmallMMax; ++m) {
    if (m < M) {
      const float v0 = warp_sum(acc[m][0]);
      const float v1 = warp_sum(acc[m][1]);
      if (lane == 0) {
        y[m * stride_ym + n0] = from_float<T>(v0 + add0);
        if (has_n1) y[m * stride_ym + n1] = from_float<T>(v1 + add1);
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------------------

// Checks shared by every small-M launcher: ValueError before anything touches CUDA.
inline void validate_rows_and_x(const SmallMArgs& a) {
  PK_CHECK(a.m >= 1 && a.m <= kSmallMMax, "M = " << a.m << " must be in [1, " << kSmallMMax << "]");
  PK_CHECK(a.k >= kChunkK && a.k % kChunkK == 0 && a.k < (std::int64_t{1} << 31),
           "K = " << a.k << " must be a positive multiple of " << kChunkK);
  PK_CHECK(a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16,
           "activation dtype " << dtype_name(a.dtype) << " is not float16/bfloat16");
  PK_CHECK(a.x != 0 && is_aligned(a.x, 16) && a.stride_xm % 8 == 0,
           "x must be non-null, 16-byte aligned, with a row stride % 8 == 0 (stride " << a.stride_xm << ")");
}

inline void validate_adapter(const SmallMArgs& a) {
  PK_CHECK(a.r >= 1 && a.r <= 4096, "r = " << a.r << " out of range [1, 4096]");
  PK_CHECK(a.adapter_dtype == a.dtype || a.adapter_dtype == DType::kFloat32,
           "adapter dtype " << dtype_name(a.adapter_dtype) << " must be the activation dtype or float32");
  PK_CHECK(a.lora_a != 0 && a.s_out != 0, "lora_a and s_out must be non-null");
  PK_CHECK(is_aligned(a.lora_a, 16) && a.stride_ar % (a.adapter_dtype == DType::kFloat32 ? 4 : 8) == 0,
           "lora_a must be 16-byte aligned with 16-byte aligned rows (stride " << a.stride_ar << ")");
  PK_CHECK(a.stride_sm >= a.r, "S row stride " << a.stride_sm << " < r");
}

inline void validate_small_m(const SmallMArgs& a, bool int8_weight) {
  validate_rows_and_x(a);
  PK_CHECK(a.n >= 1 && a.n < (std::int64_t{1} << 31), "N = " << a.n << " out of range");
  PK_CHECK(a.r >= 0, "r = " << a.r << " must be >= 0");
  PK_CHECK(a.weight != 0 && a.y != 0, "weight and y must be non-null");
  PK_CHECK(is_aligned(a.weight, 16) && a.stride_wn % (int8_weight ? 16 : 8) == 0,
           "weight must be 16-byte aligned with 16-byte aligned rows (stride " << a.stride_wn << ")");
  PK_CHECK(!int8_weight || a.weight_scale != 0, "int8 weights need weight_scale");
  PK_CHECK(a.stride_ym >= a.n, "y row stride " << a.stride_ym << " < N");
  if (a.r > 0) {
    validate_adapter(a);
    PK_CHECK(a.lora_b != 0, "r > 0 needs lora_b");
  }
}

// S = x·Aᵀ into a.s_out (fp32 [M, r], row stride stride_sm); defined in lora.cu.
void launch_lora_shrink(const SmallMArgs& a, cudaStream_t stream);

template <typename WT>
void launch_gemv_lora(const SmallMArgs& a, cudaStream_t stream) {
  const int cols_per_block = kGemvWarps * kGemvColsPerWarp;
  const dim3 grid(static_cast<unsigned>((a.n + cols_per_block - 1) / cols_per_block));
  HALF_DTYPE_SWITCH(a.dtype, T, [&] {
    // ActivationWeight → W has type T; int8_t → int8 W with per-row scales.
    using WeightT = typename std::conditional<std::is_same<WT, std::int8_t>::value, std::int8_t, T>::type;
    BOOL_SWITCH(a.adapter_dtype == DType::kFloat32, kFp32Adapter, [&] {
      using BT = typename std::conditional<kFp32Adapter, float, T>::type;
      gemv_lora_kernel<T, WeightT, BT><<<grid, kGemvWarps * 32, 0, stream>>>(
          reinterpret_cast<const T*>(a.x), reinterpret_cast<const WeightT*>(a.weight),
          reinterpret_cast<const float*>(a.weight_scale), reinterpret_cast<const T*>(a.bias),
          reinterpret_cast<const float*>(a.s_out), reinterpret_cast<const BT*>(a.lora_b),
          reinterpret_cast<const BT*>(a.lora_b_bias), reinterpret_cast<T*>(a.y), static_cast<int>(a.m),
          static_cast<int>(a.n), static_cast<int>(a.k), static_cast<int>(a.r), a.stride_xm, a.stride_wn, a.stride_sm,
          a.stride_bn, a.stride_br, a.stride_ym, a.scaling);
      PK_CHECK_LAUNCH();
    });
  });
}

// Both launchers: validate, guard the device, shrink (when r > 0), then the fused GEMV.
template <typename WT>
void run_small_m(const SmallMArgs& a, int device, std::uintptr_t stream) {
  constexpr bool kInt8 = std::is_same<WT, std::int8_t>::value;
  validate_small_m(a, kInt8);
  DeviceGuard guard(device);
  if (a.r > 0) launch_lora_shrink(a, as_stream(stream));
  launch_gemv_lora<WT>(a, as_stream(stream));
}

}  // namespace peft_kernels
