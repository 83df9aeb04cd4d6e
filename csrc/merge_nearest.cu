// CUDA merge_nearest (flowcut_kernels/ops/reference.py, "Generic primitives"; the launcher's contract is in
// flowcut_cuda.h): a warp per dropped row finds its kept target, then a block per kept row gathers, in order, the rows
// assigned to it. Accumulation in Acc (float, or double for float64 hidden); no floating-point atomics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "acc_math.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}


constexpr int kAssignWarps = 8;
constexpr int kMergeThreads = 256;
constexpr int kMergePerThread = 4;  // channels per thread per pass: 1024 channels a pass

struct MergeParams {
  int64_t T, C, Ck, K, M, B;
  const void* hidden;
  DType hd;
  int64_t hs0, hs1;
  const void* keys;
  DType kd;
  int64_t ks0, ks1;
  const void* sizes;
  DType sd;
  int64_t ss;
  const int64_t* kept;
  int64_t kst;
  const int64_t* dropped;
  int64_t dst;
  const int64_t* kept_cu;
  const int64_t* dropped_cu;
  void* merged;
  float* sizes_out;
  int* target;  // (M,) the kept position each dropped row merges into, or -1
};

// A warp per dropped position q: the kept position of its image with the largest cosine similarity of keys
// (sequentially in kept order, so the first of equals wins; NaN above every number, the first NaN winning).
template <typename Acc>
__global__ void merge_assign_kernel(MergeParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t q = int64_t(blockIdx.x) * kAssignWarps + warp;
  if (q >= p.M) return;
  const int64_t b = segment_of(p.dropped_cu, p.B, q);
  const int64_t i0 = clamp64(p.kept_cu[b], 0, p.K), i1 = clamp64(p.kept_cu[b + 1], i0, p.K);
  const int64_t j = p.dropped[q * p.dst];
  int best = -1;
  if (j >= 0 && j < p.T) {
    Acc nj = Acc(0);
    for (int64_t d = lane; d < p.Ck; d += 32) {
      const Acc x = load_as<Acc>(p.keys, p.kd, j * p.ks0 + d * p.ks1);
      nj = fma_acc(x, x, nj);
    }
    nj = max_acc(sqrt_acc(warp_sum(nj)), Acc(1e-12));
    Acc best_sim = Acc(0);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = p.kept[i * p.kst];
      if (r < 0 || r >= p.T) continue;  // never dereferenced; its merged row is NaN
      Acc dot = Acc(0), ni = Acc(0);
      for (int64_t d = lane; d < p.Ck; d += 32) {
        const Acc xi = load_as<Acc>(p.keys, p.kd, r * p.ks0 + d * p.ks1);
        dot = fma_acc(load_as<Acc>(p.keys, p.kd, j * p.ks0 + d * p.ks1), xi, dot);
        ni = fma_acc(xi, xi, ni);
      }
      dot = warp_sum(dot);
      ni = max_acc(sqrt_acc(warp_sum(ni)), Acc(1e-12));
      const Acc sim = dot / (nj * ni);
      const bool better = best < 0 || (isnan(sim) ? !isnan(best_sim) : !isnan(best_sim) && sim > best_sim);
      if (better) best = int(i), best_sim = sim;
    }
  }
  if (lane == 0) p.target[q] = best;
}

