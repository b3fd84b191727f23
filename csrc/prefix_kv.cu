// Prefix key/value buffers (docs/KERNELS.md §7; spec: peft_kernels/backends/reference/prefix.py).
//
//   prefix_kv_fill_kernel      K_l[b, h, p, :] = prefix[l, 0, h, p, :], V_l likewise        for every b, p < P
//   kv_append_kernel           K[b, h, offset + t, :] = k[b, h, t, :], V likewise
//   prefix_kv_fill_bwd_kernel  out[l, kv, h, p, :] = Σ_b dBuf_{l,kv}[b, h, p, :]            b in order, fp32
//
// The copies are dtype-agnostic: they move "units" of 16, 4 or 2 bytes, the widest that divides the row length,
// every base address and every stride in bytes (16 for any head_dim % 8 == 0 in 16-bit dtypes on fresh
// allocations: one 128-bit load/store per thread). The fill reads each prefix unit once and stores it B times,
// so the prefix is never materialized per batch row. Grid: x over (row, unit) of one (layer|batch, kv, head)
// slice, y = head, z = layer·2 + kv (fill, bwd) or batch·2 + kv (append): one 32-bit division per thread.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "common.h"
#include "launchers.h"
#include "small_m.cuh"  // to_float / from_float
#include "switch.h"

namespace peft_kernels {
namespace {

// Buffer addresses travel in the kernel's parameter block (__grid_constant__: indexed in place, no local copy).
// 2 × 64 × 8 = 1 KB, inside the 4 KB parameter limit of every architecture; more layers take more launches.
constexpr int kMaxLayersPerLaunch = 64;
constexpr int kCopyThreads = 256;

struct BufferTable {
  char* k[kMaxLayersPerLaunch];
  char* v[kMaxLayersPerLaunch];
};

struct ConstBufferTable {
  const char* k[kMaxLayersPerLaunch];
  const char* v[kMaxLayersPerLaunch];
};

// (batch, head, row) strides, in units of the copy.
struct Strides3 {
  std::int64_t b, h, s;
};

template <typename U>
__global__ void __launch_bounds__(kCopyThreads) prefix_kv_fill_kernel(
    // Pointers
    const char* __restrict__ prefix, const __grid_constant__ BufferTable bufs,
    // Dimensions
    int batch, int prefix_len, int units_per_row,
    // Strides (units): prefix (layer, kv, head, row), buffers (batch, head, row)
    std::int64_t stride_pl, std::int64_t stride_pkv, std::int64_t stride_ph, std::int64_t stride_pp,
    Strides3 stride_buf) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= prefix_len * units_per_row) return;
  const int p = idx / units_per_row, u = idx - p * units_per_row;
  const int h = blockIdx.y, layer = blockIdx.z >> 1, kv = blockIdx.z & 1;
  const U value = reinterpret_cast<const U*>(prefix)[layer * stride_pl + kv * stride_pkv + h * stride_ph +
                                                      p * stride_pp + u];
  U* dst = reinterpret_cast<U*>(kv ? bufs.v[layer] : bufs.k[layer]) + h * stride_buf.h + p * stride_buf.s + u;
  for (int b = 0; b < batch; ++b) dst[b * stride_buf.b] = value;
}

template <typename U>
__global__ void __launch_bounds__(kCopyThreads) kv_append_kernel(
    // Pointers
    char* __restrict__ k_buf, char* __restrict__ v_buf, const char* __restrict__ k, const char* __restrict__ v,
    // Dimensions
    int rows, int units_per_row, std::int64_t offset,
    // Strides (units)
    Strides3 stride_kbuf, Strides3 stride_vbuf, Strides3 stride_k, Strides3 stride_v) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= rows * units_per_row) return;
  const int t = idx / units_per_row, u = idx - t * units_per_row;
  const int h = blockIdx.y, b = blockIdx.z >> 1, kv = blockIdx.z & 1;
  const Strides3 src_s = kv ? stride_v : stride_k;
  const Strides3 dst_s = kv ? stride_vbuf : stride_kbuf;
  const U* src = reinterpret_cast<const U*>(kv ? v : k);
  U* dst = reinterpret_cast<U*>(kv ? v_buf : k_buf);
  dst[b * dst_s.b + h * dst_s.h + (offset + t) * dst_s.s + u] = src[b * src_s.b + h * src_s.h + t * src_s.s + u];
}

