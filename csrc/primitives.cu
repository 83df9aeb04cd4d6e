// CUDA kernels of the generic primitives (flowcut_kernels/ops/reference.py, "Generic primitives"; the launchers'
// contracts are in flowcut_cuda.h): attention_scores, text_guided_scores, topk_select and merge_nearest.
//
// Accumulation is in Acc: float, or double where the reference computes in float64 (attention_scores and
// text_guided_scores with float64 k, merge_nearest with float64 hidden). Inputs of any float dtype are read through
// their strides and converted as they are loaded. Nothing here uses floating-point atomics: every sum runs in a
// fixed order, so the results are bitwise reproducible on a given GPU (the only atomics are the integer histogram
// counts of topk_select's radix select).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "cuda_common.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

constexpr size_t kStaticSmem = 48 * 1024;  // what every block may use without an opt-in attribute

// --- Conversions and math in Acc --------------------------------------------------------------------------------

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
__device__ __forceinline__ float max_acc(float x, float y) { return fmaxf(x, y); }
__device__ __forceinline__ double max_acc(double x, double y) { return fmax(x, y); }
__device__ __forceinline__ float fma_acc(float x, float y, float z) { return fmaf(x, y, z); }
__device__ __forceinline__ double fma_acc(double x, double y, double z) { return fma(x, y, z); }
__device__ __forceinline__ float abs_acc(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_acc(double x) { return fabs(x); }

template <typename Acc>
__device__ __forceinline__ Acc nan_acc() { return Acc(NAN); }

// Sum over the warp; with the xor butterfly every lane ends with the same bits (each step adds the same two
// values, and addition commutes), so decisions taken on the result are warp-uniform.
template <typename Acc>
__device__ __forceinline__ Acc warp_sum_acc(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_max_acc(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max_acc(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Sum (or max) over the block in a fixed order; every thread gets the result. scratch: 33 Acc of shared memory;
// blockDim.x a multiple of 32.
template <typename Acc, bool kMax>
__device__ Acc block_reduce(Acc x, Acc* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = kMax ? warp_max_acc(x) : warp_sum_acc(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    Acc y = lane < warps ? scratch[lane] : (kMax ? Acc(-INFINITY) : Acc(0));
    y = kMax ? warp_max_acc(y) : warp_sum_acc(y);
    if (lane == 0) scratch[32] = y;
  }
  __syncthreads();
  return scratch[32];
}

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

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

std::string launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(what) + ": " + cudaGetErrorString(err);
}

size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// --- attention_scores ---------------------------------------------------------------------------------------------

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

// --- text_guided_scores -------------------------------------------------------------------------------------------

struct TextParams {
  int64_t Hkv, group, D, total;
  const int64_t* seg;
  const int64_t* off;
  const void* q;
  DType qd;
  int64_t qs0, qs1, qs2;
  const void* vt;
  DType vtd;
  int64_t vts0, vts1, vts2;
  const void* k;
  DType kd;
  int64_t ks0, ks1, ks2, ks3;
  const void* v;
  DType vd;
  int64_t vs0, vs1, vs2, vs3;
  double scale;
};

struct TextPlan {
  int warps = 8;
  size_t smem = 0, acc = 4;
  size_t logits_bytes = 0, part_bytes = 0;
};

size_t text_smem(size_t acc, int warps, int64_t group, int64_t D) {
  return acc * size_t(group * D + D + int64_t(warps) * D + 2 * (group + 1) + 33);
}

std::string text_plan(const TextGuidedScoresArgs& a, TextPlan* plan) {
  if (a.Hkv < 1 || a.Hq < 1 || a.Hq % a.Hkv != 0 || a.D < 1 || a.G < 0 || a.total < 0)
    return "text_guided_scores: invalid shapes";
  plan->acc = a.k_dtype == DType::kFloat64 ? sizeof(double) : sizeof(float);
  if (a.total == 0) return "";
  if (a.G > 65535) return "text_guided_scores: more than 65535 segments for one launch";
  const int64_t group = a.Hq / a.Hkv;
  plan->warps = 8;
  while (plan->warps > 1 && text_smem(plan->acc, plan->warps, group, a.D) > kStaticSmem) plan->warps /= 2;
  plan->smem = text_smem(plan->acc, plan->warps, group, a.D);
  if (plan->smem > kStaticSmem)
    return "text_guided_scores: (Hq / Hkv) * D = " + std::to_string(group * a.D) + " is too large for shared memory";
  plan->logits_bytes = align16(plan->acc * size_t((a.Hq + a.Hkv) * a.total));
  plan->part_bytes = align16(plan->acc * size_t(a.Hkv * a.total));
  return "";
}

// Block (key head, segment): the logits of its group's query heads and of the relay value over the segment's tokens
// (a warp per token), each row's stable softmax, and per token the group's relevance sum and the value softmax.
// logits: (Hkv, group + 1, total); rel, sem: (Hkv, total).
template <typename Acc>
__global__ void text_logits_kernel(TextParams p, Acc* logits, Acc* rel, Acc* sem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t D = p.D, group = p.group, kv = blockIdx.x, g = blockIdx.y;
  const int64_t b = p.seg[3 * g], start = p.seg[3 * g + 1], n = p.seg[3 * g + 2] - start, o = p.off[g];
  if (n <= 0) return;
  Acc* q_s = reinterpret_cast<Acc*>(smem_raw);  // (group, D)
  Acc* vt_s = q_s + group * D;                   // (D,)
  Acc* row_s = vt_s + D + warp * D;              // this warp's k or v row
  Acc* stat_s = vt_s + D + warps * D;            // (group + 1) maxima, then (group + 1) sums
  Acc* scratch = stat_s + 2 * (group + 1);       // 33
  for (int64_t i = threadIdx.x; i < group * D; i += blockDim.x)
    q_s[i] = load_as<Acc>(p.q, p.qd, b * p.qs0 + (kv * group + i / D) * p.qs1 + (i % D) * p.qs2);
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x)
    vt_s[d] = load_as<Acc>(p.vt, p.vtd, b * p.vts0 + kv * p.vts1 + d * p.vts2);
  __syncthreads();

  Acc* lg = logits + kv * (group + 1) * p.total + o;  // row i of this key head at lg + i * total
  const Acc scale = Acc(p.scale);
  for (int64_t j = warp; j < n; j += warps) {
    const int64_t t = start + j;
    for (int64_t d = lane; d < D; d += 32)
      row_s[d] = load_as<Acc>(p.k, p.kd, b * p.ks0 + kv * p.ks1 + t * p.ks2 + d * p.ks3);
    __syncwarp();
    for (int64_t i = 0; i < group; ++i) {
      Acc x = Acc(0);
      for (int64_t d = lane; d < D; d += 32) x = fma_acc(q_s[i * D + d], row_s[d], x);
      x = warp_sum_acc(x);
      if (lane == 0) lg[i * p.total + j] = scale * x;
    }
    __syncwarp();
    for (int64_t d = lane; d < D; d += 32)
      row_s[d] = load_as<Acc>(p.v, p.vd, b * p.vs0 + kv * p.vs1 + t * p.vs2 + d * p.vs3);
    __syncwarp();
    Acc x = Acc(0);
    for (int64_t d = lane; d < D; d += 32) x = fma_acc(vt_s[d], row_s[d], x);
    x = warp_sum_acc(x);
    if (lane == 0) lg[group * p.total + j] = scale * x;
    __syncwarp();
  }
  __syncthreads();  // this block's logits (global memory) are visible to all its threads

  for (int64_t i = 0; i <= group; ++i) {  // each row's max, then sum of exp(l - max)
    Acc top = Acc(-INFINITY);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) top = max_acc(top, lg[i * p.total + j]);
    top = block_reduce<Acc, true>(top, scratch);
    Acc total = Acc(0);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) total += exp_acc(lg[i * p.total + j] - top);
    total = block_reduce<Acc, false>(total, scratch);
    if (threadIdx.x == 0) stat_s[i] = top, stat_s[group + 1 + i] = total;
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    Acc r = Acc(0);
    for (int64_t i = 0; i < group; ++i) r += exp_acc(lg[i * p.total + j] - stat_s[i]) / stat_s[group + 1 + i];
    rel[kv * p.total + o + j] = r;
    sem[kv * p.total + o + j] = exp_acc(lg[group * p.total + j] - stat_s[group]) / stat_s[2 * group + 1];
  }
}

