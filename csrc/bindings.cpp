// peft_kernels._C: pybind11 bindings of the raw-pointer launchers (csrc/README.md).
//
// Importing this module touches no CUDA API: there are no static initializers that call the runtime, so it imports
// on a machine without a driver or GPU. runtime_check() probes the driver and devices when Python asks (once,
// lazily, from peft_kernels/backends/cuda/__init__.py); every launcher's first CUDA call is its DeviceGuard, which
// turns "no driver / no device" into a RuntimeError before any kernel is enqueued.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>

#include "common.h"
#include "launchers.h"

// Set by setup.py from the -gencode list; defaults keep a hand build compiling.
#ifndef PK_CUDA_ARCHS
#define PK_CUDA_ARCHS ""
#endif
#ifndef PK_CUDA_PTX
#define PK_CUDA_PTX ""
#endif
#ifndef PK_NVCC_VERSION
#define PK_NVCC_VERSION ""
#endif

namespace py = pybind11;
namespace pk = peft_kernels;

namespace peft_kernels {

std::string runtime_check() {
  int driver = 0;
  cudaError_t err = cudaDriverGetVersion(&driver);
  if (err != cudaSuccess) {
    return std::string("cudaDriverGetVersion failed: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  }
  if (driver == 0) return "no CUDA driver is installed (libcuda.so not found)";
  // CUDA minor-version compatibility: a 13.x runtime runs on any 13.y driver, not on a 12.x one.
  if (driver / 1000 < CUDART_VERSION / 1000) {
    std::ostringstream os;
    os << "the CUDA driver supports CUDA " << driver / 1000 << "." << (driver % 1000) / 10
       << " but peft_kernels._C was built with the CUDA " << CUDART_VERSION / 1000 << "."
       << (CUDART_VERSION % 1000) / 10 << " runtime; update the driver or rebuild with a matching toolkit";
    return os.str();
  }
  int count = 0;
  err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    return std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  }
  if (count == 0) return "no CUDA device is visible";
  return "";
}

}  // namespace peft_kernels

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "peft_kernels CUDA kernels: launchers on raw device pointers (uintptr_t), int64 sizes/strides in elements, "
      "int dtype codes and a uintptr_t cudaStream_t. Called only from peft_kernels/backends/cuda/.";
  m.attr("ABI_VERSION") = pk::kAbiVersion;

  m.def("build_info", [] {
    py::dict info;
    info["abi_version"] = pk::kAbiVersion;
    info["cuda_runtime_version"] = CUDART_VERSION;
    info["nvcc_version"] = PK_NVCC_VERSION;
    info["cuda_archs"] = PK_CUDA_ARCHS;
    info["cuda_ptx"] = PK_CUDA_PTX;
    info["pybind11_version"] = PYBIND11_VERSION_MAJOR * 10000 + PYBIND11_VERSION_MINOR * 100 + PYBIND11_VERSION_PATCH;
    info["host_compiler"] = __VERSION__;
    return info;
  }, "Build facts (no CUDA call): runtime version, nvcc version, cubin archs ('80;90'), PTX archs, pybind11.");

  m.def("dtype_codes", [] {
    py::dict codes;
    codes["float16"] = static_cast<int>(pk::DType::kFloat16);
    codes["bfloat16"] = static_cast<int>(pk::DType::kBFloat16);
    codes["float32"] = static_cast<int>(pk::DType::kFloat32);
    codes["int8"] = static_cast<int>(pk::DType::kInt8);
    return codes;
  }, "The DType codes of csrc/common.h, mirrored by peft_kernels/backends/cuda/_launch.py.");

  m.def("runtime_check", &pk::runtime_check,
        "Probes driver and devices: '' when usable, else the reason. The only function here that calls CUDA "
        "without being asked to launch.");

  // Launchers: the GIL is released while they validate and enqueue (they never wait for the GPU).
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("lora_shrink_launch", &pk::lora_shrink_launch, nogil, py::arg("x"), py::arg("lora_a"), py::arg("s_out"),
        py::arg("m"), py::arg("k"), py::arg("r"), py::arg("stride_xm"), py::arg("stride_ar"), py::arg("stride_sm"),
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("device"), py::arg("stream"),
        "S[m, r] = sum_k x[m, k] * A[r, k] (fp32), M <= 16, deterministic.");

  m.def("lora_linear_fwd_launch", &pk::lora_linear_fwd_launch, nogil, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("lora_b_bias"), py::arg("s_out"), py::arg("y"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("r"), py::arg("stride_xm"), py::arg("stride_wn"),
        py::arg("stride_ar"), py::arg("stride_bn"), py::arg("stride_br"), py::arg("stride_sm"), py::arg("stride_ym"),
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("scaling"), py::arg("device"), py::arg("stream"),
        "y = x W^T + b + s (S B^T + b_B), S = x A^T; M <= 16, fp16/bf16 W.");

  m.def("lora_linear_int8_fwd_launch", &pk::lora_linear_int8_fwd_launch, nogil, py::arg("x"), py::arg("weight_int8"),
        py::arg("weight_scale"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("lora_b_bias"),
        py::arg("s_out"), py::arg("y"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("r"), py::arg("stride_xm"),
        py::arg("stride_wn"), py::arg("stride_ar"), py::arg("stride_bn"), py::arg("stride_br"), py::arg("stride_sm"),
        py::arg("stride_ym"), py::arg("dtype"), py::arg("adapter_dtype"), py::arg("scaling"), py::arg("device"),
        py::arg("stream"), "y = (x CB^T) * scale + b + s (S B^T + b_B), S = x A^T; M <= 16, int8 W.");

  m.def("prefix_kv_fill_launch", &pk::prefix_kv_fill_launch, nogil, py::arg("prefix"), py::arg("k_bufs"),
        py::arg("v_bufs"), py::arg("batch"), py::arg("heads"), py::arg("prefix_len"), py::arg("head_dim"),
        py::arg("prefix_strides"), py::arg("buf_strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "K_l[b, :, :P] = prefix[l, 0], V_l[b, :, :P] = prefix[l, 1] for every b.");

  m.def("kv_append_launch", &pk::kv_append_launch, nogil, py::arg("k_buf"), py::arg("v_buf"), py::arg("k"),
        py::arg("v"), py::arg("batch"), py::arg("heads"), py::arg("rows"), py::arg("head_dim"), py::arg("buf_rows"),
        py::arg("offset"), py::arg("k_buf_strides"), py::arg("v_buf_strides"), py::arg("k_strides"),
        py::arg("v_strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "K[:, :, offset:offset+T] = k, V[:, :, offset:offset+T] = v.");

  m.def("prefix_kv_fill_bwd_launch", &pk::prefix_kv_fill_bwd_launch, nogil, py::arg("dk_bufs"), py::arg("dv_bufs"),
        py::arg("out"), py::arg("batch"), py::arg("heads"), py::arg("prefix_len"), py::arg("head_dim"),
        py::arg("grad_strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "out[l, 0] = sum_b dK_l[b, :, :P], out[l, 1] = sum_b dV_l[b, :, :P], b in order, fp32 accumulation.");
}
