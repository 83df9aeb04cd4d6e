// Conversions and math in the accumulation type Acc (float, or double where the reference computes in float64),
// shared by the kernels of the generic primitives.
#pragma once

#include <cmath>

#include "cuda_common.cuh"

namespace flowcut {
namespace cuda {
namespace detail {

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float x) { return Acc(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double x) { return Acc(x); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half x) { return Acc(__half2float(x)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 x) { return Acc(__bfloat162float(x)); }

// Element i of a tensor of runtime dtype, as Acc (the branch is uniform across a launch).
template <typename Acc>
__device__ __forceinline__ Acc load_as(const void* p, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return to_acc<Acc>(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return to_acc<Acc>(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::kFloat64: return to_acc<Acc>(static_cast<const double*>(p)[i]);
    default: return to_acc<Acc>(static_cast<const float*>(p)[i]);
  }
}

template <typename Acc>
__device__ __forceinline__ void store_as(void* p, DType dtype, int64_t i, Acc x) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(float(x)); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(float(x)); break;
    case DType::kFloat64: static_cast<double*>(p)[i] = double(x); break;
    default: static_cast<float*>(p)[i] = float(x); break;
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }
__device__ __forceinline__ float fma_acc(float x, float y, float z) { return fmaf(x, y, z); }
__device__ __forceinline__ double fma_acc(double x, double y, double z) { return fma(x, y, z); }
__device__ __forceinline__ float abs_acc(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_acc(double x) { return fabs(x); }

template <typename Acc>
__device__ __forceinline__ Acc nan_acc() { return Acc(NAN); }

}  // namespace detail
}  // namespace cuda
}  // namespace flowcut
