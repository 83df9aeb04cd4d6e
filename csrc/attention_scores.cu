// CUDA attention_scores (flowcut_kernels/ops/reference.py, "Generic primitives"; the launcher's contract is in
// flowcut_cuda.h): one pass over k per (image, key head, tile of query rows) keeps running softmax statistics per row
// and the span's logits in a workspace, then two small launches normalise and average. Accumulation in Acc (float, or
// double for float64 k); no floating-point atomics, every sum in a fixed order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "acc_math.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

// One more logit l in a running softmax (max m, sum s of exp(l - m)). A -inf logit adds nothing; NaN propagates.
template <typename Acc>
__device__ __forceinline__ void online_add(Acc& m, Acc& s, Acc l) {
  if (l == Acc(-INFINITY)) return;
  if (l > m) {
    s = s * exp_acc(m - l) + Acc(1);
    m = l;
  } else {
    s += exp_acc(l - m);
  }
}

// Two running softmaxes combined into (m, s).
template <typename Acc>
__device__ __forceinline__ void online_merge(Acc& m, Acc& s, Acc m2, Acc s2) {
  const Acc top = max_acc(m, m2);
  if (top == Acc(-INFINITY)) return;  // both empty
  s = (m == Acc(-INFINITY) ? Acc(0) : s * exp_acc(m - top)) + (m2 == Acc(-INFINITY) ? Acc(0) : s2 * exp_acc(m2 - top));
  m = top;
}


constexpr int kColumnWarps = 8;

struct AttnPlan {
  int warps = 8;
  int64_t rows_per_tile = 32;  // query rows per block: a lane each
  int64_t tiles = 1, chunk = 1, chunks = 1;
  size_t smem = 0;
  size_t acc = 4;                        // sizeof(Acc)
  size_t logits_bytes = 0, part_bytes = 0, lse_bytes = 0;
};

struct AttnParams {
  int64_t Hkv, group, Q, R, S, D, rows_per_tile, chunk, chunks, span_start, n;
  const void* q;
  DType q_dtype;
  int64_t qs0, qs1, qs2, qs3;
  const void* k;
  int64_t ks0, ks1, ks2, ks3;
  const uint8_t* mask;
  int64_t ms0, ms1;
  double scale;
};

size_t attn_smem(size_t acc, int warps, int64_t rows, int64_t D) {
  return acc * size_t(rows * (D + 1) + int64_t(warps) * D + 2 * int64_t(warps) * 32);
}

std::string attn_plan(const AttentionScoresArgs& a, AttnPlan* plan) {
  const int64_t group = a.Hkv > 0 ? a.Hq / a.Hkv : 0, R = group * a.Q, n = a.span_end - a.span_start;
  if (a.B < 0 || a.Hkv < 1 || a.Hq < 1 || a.Hq % a.Hkv != 0 || a.Q < 1 || a.D < 1 || a.span_start < 0 ||
      n < 0 || a.span_end > a.S)
    return "attention_scores: invalid shapes or span";
  plan->acc = a.k_dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  if (a.B == 0 || n == 0) return "";  // nothing to compute
  // The most rows per tile (up to a warp's 32), then the most warps, that fit the shared memory.
  bool fits = false;
  for (int warps = 8; warps >= 1 && !fits; warps /= 2) {
    int64_t rows = std::min<int64_t>(32, R);
    while (!fits) {
      if (attn_smem(plan->acc, warps, rows, a.D) <= kStaticSmem) {
        plan->warps = warps, plan->rows_per_tile = rows, fits = true;
      } else if (rows == 1) {
        break;
      } else {
        rows = (rows + 1) / 2;
      }
    }
  }
  if (!fits) return "attention_scores: head dim D = " + std::to_string(a.D) + " is too large for shared memory";
  plan->smem = attn_smem(plan->acc, plan->warps, plan->rows_per_tile, a.D);
  plan->tiles = ceil_div(R, plan->rows_per_tile);
  if (plan->tiles > 65535 || a.B * a.Hkv > 65535)
    return "attention_scores: too many query rows or (image, key head) pairs for one launch";
  DeviceFacts facts;
  std::string err = device_facts(&facts);
  if (!err.empty()) return err;
  // Key chunks: about four blocks per SM over the whole launch, at least one key per warp.
  const int64_t base = plan->tiles * a.B * a.Hkv;
  int64_t chunks = std::max<int64_t>(1, ceil_div(4LL * facts.sms, base));
  chunks = std::min<int64_t>(chunks, ceil_div(a.S, plan->warps));
  plan->chunk = ceil_div(a.S, chunks);
  plan->chunks = ceil_div(a.S, plan->chunk);
  const int64_t rows_total = a.B * a.Hq * a.Q;
  plan->logits_bytes = align16(plan->acc * size_t(rows_total * n));
  plan->part_bytes = align16(plan->acc * size_t(rows_total * plan->chunks * 2));
  plan->lse_bytes = align16(plan->acc * size_t(rows_total));
  return "";
}