// A warp per output token: the key heads' partials summed in order, and rho = L1 of the head-mean value.
template <typename Acc>
__global__ void text_scores_kernel(TextParams p, int64_t G, int64_t Hq, const Acc* rel, const Acc* sem, float* out) {
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t x = int64_t(blockIdx.x) * warps + warp;
  if (x >= p.total) return;
  const int64_t g = segment_of(p.off, G, x), b = p.seg[3 * g], t = p.seg[3 * g + 1] + (x - p.off[g]);
  Acc r = Acc(0), sm = Acc(0);
  for (int64_t kv = 0; kv < p.Hkv; ++kv) r += rel[kv * p.total + x], sm += sem[kv * p.total + x];
  Acc l1 = Acc(0);
  for (int64_t d = lane; d < p.D; d += 32) {
    Acc mean = Acc(0);
    for (int64_t kv = 0; kv < p.Hkv; ++kv)
      mean += load_as<Acc>(p.v, p.vd, b * p.vs0 + kv * p.vs1 + t * p.vs2 + d * p.vs3);
    l1 += abs_acc(mean / Acc(p.Hkv));
  }
  l1 = warp_sum_acc(l1);
  // Head means: rel over the Hq query heads; sem over the Hq heads, each key head's repeated Hq / Hkv times.
  if (lane == 0) out[x] = float((r / Acc(Hq) + sm / Acc(p.Hkv)) * l1);
}

