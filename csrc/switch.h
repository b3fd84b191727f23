// Compile-time specialisation from runtime values: each switch instantiates its body once per case, so the
// kernels see constants (types, flags) instead of branching per element. Keep the case lists short: every case
// is a kernel compiled for every architecture (build time on a 2-core CI box, csrc/README.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.h"

// BOOL_SWITCH(cond, NAME, [&] { kernel<NAME><<<...>>>(...); });
#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// HALF_DTYPE_SWITCH(dtype, T, [&] { ... T ... }): T = __half or __nv_bfloat16 (the activation dtypes of the
// GEMV kernels); anything else is a ValueError naming the dtype.
#define HALF_DTYPE_SWITCH(DTYPE, T, ...)                                                              \
  [&] {                                                                                               \
    switch (DTYPE) {                                                                                  \
      case ::peft_kernels::DType::kFloat16: {                                                         \
        using T = __half;                                                                             \
        return __VA_ARGS__();                                                                         \
      }                                                                                               \
      case ::peft_kernels::DType::kBFloat16: {                                                        \
        using T = __nv_bfloat16;                                                                      \
        return __VA_ARGS__();                                                                         \
      }                                                                                               \
      default:                                                                                        \
        PK_CHECK(false, "dtype " << ::peft_kernels::dtype_name(DTYPE) << " is not float16/bfloat16"); \
    }                                                                                                 \
  }()

// FLOAT_DTYPE_SWITCH(dtype, T, [&] { ... }): T = __half, __nv_bfloat16 or float.
#define FLOAT_DTYPE_SWITCH(DTYPE, T, ...)                                                                     \
  [&] {                                                                                                       \
    switch (DTYPE) {                                                                                          \
      case ::peft_kernels::DType::kFloat16: {                                                                 \
        using T = __half;                                                                                     \
        return __VA_ARGS__();                                                                                 \
      }                                                                                                       \
      case ::peft_kernels::DType::kBFloat16: {                                                                \
        using T = __nv_bfloat16;                                                                              \
        return __VA_ARGS__();                                                                                 \
      }                                                                                                       \
      case ::peft_kernels::DType::kFloat32: {                                                                 \
        using T = float;                                                                                      \
        return __VA_ARGS__();                                                                                 \
      }                                                                                                       \
      default:                                                                                                \
        PK_CHECK(false, "dtype " << ::peft_kernels::dtype_name(DTYPE) << " is not float16/bfloat16/float32"); \
    }                                                                                                         \
  }()