// Block (key chunk, row tile, image * Hkv + key head): its rows' running softmax over the chunk's keys, and the
// logits of the chunk's keys in the span. A lane per query row, a warp per key.
template <typename T, typename Acc>
__global__ void attention_logits_kernel(AttnParams p, Acc* logits, Acc* part) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t D = p.D, P = D + 1;  // P: padded row (lane-per-row reads without bank conflicts)
  Acc* q_s = reinterpret_cast<Acc*>(smem_raw);
  Acc* k_s = q_s + p.rows_per_tile * P + warp * D;  // this warp's key row
  Acc* ms_s = q_s + p.rows_per_tile * P + warps * D;  // (2, warps, 32) running max and sum
  const int64_t c = blockIdx.x, bg = blockIdx.z, b = bg / p.Hkv, g = bg % p.Hkv;
  const int64_t r0 = int64_t(blockIdx.y) * p.rows_per_tile;
  const int64_t rows = p.R - r0 < p.rows_per_tile ? p.R - r0 : p.rows_per_tile;
  for (int64_t i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int64_t r = i / D, d = i % D, rr = r0 + r;  // row rr of the group: query head g * group + rr / Q
    const int64_t h = g * p.group + rr / p.Q, qi = rr % p.Q;
    q_s[r * P + d] = load_as<Acc>(p.q, p.q_dtype, b * p.qs0 + h * p.qs1 + qi * p.qs2 + d * p.qs3);
  }
  __syncthreads();

  const T* k = static_cast<const T*>(p.k) + (b * p.ks0 + g * p.ks1);
  const bool active = lane < rows;
  const int64_t row = bg * p.R + r0 + lane;  // this lane's row among all: (b * Hq + h) * Q + qi
  Acc m = Acc(-INFINITY), s = Acc(0);
  const int64_t j0 = c * p.chunk, j1 = j0 + p.chunk < p.S ? j0 + p.chunk : p.S;
  for (int64_t j = j0 + warp; j < j1; j += warps) {
    const bool in_span = j >= p.span_start && j < p.span_start + p.n;
    if (p.mask != nullptr && p.mask[b * p.ms0 + j * p.ms1] == 0) {  // excluded: weight 0
      if (in_span && active) logits[row * p.n + (j - p.span_start)] = Acc(-INFINITY);
      continue;
    }
    for (int64_t d = lane; d < D; d += 32) k_s[d] = to_acc<Acc>(k[j * p.ks2 + d * p.ks3]);
    __syncwarp();
    if (active) {
      const Acc* qr = q_s + lane * P;
      Acc dot = Acc(0);
      for (int64_t d = 0; d < D; ++d) dot = fma_acc(qr[d], k_s[d], dot);
      const Acc l = Acc(p.scale) * dot;
      online_add(m, s, l);
      if (in_span) logits[row * p.n + (j - p.span_start)] = l;
    }
    __syncwarp();  // k_s is refilled for the next key
  }
  ms_s[warp * 32 + lane] = m;
  ms_s[(warps + warp) * 32 + lane] = s;
  __syncthreads();
  if (threadIdx.x < rows) {  // warp 0, lane = row: the warps' statistics in order
    Acc M = Acc(-INFINITY), S = Acc(0);
    for (int w = 0; w < warps; ++w)
      online_merge(M, S, ms_s[w * 32 + threadIdx.x], ms_s[(warps + w) * 32 + threadIdx.x]);
    part[(row * p.chunks + c) * 2] = M;
    part[(row * p.chunks + c) * 2 + 1] = S;
  }
}

// Per row: log-sum-exp over all keys from the chunks' statistics, in chunk order (NaN for a row with no key).
template <typename Acc>
__global__ void attention_lse_kernel(const Acc* part, int64_t rows, int64_t chunks, Acc* lse) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  Acc M = Acc(-INFINITY), S = Acc(0);
  for (int64_t c = 0; c < chunks; ++c)
    online_merge(M, S, part[(row * chunks + c) * 2], part[(row * chunks + c) * 2 + 1]);
  lse[row] = S > Acc(0) ? M + log_acc(S) : nan_acc<Acc>();
}

