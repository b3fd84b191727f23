// LoRA at decode shapes (M <= 16): the shrink S = x·Aᵀ, and the fused fp16/bf16 GEMV + LoRA epilogue.
//
//   lora_shrink_kernel   S[m, r] = Σ_k x[m, k]·A[r, k]                 [M, r] fp32
//   gemv_lora_kernel     y = x·Wᵀ + b + s·(S·Bᵀ + b_B)                 (small_m.cuh, W of x's dtype)
//
// The shrink is split over K inside one CTA: 8 warps each take every 8th 8-element chunk of K, reduce over
// lanes with shuffles and over warps through shared memory in a fixed order. No atomics and no workspace, so
// it is deterministic (docs/KERNELS.md §10.5) and needs a single launch; at decode A is r·K·2 bytes (128 KB at
// r=16, K=4096), so a handful of CTAs suffice. (Unmeasured: no GPU on the development box.)
#include <cuda_runtime.h>

#include "launchers.h"
#include "small_m.cuh"

namespace peft_kernels {
namespace {

constexpr int kShrinkWarps = 8;
constexpr int kShrinkRowsPerBlock = 2;  // r rows per CTA: each x chunk loaded feeds 2 rows of A
constexpr int kShrinkChunk = 8;         // elements per 16-byte load of x

// T: activation dtype of x; AT: adapter dtype (T or float).
template <typename T, typename AT>
__global__ void __launch_bounds__(kShrinkWarps * 32) lora_shrink_kernel(
    // Pointers
    const T* __restrict__ x, const AT* __restrict__ a, float* __restrict__ s,
    // Dimensions
    int M, int K, int R,
    // Strides (elements)
    std::int64_t stride_xm, std::int64_t stride_ar, std::int64_t stride_sm) {
  const int r0 = blockIdx.x * kShrinkRowsPerBlock;
  float acc[kSmallMMax][kShrinkRowsPerBlock];
#pragma unroll
  for (int m = 0; m < kSmallMMax; ++m) {
#pragma unroll
    for (int j = 0; j < kShrinkRowsPerBlock; ++j) acc[m][j] = 0.f;
  }

  // ---- K loop: thread t owns chunks t, t + 256, t + 512, ... (fixed, so the sum order is fixed) ----
  for (int k = threadIdx.x * kShrinkChunk; k < K; k += kShrinkWarps * 32 * kShrinkChunk) {
    float av[kShrinkRowsPerBlock][kShrinkChunk];
#pragma unroll
    for (int j = 0; j < kShrinkRowsPerBlock; ++j) {
      const int row = min(r0 + j, R - 1);  // past R: re-read the last row, result discarded below
      load8(a + row * stride_ar + k, av[j]);
    }
#pragma unroll
    for (int m = 0; m < kSmallMMax; ++m) {
      if (m < M) {
        float xv[kShrinkChunk];
        load8(x + m * stride_xm + k, xv);
#pragma unroll
        for (int j = 0; j < kShrinkRowsPerBlock; ++j) {
#pragma unroll
          for (int i = 0; i < kShrinkChunk; ++i) acc[m][j] = fmaf(xv[i], av[j][i], acc[m][j]);
        }
      }
    }
  }

  // ---- reduce: lanes (butterfly), then warps in index order through shared memory ----
  __shared__ float partial[kShrinkWarps][kSmallMMax][kShrinkRowsPerBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < kSmallMMax; ++m) {
    if (m < M) {
#pragma unroll
      for (int j = 0; j < kShrinkRowsPerBlock; ++j) {
        const float v = warp_sum(acc[m][j]);
        if (lane == 0) partial[warp][m][j] = v;
      }
    }
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < M * kShrinkRowsPerBlock) {
    const int m = t / kShrinkRowsPerBlock, j = t % kShrinkRowsPerBlock;
    if (r0 + j < R) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kShrinkWarps; ++w) sum += partial[w][m][j];
      s[m * stride_sm + r0 + j] = sum;
    }
  }
}

}  // namespace

void launch_lora_shrink(const SmallMArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.r + kShrinkRowsPerBlock - 1) / kShrinkRowsPerBlock));
  HALF_DTYPE_SWITCH(a.dtype, T, [&] {
    BOOL_SWITCH(a.adapter_dtype == DType::kFloat32, kFp32Adapter, [&] {
      using AT = typename std::conditional<kFp32Adapter, float, T>::type;
      lora_shrink_kernel<T, AT><<<grid, kShrinkWarps * 32, 0, stream>>>(
          reinterpret_cast<const T*>(a.x), reinterpret_cast<const AT*>(a.lora_a), reinterpret_cast<float*>(a.s_out),
          static_cast<int>(a.m), static_cast<int>(a.k), static_cast<int>(a.r), a.stride_xm, a.stride_ar,
          a.stride_sm);
      PK_CHECK_LAUNCH();
    });
  });
}

void lora_shrink_launch(std::uintptr_t x, std::uintptr_t lora_a, std::uintptr_t s_out, std::int64_t m,
                        std::int64_t k, std::int64_t r, std::int64_t stride_xm, std::int64_t stride_ar,
                        std::int64_t stride_sm, int dtype, int adapter_dtype, int device, std::uintptr_t stream) {
  SmallMArgs a{};
  a.x = x, a.lora_a = lora_a, a.s_out = s_out;
  a.m = m, a.k = k, a.r = r;
  a.stride_xm = stride_xm, a.stride_ar = stride_ar, a.stride_sm = stride_sm;
  a.dtype = to_dtype(dtype), a.adapter_dtype = to_dtype(adapter_dtype);
  validate_rows_and_x(a);
  validate_adapter(a);
  DeviceGuard guard(device);
  launch_lora_shrink(a, as_stream(stream));
}

void lora_linear_fwd_launch(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t lora_a,
                            std::uintptr_t lora_b, std::uintptr_t lora_b_bias, std::uintptr_t s_out, std::uintptr_t y,
                            std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t r, std::int64_t stride_xm,
                            std::int64_t stride_wn, std::int64_t stride_ar, std::int64_t stride_bn,
                            std::int64_t stride_br, std::int64_t stride_sm, std::int64_t stride_ym, int dtype,
                            int adapter_dtype, double scaling, int device, std::uintptr_t stream) {
  const SmallMArgs a{x,         weight,    0,         bias,      lora_a,    lora_b,
                     lora_b_bias, s_out,   y,         m,         n,         k,
                     r,         stride_xm, stride_wn, stride_ar, stride_bn, stride_br,
                     stride_sm, stride_ym, to_dtype(dtype), to_dtype(adapter_dtype), static_cast<float>(scaling)};
  run_small_m<ActivationWeight>(a, device, stream);
}

}  // namespace peft_kernels