template <typename T>
__global__ void __launch_bounds__(kCopyThreads) prefix_kv_fill_bwd_kernel(
    // Pointers
    const __grid_constant__ ConstBufferTable grads, T* __restrict__ out,
    // Dimensions
    int batch, int heads, int prefix_len, int head_dim,
    // Strides (elements) of every gradient: batch, head, row, col
    std::int64_t stride_b, std::int64_t stride_h, std::int64_t stride_s, std::int64_t stride_d) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= prefix_len * head_dim) return;
  const int p = idx / head_dim, d = idx - p * head_dim;
  const int h = blockIdx.y, layer = blockIdx.z >> 1, kv = blockIdx.z & 1;
  const T* src = reinterpret_cast<const T*>(kv ? grads.v[layer] : grads.k[layer]) + h * stride_h + p * stride_s +
                 d * stride_d;
  // Sequential fp32 additions from 0, b = 0..B-1: the reference's order, so the result is bitwise equal.
  float acc = 0.f;
  for (int b = 0; b < batch; ++b) acc += to_float(src[b * stride_b]);
  out[((static_cast<std::int64_t>(layer * 2 + kv) * heads + h) * prefix_len + p) * head_dim + d] = from_float<T>(acc);
}

// ---- host helpers ------------------------------------------------------------------------------------------

int element_size_of_float_dtype(int dtype) {
  const DType d = to_dtype(dtype);
  PK_CHECK(d == DType::kFloat16 || d == DType::kBFloat16 || d == DType::kFloat32,
           "dtype " << dtype_name(d) << " is not float16/bfloat16/float32");
  return dtype_size(d);
}

// The widest copy unit (16, 4 or 2 bytes; at least the element size) dividing the row and every address/stride.
int pick_unit(int element_size, std::int64_t row_bytes, const std::vector<std::uintptr_t>& addresses,
              const std::vector<std::int64_t>& stride_bytes) {
  for (int unit : {16, 4, 2}) {
    if (unit < element_size) break;
    bool ok = row_bytes % unit == 0;
    for (std::uintptr_t a : addresses) ok = ok && a % unit == 0;
    for (std::int64_t s : stride_bytes) ok = ok && s % unit == 0;
    if (ok) return unit;
  }
  return element_size;
}

#define PK_UNIT_SWITCH(UNIT, U, ...)                                          \
  [&] {                                                                       \
    if ((UNIT) == 16) {                                                       \
      using U = uint4;                                                        \
      return __VA_ARGS__();                                                   \
    } else if ((UNIT) == 4) {                                                 \
      using U = std::uint32_t;                                                \
      return __VA_ARGS__();                                                   \
    } else {                                                                  \
      using U = std::uint16_t;                                                \
      return __VA_ARGS__();                                                   \
    }                                                                         \
  }()

void check_grid(std::int64_t x_items, std::int64_t heads, std::int64_t z) {
  PK_CHECK(x_items < (std::int64_t{1} << 31), "rows × head_dim = " << x_items << " must be < 2^31");
  PK_CHECK(heads >= 1 && heads <= 65535, "heads = " << heads << " must be in [1, 65535]");
  PK_CHECK(z <= 65535, "grid z = " << z << " (2 × batch or layers) must be <= 65535");
}

void check_strides(const std::vector<std::int64_t>& strides, std::size_t n, const char* name) {
  PK_CHECK(strides.size() == n, name << " needs " << n << " strides, got " << strides.size());
}

}  // namespace