// Block (32 columns, image): a lane per column, the warps over the image's Hq * Q rows, combined in warp order.
template <typename Acc>
__global__ void attention_columns_kernel(const Acc* logits, const Acc* lse, int64_t rows_per_image, int64_t n,
                                         float* out) {
  __shared__ Acc sums[kColumnWarps * 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.y, j = int64_t(blockIdx.x) * 32 + lane;
  Acc acc = Acc(0);
  if (j < n)
    for (int64_t r = warp; r < rows_per_image; r += kColumnWarps) {
      const int64_t row = b * rows_per_image + r;
      acc += exp_acc(logits[row * n + j] - lse[row]);
    }
  sums[warp * 32 + lane] = acc;
  __syncthreads();
  if (warp == 0 && j < n) {
    Acc total = Acc(0);
    for (int w = 0; w < kColumnWarps; ++w) total += sums[w * 32 + lane];
    out[b * n + j] = float(total / Acc(rows_per_image));
  }
}

template <typename T, typename Acc>
std::string attention_launch(const AttentionScoresArgs& a, const AttnPlan& plan, void* workspace, cudaStream_t stream) {
  AttnParams p{};
  p.Hkv = a.Hkv, p.group = a.Hq / a.Hkv, p.Q = a.Q, p.R = p.group * a.Q, p.S = a.S, p.D = a.D;
  p.rows_per_tile = plan.rows_per_tile, p.chunk = plan.chunk, p.chunks = plan.chunks;
  p.span_start = a.span_start, p.n = a.span_end - a.span_start;
  p.q = a.q, p.q_dtype = a.q_dtype;
  p.qs0 = a.q_stride[0], p.qs1 = a.q_stride[1], p.qs2 = a.q_stride[2], p.qs3 = a.q_stride[3];
  p.k = a.k, p.ks0 = a.k_stride[0], p.ks1 = a.k_stride[1], p.ks2 = a.k_stride[2], p.ks3 = a.k_stride[3];
  p.mask = a.key_mask, p.ms0 = a.mask_stride[0], p.ms1 = a.mask_stride[1];
  p.scale = a.scale;
  char* ws = static_cast<char*>(workspace);
  Acc* logits = reinterpret_cast<Acc*>(ws);
  Acc* part = reinterpret_cast<Acc*>(ws + plan.logits_bytes);
  Acc* lse = reinterpret_cast<Acc*>(ws + plan.logits_bytes + plan.part_bytes);

  const dim3 grid(unsigned(plan.chunks), unsigned(plan.tiles), unsigned(a.B * a.Hkv));
  attention_logits_kernel<T, Acc><<<grid, 32 * plan.warps, plan.smem, stream>>>(p, logits, part);
  std::string err = launch_error("attention_scores launch (logits)");
  if (!err.empty()) return err;
  const int64_t rows_total = a.B * a.Hq * a.Q;
  attention_lse_kernel<Acc><<<unsigned(ceil_div(rows_total, 256)), 256, 0, stream>>>(part, rows_total, plan.chunks,
                                                                                     lse);
  err = launch_error("attention_scores launch (lse)");
  if (!err.empty()) return err;
  const dim3 cols(unsigned(ceil_div(p.n, 32)), unsigned(a.B));
  attention_columns_kernel<Acc><<<cols, 32 * kColumnWarps, 0, stream>>>(logits, lse, a.Hq * a.Q, p.n, a.out);
  return launch_error("attention_scores launch (columns)");
}

}  // namespace

std::string attention_scores_workspace(const AttentionScoresArgs& args, size_t* bytes) {
  AttnPlan plan;
  const std::string err = attn_plan(args, &plan);
  *bytes = err.empty() ? plan.logits_bytes + plan.part_bytes + plan.lse_bytes : 0;
  return err;
}

std::string launch_attention_scores(const AttentionScoresArgs& a, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream) {
  AttnPlan plan;
  const std::string err = attn_plan(a, &plan);
  if (!err.empty()) return err;
  if (a.B == 0 || a.span_end == a.span_start) return "";
  const size_t need = plan.logits_bytes + plan.part_bytes + plan.lse_bytes;
  if (workspace_bytes < need || !aligned16(workspace))
    return "attention_scores: the workspace must be 16-byte aligned and hold " + std::to_string(need) + " bytes";
  switch (a.k_dtype) {
    case DType::kFloat32: return attention_launch<float, float>(a, plan, workspace, stream);
    case DType::kFloat16: return attention_launch<__half, float>(a, plan, workspace, stream);
    case DType::kBFloat16: return attention_launch<__nv_bfloat16, float>(a, plan, workspace, stream);
    case DType::kFloat64: return attention_launch<double, double>(a, plan, workspace, stream);
    default: return "attention_scores: k must be float32, float16, bfloat16 or float64";
  }
}

}  // namespace cuda
}  // namespace flowcut