template <typename Acc>
std::string text_launch(const TextGuidedScoresArgs& a, const TextPlan& plan, void* workspace, cudaStream_t stream) {
  TextParams p{};
  p.Hkv = a.Hkv, p.group = a.Hq / a.Hkv, p.D = a.D, p.total = a.total, p.seg = a.segments, p.off = a.out_offsets;
  p.q = a.q_relay, p.qd = a.q_dtype, p.qs0 = a.q_stride[0], p.qs1 = a.q_stride[1], p.qs2 = a.q_stride[2];
  p.vt = a.v_relay, p.vtd = a.vt_dtype, p.vts0 = a.vt_stride[0], p.vts1 = a.vt_stride[1], p.vts2 = a.vt_stride[2];
  p.k = a.k, p.kd = a.k_dtype;
  p.ks0 = a.k_stride[0], p.ks1 = a.k_stride[1], p.ks2 = a.k_stride[2], p.ks3 = a.k_stride[3];
  p.v = a.v, p.vd = a.v_dtype;
  p.vs0 = a.v_stride[0], p.vs1 = a.v_stride[1], p.vs2 = a.v_stride[2], p.vs3 = a.v_stride[3];
  p.scale = a.scale;
  char* ws = static_cast<char*>(workspace);
  Acc* logits = reinterpret_cast<Acc*>(ws);
  Acc* rel = reinterpret_cast<Acc*>(ws + plan.logits_bytes);
  Acc* sem = reinterpret_cast<Acc*>(ws + plan.logits_bytes + plan.part_bytes);
  const dim3 grid(unsigned(a.Hkv), unsigned(a.G));
  text_logits_kernel<Acc><<<grid, 32 * plan.warps, plan.smem, stream>>>(p, logits, rel, sem);
  const std::string err = launch_error("text_guided_scores launch (logits)");
  if (!err.empty()) return err;
  constexpr int kWarps = 8;
  const unsigned blocks = unsigned(ceil_div(a.total, kWarps));
  text_scores_kernel<Acc><<<blocks, 32 * kWarps, 0, stream>>>(p, a.G, a.Hq, rel, sem, a.out);
  return launch_error("text_guided_scores launch (scores)");
}

// --- topk_select --------------------------------------------------------------------------------------------------

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

