// CUDA topk_select (flowcut_kernels/ops/reference.py, "Generic primitives"; the launcher's contract is in
// flowcut_cuda.h): a block per image, the radix select of select.cuh, then block scans writing kept and dropped rows
// in ascending order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "select.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

constexpr int kTopkThreads = 512;

struct TopkParams {
  const int64_t* cu;
  const int64_t* keep;
  const int64_t* kept_cu;
  const int64_t* dropped_cu;
  const void* scores;
  int64_t ss;
  const uint8_t* protect;
  int64_t ps;
  int64_t* kept;
  int64_t* dropped;
};

// One block per image: radix_select finds the K-th largest key among the unprotected rows, tau, and how many rows
// equal to tau are kept (the first ones); then, in ascending row order, two block scans keep every protected row,
// every unprotected one above tau and the first `take` equal to it, and write each row to its place in kept or
// dropped.
template <typename T, typename Key>
__global__ void topk_select_kernel(TopkParams p) {
  __shared__ RadixScratch radix;
  __shared__ int scan[33];
  const int64_t b = blockIdx.x, row = p.cu[b], len = p.cu[b + 1] - row, K = p.keep[b];
  const T* scores = static_cast<const T*>(p.scores);
  auto is_free = [&](int64_t j) { return p.protect == nullptr || p.protect[(row + j) * p.ps] == 0; };

  Key tau = 0;
  long long take = 0;
  if (K > 0) {
    auto key_at = [&](int64_t j, Key* key) {
      if (!is_free(j)) return false;
      *key = key_of(scores[(row + j) * p.ss]);
      return true;
    };
    radix_select(len, K, key_at, &radix, &tau, &take);
  }

  long long eq_seen = 0, kept_seen = 0;
  for (int64_t t0 = 0; t0 < len; t0 += blockDim.x) {
    const int64_t j = t0 + threadIdx.x;
    const bool valid = j < len;
    const bool prot = valid && !is_free(j);
    const bool cand = valid && !prot && K > 0;
    const Key key = cand ? key_of(scores[(row + j) * p.ss]) : Key(0);
    long long before = 0;  // kept rows of this image before row j
    const bool kept = keep_in_order(prot, cand, key, tau, take, &eq_seen, &kept_seen, &before, scan);
    if (valid) {
      if (kept) p.kept[p.kept_cu[b] + before] = row + j;
      else p.dropped[p.dropped_cu[b] + (j - before)] = row + j;
    }
  }
}

template <typename T, typename Key>
std::string topk_launch(const TopkParams& p, int64_t B, cudaStream_t stream) {
  topk_select_kernel<T, Key><<<unsigned(B), kTopkThreads, 0, stream>>>(p);
  return launch_error("topk_select launch");
}

}  // namespace

std::string launch_topk_select(const TopkSelectArgs& a, cudaStream_t stream) {
  if (a.B == 0) return "";
  if (a.B > 0x7fffffffLL) return "topk_select: too many images for one launch";
  TopkParams p{};
  p.cu = a.cu_seqlens, p.keep = a.keep, p.kept_cu = a.kept_cu, p.dropped_cu = a.dropped_cu;
  p.scores = a.scores, p.ss = a.scores_stride, p.protect = a.protect, p.ps = a.protect_stride;
  p.kept = a.kept, p.dropped = a.dropped;
  switch (a.scores_dtype) {
    case DType::kFloat32: return topk_launch<float, unsigned>(p, a.B, stream);
    case DType::kFloat16: return topk_launch<__half, unsigned>(p, a.B, stream);
    case DType::kBFloat16: return topk_launch<__nv_bfloat16, unsigned>(p, a.B, stream);
    case DType::kFloat64: return topk_launch<double, unsigned long long>(p, a.B, stream);
    default: return "topk_select: scores must be float32, float16, bfloat16 or float64";
  }
}

}  // namespace cuda
}  // namespace flowcut