void prefix_kv_fill_launch(std::uintptr_t prefix, const std::vector<std::uintptr_t>& k_bufs,
                           const std::vector<std::uintptr_t>& v_bufs, std::int64_t batch, std::int64_t heads,
                           std::int64_t prefix_len, std::int64_t head_dim, const std::vector<std::int64_t>& prefix_strides,
                           const std::vector<std::int64_t>& buf_strides, int dtype, int device, std::uintptr_t stream) {
  const int esize = element_size_of_float_dtype(dtype);
  const std::int64_t layers = static_cast<std::int64_t>(k_bufs.size());
  PK_CHECK(v_bufs.size() == k_bufs.size(), "k_bufs and v_bufs have different lengths");
  check_strides(prefix_strides, 4, "prefix (layer, kv, head, row)");
  check_strides(buf_strides, 3, "buffers (batch, head, row)");
  PK_CHECK(batch >= 0 && prefix_len >= 0 && head_dim >= 0, "negative size");
  if (layers == 0 || batch == 0 || prefix_len == 0 || head_dim == 0) return;
  PK_CHECK(prefix != 0, "prefix must be non-null");
  for (std::int64_t l = 0; l < layers; ++l) PK_CHECK(k_bufs[l] != 0 && v_bufs[l] != 0, "buffer " << l << " is null");
  check_grid(prefix_len * head_dim, heads, 2 * kMaxLayersPerLaunch);

  std::vector<std::uintptr_t> addresses(k_bufs);
  addresses.insert(addresses.end(), v_bufs.begin(), v_bufs.end());
  addresses.push_back(prefix);
  std::vector<std::int64_t> stride_bytes;
  for (std::int64_t s : prefix_strides) stride_bytes.push_back(s * esize);
  for (std::int64_t s : buf_strides) stride_bytes.push_back(s * esize);
  const int unit = pick_unit(esize, head_dim * esize, addresses, stride_bytes);
  const int units_per_row = static_cast<int>(head_dim * esize / unit);
  const std::int64_t per_unit = unit / esize;  // elements per unit; every stride divides by it (pick_unit)

  DeviceGuard guard(device);
  const dim3 block(kCopyThreads);
  for (std::int64_t l0 = 0; l0 < layers; l0 += kMaxLayersPerLaunch) {
    const int chunk = static_cast<int>(std::min<std::int64_t>(kMaxLayersPerLaunch, layers - l0));
    BufferTable table{};
    for (int l = 0; l < chunk; ++l) {
      table.k[l] = reinterpret_cast<char*>(k_bufs[l0 + l]);
      table.v[l] = reinterpret_cast<char*>(v_bufs[l0 + l]);
    }
    const dim3 grid(static_cast<unsigned>((prefix_len * units_per_row + kCopyThreads - 1) / kCopyThreads),
                    static_cast<unsigned>(heads), static_cast<unsigned>(2 * chunk));
    const char* prefix_chunk = reinterpret_cast<const char*>(prefix) + l0 * prefix_strides[0] * esize;
    const Strides3 sb{buf_strides[0] / per_unit, buf_strides[1] / per_unit, buf_strides[2] / per_unit};
    PK_UNIT_SWITCH(unit, U, [&] {
      prefix_kv_fill_kernel<U><<<grid, block, 0, as_stream(stream)>>>(
          prefix_chunk, table, static_cast<int>(batch), static_cast<int>(prefix_len), units_per_row,
          prefix_strides[0] / per_unit, prefix_strides[1] / per_unit, prefix_strides[2] / per_unit,
          prefix_strides[3] / per_unit, sb);
      PK_CHECK_LAUNCH();
    });
  }
}