// Order-preserving keys: larger score, larger key; every NaN (any sign or payload) the largest key (NaNs then tie:
// lower index first); -0.0 == 0.0. fp16 and bf16 compare exactly as float.
__device__ __forceinline__ unsigned order_key(float x) {
  if (isnan(x)) return 0xffffffffu;
  if (x == 0.0f) x = 0.0f;
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long order_key(double x) {
  if (isnan(x)) return ~0ull;
  if (x == 0.0) x = 0.0;
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(x));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

__device__ __forceinline__ unsigned key_of(float x) { return order_key(x); }
__device__ __forceinline__ unsigned key_of(__half x) { return order_key(__half2float(x)); }
__device__ __forceinline__ unsigned key_of(__nv_bfloat16 x) { return order_key(__bfloat162float(x)); }
__device__ __forceinline__ unsigned long long key_of(double x) { return order_key(x); }

// One block per image: a radix select (8 bits a round, from the top) of the K-th largest key among the unprotected
// rows, tau, and how many rows equal to tau are kept (the first ones); then, in ascending row order, two block scans
// keep every protected row, every unprotected one above tau and the first `take` equal to it, and write each row to
// its place in kept or dropped.
template <typename T, typename Key>
__global__ void topk_select_kernel(TopkParams p) {
  __shared__ unsigned hist[256];
  __shared__ unsigned digit_s;
  __shared__ long long want_s;
  __shared__ int scan[33];
  const int64_t b = blockIdx.x, row = p.cu[b], len = p.cu[b + 1] - row, K = p.keep[b];
  const T* scores = static_cast<const T*>(p.scores);
  auto is_free = [&](int64_t j) { return p.protect == nullptr || p.protect[(row + j) * p.ps] == 0; };

  Key tau = 0;
  long long take = 0;
  if (K > 0) {
    Key prefix = 0, mask = 0;
    long long want = K;  // rank still to find among the free rows matching prefix
    for (int shift = int(sizeof(Key) * 8) - 8; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
        if (!is_free(j)) continue;
        const Key key = key_of(scores[(row + j) * p.ss]);
        if ((key & mask) == prefix) atomicAdd(hist + unsigned((key >> shift) & Key(255)), 1u);
      }
      __syncthreads();
      if (threadIdx.x < 32) {  // one warp finds the digit, scanning from the largest
        const int lane = threadIdx.x;
        unsigned mine = 0;
        for (int i = 0; i < 8; ++i) mine += hist[255 - 8 * lane - i];
        unsigned incl = mine;
        for (int o = 1; o < 32; o <<= 1) {
          const unsigned y = __shfl_up_sync(kFullMask, incl, o);
          if (lane >= o) incl += y;
        }
        const unsigned hit = __ballot_sync(kFullMask, (long long)incl >= want);
        if (lane == __ffs(hit) - 1) {
          long long above = (long long)(incl - mine);
          for (int i = 0; i < 8; ++i) {
            const unsigned digit = unsigned(255 - 8 * lane - i);
            if (above + hist[digit] >= want) {
              digit_s = digit;
              want_s = want - above;
              break;
            }
            above += hist[digit];
          }
        }
      }
      __syncthreads();
      prefix |= Key(digit_s) << shift;
      mask |= Key(255) << shift;
      want = want_s;
      __syncthreads();  // hist is cleared next round
    }
    tau = prefix;
    take = want;
  }

  long long eq_base = 0, kept_base = 0;
  for (int64_t t0 = 0; t0 < len; t0 += blockDim.x) {
    const int64_t j = t0 + threadIdx.x;
    const bool valid = j < len;
    const bool prot = valid && !is_free(j);
    const bool cand = valid && !prot && K > 0;
    const Key key = cand ? key_of(scores[(row + j) * p.ss]) : Key(0);
    int eq_total = 0, kept_total = 0;
    const int eq_rank = block_exclusive_scan(cand && key == tau ? 1 : 0, scan, &eq_total);
    const bool kept = prot || (cand && (key > tau || (key == tau && eq_base + eq_rank < take)));
    const int pos = block_exclusive_scan(kept ? 1 : 0, scan, &kept_total);
    if (valid) {
      const long long before = kept_base + pos;  // kept rows of this image before row j
      if (kept) p.kept[p.kept_cu[b] + before] = row + j;
      else p.dropped[p.dropped_cu[b] + (j - before)] = row + j;
    }
    eq_base += eq_total;
    kept_base += kept_total;
  }
}

template <typename T, typename Key>
std::string topk_launch(const TopkParams& p, int64_t B, cudaStream_t stream) {
  topk_select_kernel<T, Key><<<unsigned(B), kTopkThreads, 0, stream>>>(p);
  return launch_error("topk_select launch");
}

// --- merge_nearest ------------------------------------------------------------------------------------------------

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
    nj = max_acc(sqrt_acc(warp_sum_acc(nj)), Acc(1e-12));
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
      dot = warp_sum_acc(dot);
      ni = max_acc(sqrt_acc(warp_sum_acc(ni)), Acc(1e-12));
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

// --- Launchers ----------------------------------------------------------------------------------------------------

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

std::string text_guided_scores_workspace(const TextGuidedScoresArgs& args, size_t* bytes) {
  TextPlan plan;
  const std::string err = text_plan(args, &plan);
  *bytes = err.empty() ? plan.logits_bytes + 2 * plan.part_bytes : 0;
  return err;
}

std::string launch_text_guided_scores(const TextGuidedScoresArgs& a, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream) {
  TextPlan plan;
  const std::string err = text_plan(a, &plan);
  if (!err.empty()) return err;
  if (a.total == 0) return "";
  const size_t need = plan.logits_bytes + 2 * plan.part_bytes;
  if (workspace_bytes < need || !aligned16(workspace))
    return "text_guided_scores: the workspace must be 16-byte aligned and hold " + std::to_string(need) + " bytes";
  return a.k_dtype == DType::kFloat64 ? text_launch<double>(a, plan, workspace, stream)
                                      : text_launch<float>(a, plan, workspace, stream);
}

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