// A block per kept position i: s_i h_i plus, in ascending dropped position, s_j h_j of every row assigned to it
// (found by scanning its image's targets, compacted in order by a block scan), divided by the summed sizes.
template <typename Acc>
__global__ void merge_accumulate_kernel(MergeParams p) {
  __shared__ int list[kMergeThreads];
  __shared__ int scan[33];
  const int64_t i = blockIdx.x;
  const int64_t b = segment_of(p.kept_cu, p.B, i);
  const int64_t q0 = clamp64(p.dropped_cu[b], 0, p.M), q1 = clamp64(p.dropped_cu[b + 1], q0, p.M);
  const int64_t r = p.kept[i * p.kst];
  if (r < 0 || r >= p.T) {  // an invalid kept index: a NaN row
    for (int64_t c = threadIdx.x; c < p.C; c += blockDim.x) store_as<Acc>(p.merged, p.hd, i * p.C + c, nan_acc<Acc>());
    if (threadIdx.x == 0) p.sizes_out[i] = NAN;
    return;
  }
  const Acc si = p.sizes ? load_as<Acc>(p.sizes, p.sd, r * p.ss) : Acc(1);
  for (int64_t c0 = 0; c0 < p.C; c0 += int64_t(blockDim.x) * kMergePerThread) {
    Acc acc[kMergePerThread];
    Acc w = si;
#pragma unroll
    for (int u = 0; u < kMergePerThread; ++u) {
      const int64_t c = c0 + int64_t(u) * blockDim.x + threadIdx.x;
      acc[u] = c < p.C ? si * load_as<Acc>(p.hidden, p.hd, r * p.hs0 + c * p.hs1) : Acc(0);
    }
    for (int64_t t = q0; t < q1; t += blockDim.x) {
      const int64_t q = t + threadIdx.x;
      const bool match = q < q1 && p.target[q] == int(i);
      int count = 0;
      const int at = block_exclusive_scan(match ? 1 : 0, scan, &count);
      if (match) list[at] = int(q - t);
      __syncthreads();
      for (int e = 0; e < count; ++e) {
        const int64_t j = p.dropped[(t + list[e]) * p.dst];  // in range: the assignment checked it
        const Acc sj = p.sizes ? load_as<Acc>(p.sizes, p.sd, j * p.ss) : Acc(1);
        w += sj;
#pragma unroll
        for (int u = 0; u < kMergePerThread; ++u) {
          const int64_t c = c0 + int64_t(u) * blockDim.x + threadIdx.x;
          if (c < p.C) acc[u] += sj * load_as<Acc>(p.hidden, p.hd, j * p.hs0 + c * p.hs1);
        }
      }
      __syncthreads();  // list is refilled next round
    }
#pragma unroll
    for (int u = 0; u < kMergePerThread; ++u) {
      const int64_t c = c0 + int64_t(u) * blockDim.x + threadIdx.x;
      if (c < p.C) store_as<Acc>(p.merged, p.hd, i * p.C + c, acc[u] / w);
    }
    if (c0 == 0 && threadIdx.x == 0) p.sizes_out[i] = float(w);
  }
  if (p.C == 0 && threadIdx.x == 0) {  // no channels: the size alone
    Acc w = si;
    for (int64_t q = q0; q < q1; ++q)
      if (p.target[q] == int(i)) w += p.sizes ? load_as<Acc>(p.sizes, p.sd, p.dropped[q * p.dst] * p.ss) : Acc(1);
    p.sizes_out[i] = float(w);
  }
}

template <typename Acc>
std::string merge_launch(const MergeParams& p, cudaStream_t stream) {
  if (p.M > 0) {
    merge_assign_kernel<Acc><<<unsigned(ceil_div(p.M, kAssignWarps)), 32 * kAssignWarps, 0, stream>>>(p);
    const std::string err = launch_error("merge_nearest launch (assign)");
    if (!err.empty()) return err;
  }
  merge_accumulate_kernel<Acc><<<unsigned(p.K), kMergeThreads, 0, stream>>>(p);
  return launch_error("merge_nearest launch (accumulate)");
}

}  // namespace

std::string merge_nearest_workspace(const MergeNearestArgs& args, size_t* bytes) {
  *bytes = align16(size_t(args.M > 0 ? args.M : 0) * sizeof(int));
  return "";
}

std::string launch_merge_nearest(const MergeNearestArgs& a, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
  if (a.B < 1 || a.K < 0 || a.M < 0 || a.C < 0 || a.Ck < 0) return "merge_nearest: invalid shapes";
  if (a.K >= 0x7fffffffLL || a.M >= 0x7fffffffLL) return "merge_nearest: more than 2^31 - 1 kept or dropped rows";
  if (a.K == 0) return "";
  size_t need = 0;
  merge_nearest_workspace(a, &need);
  if (workspace_bytes < need || (need > 0 && !aligned16(workspace)))
    return "merge_nearest: the workspace must be 16-byte aligned and hold " + std::to_string(need) + " bytes";
  MergeParams p{};
  p.T = a.T, p.C = a.C, p.Ck = a.Ck, p.K = a.K, p.M = a.M, p.B = a.B;
  p.hidden = a.hidden, p.hd = a.hidden_dtype, p.hs0 = a.hidden_stride[0], p.hs1 = a.hidden_stride[1];
  p.keys = a.keys, p.kd = a.keys_dtype, p.ks0 = a.keys_stride[0], p.ks1 = a.keys_stride[1];
  p.sizes = a.sizes, p.sd = a.sizes_dtype, p.ss = a.sizes_stride;
  p.kept = a.kept, p.kst = a.kept_stride, p.dropped = a.dropped, p.dst = a.dropped_stride;
  p.kept_cu = a.kept_cu, p.dropped_cu = a.dropped_cu;
  p.merged = a.merged, p.sizes_out = a.sizes_out;
  p.target = static_cast<int*>(workspace);
  return a.hidden_dtype == DType::kFloat64 ? merge_launch<double>(p, stream) : merge_launch<float>(p, stream);
}

}  // namespace cuda
}  // namespace flowcut