void kv_append_launch(std::uintptr_t k_buf, std::uintptr_t v_buf, std::uintptr_t k, std::uintptr_t v,
                      std::int64_t batch, std::int64_t heads, std::int64_t rows, std::int64_t head_dim,
                      std::int64_t buf_rows, std::int64_t offset, const std::vector<std::int64_t>& k_buf_strides,
                      const std::vector<std::int64_t>& v_buf_strides, const std::vector<std::int64_t>& k_strides,
                      const std::vector<std::int64_t>& v_strides, int dtype, int device, std::uintptr_t stream) {
  const int esize = element_size_of_float_dtype(dtype);
  for (const auto* s : {&k_buf_strides, &v_buf_strides, &k_strides, &v_strides}) check_strides(*s, 3, "(b, h, row)");
  PK_CHECK(batch >= 0 && rows >= 0 && head_dim >= 0, "negative size");
  PK_CHECK(offset >= 0 && offset + rows <= buf_rows,
           "rows " << offset << ".." << offset + rows << " do not fit in " << buf_rows << " buffer rows");
  if (batch == 0 || rows == 0 || head_dim == 0) return;
  PK_CHECK(k_buf != 0 && v_buf != 0 && k != 0 && v != 0, "pointers must be non-null");
  check_grid(rows * head_dim, heads, 2 * batch);

  std::vector<std::int64_t> stride_bytes;
  for (const auto* s : {&k_buf_strides, &v_buf_strides, &k_strides, &v_strides}) {
    for (std::int64_t x : *s) stride_bytes.push_back(x * esize);
  }
  const int unit = pick_unit(esize, head_dim * esize, {k_buf, v_buf, k, v}, stride_bytes);
  const int units_per_row = static_cast<int>(head_dim * esize / unit);
  const std::int64_t per_unit = unit / esize;
  auto in_units = [&](const std::vector<std::int64_t>& s) {
    return Strides3{s[0] / per_unit, s[1] / per_unit, s[2] / per_unit};
  };

  DeviceGuard guard(device);
  const dim3 grid(static_cast<unsigned>((rows * units_per_row + kCopyThreads - 1) / kCopyThreads),
                  static_cast<unsigned>(heads), static_cast<unsigned>(2 * batch));
  PK_UNIT_SWITCH(unit, U, [&] {
    kv_append_kernel<U><<<grid, kCopyThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<char*>(k_buf), reinterpret_cast<char*>(v_buf), reinterpret_cast<const char*>(k),
        reinterpret_cast<const char*>(v), static_cast<int>(rows), units_per_row, offset, in_units(k_buf_strides),
        in_units(v_buf_strides), in_units(k_strides), in_units(v_strides));
    PK_CHECK_LAUNCH();
  });
}

void prefix_kv_fill_bwd_launch(const std::vector<std::uintptr_t>& dk_bufs, const std::vector<std::uintptr_t>& dv_bufs,
                               std::uintptr_t out, std::int64_t batch, std::int64_t heads, std::int64_t prefix_len,
                               std::int64_t head_dim, const std::vector<std::int64_t>& grad_strides, int dtype,
                               int device, std::uintptr_t stream) {
  const DType d = to_dtype(dtype);
  element_size_of_float_dtype(dtype);
  const std::int64_t layers = static_cast<std::int64_t>(dk_bufs.size());
  PK_CHECK(dv_bufs.size() == dk_bufs.size(), "dk_bufs and dv_bufs have different lengths");
  check_strides(grad_strides, 4, "gradients (batch, head, row, col)");
  PK_CHECK(batch >= 0 && prefix_len >= 0 && head_dim >= 0, "negative size");
  if (layers == 0 || prefix_len == 0 || head_dim == 0) return;
  PK_CHECK(out != 0, "out must be non-null");
  for (std::int64_t l = 0; l < layers; ++l) PK_CHECK(dk_bufs[l] != 0 && dv_bufs[l] != 0, "gradient " << l << " is null");
  check_grid(prefix_len * head_dim, heads, 2 * kMaxLayersPerLaunch);

  DeviceGuard guard(device);
  for (std::int64_t l0 = 0; l0 < layers; l0 += kMaxLayersPerLaunch) {
    const int chunk = static_cast<int>(std::min<std::int64_t>(kMaxLayersPerLaunch, layers - l0));
    ConstBufferTable table{};
    for (int l = 0; l < chunk; ++l) {
      table.k[l] = reinterpret_cast<const char*>(dk_bufs[l0 + l]);
      table.v[l] = reinterpret_cast<const char*>(dv_bufs[l0 + l]);
    }
    const dim3 grid(static_cast<unsigned>((prefix_len * head_dim + kCopyThreads - 1) / kCopyThreads),
                    static_cast<unsigned>(heads), static_cast<unsigned>(2 * chunk));
    FLOAT_DTYPE_SWITCH(d, T, [&] {
      T* out_chunk = reinterpret_cast<T*>(out) + l0 * 2 * heads * prefix_len * head_dim;
      prefix_kv_fill_bwd_kernel<T><<<grid, kCopyThreads, 0, as_stream(stream)>>>(
          table, out_chunk, static_cast<int>(batch), static_cast<int>(heads), static_cast<int>(prefix_len),
          static_cast<int>(head_dim), grad_strides[0], grad_strides[1], grad_strides[2], grad_strides[3]);
      PK_CHECK_LAUNCH();
    });
  }
}

}  // namespace peft_kernels
