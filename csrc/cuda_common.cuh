// Device helpers shared by the FlowCut CUDA kernels: dtype conversion, 16-byte vector loads, warp and block
// reductions and scans, the launch-time device facts and launch errors, and the addressing of packed rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "flowcut_cuda.h"

namespace flowcut {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Element i of a tensor of runtime dtype, as float (used for the small relay query).
__device__ __forceinline__ float load_any(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64: return float(static_cast<const double*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// A load unit of T: 16 bytes (VEC) or one element, converted to `width` floats.
template <typename T, bool VEC>
struct Unit;

template <typename T>
struct Unit<T, false> {
  using Raw = T;
  static constexpr int width = 1;
  __device__ static Raw load(const T* p) { return *p; }
  __device__ static void convert(const Raw& r, float* out) { out[0] = to_float(r); }
};

template <>
struct Unit<float, true> {
  using Raw = float4;
  static constexpr int width = 4;
  __device__ static Raw load(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
  __device__ static void convert(const Raw& r, float* out) {
    out[0] = r.x, out[1] = r.y, out[2] = r.z, out[3] = r.w;
  }
};

template <>
struct Unit<double, true> {
  using Raw = double2;
  static constexpr int width = 2;
  __device__ static Raw load(const double* p) { return __ldg(reinterpret_cast<const double2*>(p)); }
  __device__ static void convert(const Raw& r, float* out) { out[0] = float(r.x), out[1] = float(r.y); }
};

template <>
struct Unit<__half, true> {
  using Raw = uint4;
  static constexpr int width = 8;
  __device__ static Raw load(const __half* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ static void convert(const Raw& r, float* out) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  }
};

template <>
struct Unit<__nv_bfloat16, true> {
  using Raw = uint4;
  static constexpr int width = 8;
  __device__ static Raw load(const __nv_bfloat16* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ static void convert(const Raw& r, float* out) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      out[2 * i] = f.x, out[2 * i + 1] = f.y;
    }
  }
};

__device__ __forceinline__ float max_acc(float x, float y) { return fmaxf(x, y); }
__device__ __forceinline__ double max_acc(double x, double y) { return fmax(x, y); }

// Sum (or max) over the warp; with the xor butterfly every lane ends with the same bits (each step combines the
// same two values, and the operation commutes), so decisions taken on the result are warp-uniform.
template <typename X>
__device__ __forceinline__ X warp_sum(X x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

template <typename X>
__device__ __forceinline__ X warp_max(X x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max_acc(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Sum (or max) over the block, in the same order every time (deterministic); every thread gets the result.
// scratch: 33 X of shared memory; blockDim.x a multiple of 32.
template <typename X, bool kMax>
__device__ X block_reduce(X x, X* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    X y = lane < warps ? scratch[lane] : (kMax ? X(-INFINITY) : X(0));
    y = kMax ? warp_max(y) : warp_sum(y);
    if (lane == 0) scratch[32] = y;
  }
  __syncthreads();
  return scratch[32];
}

// Exclusive prefix sum of x over the block in thread order; *total gets the block's sum.
// scratch: 33 ints of shared memory; blockDim.x a multiple of 32.
__device__ __forceinline__ int block_exclusive_scan(int x, int* scratch, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += y;
    }
    if (lane < warps) scratch[lane] = w;  // inclusive sums of the warps
    if (lane == 31) scratch[32] = w;
  }
  __syncthreads();
  *total = scratch[32];
  return incl - x + (warp > 0 ? scratch[warp - 1] : 0);
}

// The current device: its ordinal, streaming-multiprocessor count and opt-in shared memory limit per block.
struct DeviceFacts {
  int device = 0;
  int sms = 0;
  int smem_optin = 0;
};

inline std::string device_facts(DeviceFacts* facts) {
  cudaError_t err = cudaGetDevice(&facts->device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&facts->sms, cudaDevAttrMultiProcessorCount, facts->device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&facts->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, facts->device);
  return err == cudaSuccess ? std::string() : std::string("querying the CUDA device: ") + cudaGetErrorString(err);
}

constexpr size_t kStaticSmem = 48 * 1024;  // what every block may use without an opt-in attribute

// The last launch's error as a message ("" when it launched).
inline std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// The last x in [0, n) with off[x] <= p, for offsets off (n + 1 values, not decreasing, p < off[n]): the segment
// holding position p. With decreasing offsets (invalid input) it still returns some x in [0, n).
__device__ __forceinline__ int64_t segment_of(const int64_t* off, int64_t n, int64_t p) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (off[mid] <= p) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// The kernels address image b's row r of the packed row axis (image b's token j is row row_b + j, with
// row_b = b * len in a dense batch) at b * skew + r * row_stride. A packed tensor has skew 0; a dense one, whose
// images are image_stride apart, skew = image_stride - len * row_stride.
inline int64_t image_skew(bool packed, int64_t image_stride, int64_t len, int64_t row_stride) {
  return packed ? 0 : image_stride - len * row_stride;
}

}  // namespace detail
}  // namespace cuda
}  // namespace flowcut
