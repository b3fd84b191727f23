// Shared host-side plumbing for the peft_kernels CUDA extension: checks that become Python exceptions, the
// dtype codes mirrored in Python, and a device guard. No torch headers (csrc/README.md, "Why this design").
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace peft_kernels {

// Bumped whenever a launcher's signature changes; backends/cuda/_launch.py refuses a stale build with a reason
// instead of calling a launcher with the wrong arguments.
constexpr int kAbiVersion = 1;

// Dtype codes passed as `int dtype` by every launcher. Mirrored in peft_kernels/backends/cuda/_launch.py (DTYPE);
// bindings.cpp exports dtype_codes() and tests/kernels/test_cuda_ext.py pins the two against each other.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kInt8 = 3 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kInt8: return "int8";
  }
  return "unknown";
}

inline int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kInt8: return 1;
  }
  return 0;
}

}  // namespace peft_kernels

// Argument checks: std::invalid_argument, which pybind11 turns into ValueError. `msg` is streamed, so
// PK_CHECK(k % 16 == 0, "K = " << k << " must be a multiple of 16") works.
#define PK_CHECK(cond, msg)                                                                   \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      std::ostringstream pk_os_;                                                              \
      pk_os_ << "peft_kernels._C: check `" #cond "` failed: " << msg;                         \
      throw std::invalid_argument(pk_os_.str());                                              \
    }                                                                                         \
  } while (0)

// CUDA runtime calls: std::runtime_error (→ RuntimeError) naming the call, the error and where it happened.
#define PK_CHECK_CUDA(expr)                                                                   \
  do {                                                                                        \
    const cudaError_t pk_err_ = (expr);                                                       \
    if (pk_err_ != cudaSuccess) {                                                             \
      std::ostringstream pk_os_;                                                              \
      pk_os_ << "peft_kernels._C: CUDA error " << cudaGetErrorName(pk_err_) << " ("           \
             << cudaGetErrorString(pk_err_) << ") from `" #expr "` at " << __FILE__ << ":"   \
             << __LINE__;                                                                     \
      throw std::runtime_error(pk_os_.str());                                                 \
    }                                                                                         \
  } while (0)

// After every <<<...>>>: a bad configuration or a missing kernel image is reported here, not at the next sync.
#define PK_CHECK_LAUNCH() PK_CHECK_CUDA(cudaGetLastError())

namespace peft_kernels {

// Makes `device` current for the launcher's scope and restores the caller's device afterwards. Also the first
// CUDA call of every launcher, so without a driver or a GPU it throws (RuntimeError) before any launch.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PK_CHECK(device >= 0, "device index " << device << " must be >= 0");
    PK_CHECK_CUDA(cudaGetDevice(&previous_));
    if (previous_ != device) {
      PK_CHECK_CUDA(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);  // a destructor must not throw; the launch already succeeded
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline bool is_aligned(std::uintptr_t address, std::int64_t bytes) { return address % bytes == 0; }

inline DType to_dtype(int code) {
  PK_CHECK(code >= 0 && code <= 3, "unknown dtype code " << code << " (0 fp16, 1 bf16, 2 fp32, 3 int8)");
  return static_cast<DType>(code);
}

}  // namespace peft_kernels
