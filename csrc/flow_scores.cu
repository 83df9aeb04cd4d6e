// CUDA flow_scores (docs/semantics.md signals 1-7), for a dense batch and a packed one alike: image b is rows
// row_b .. row_b + S_b of a packed row axis (a dense batch is the case row_b = b S, S_b = S). Each image is cut into
// chunks of `chunk` tokens, and every chunk of the batch has a slot: image b's chunks take slots base_b .. base_b +
// ceil(S_b / chunk), with base_b = b ceil(S / chunk) for a dense batch and base_b = b + floor(row_b / chunk) for a
// packed one (at most B + T / chunk + 1 slots, sized on the host from T alone: the offsets are never read there).
// Four launches, none with a serial tail:
//  1. scores, a block per slot: each warp takes a token, loads its k and v rows for all heads with 16-byte loads
//     into shared memory as float, and writes the per-head relay logit scale*r_h.k_h[j], the value logit
//     v_h[0].v_h[j] and the density rho_j = L1 of the head-mean value to the workspace, keeping each head's running
//     (max, sum of exp) over its candidates; the block writes its chunk's per-head softmax partials;
//  2. head statistics, a block per (head, image): the chunks' partials merged into lse_cand_h and, in the CLS
//     variant, lse_all_h = logaddexp(lse_cand_h, l_h[0]) (the relay row's own logit; lse_all_h = lse_cand_h in the
//     mean variant), for the relay logits and the value logits;
//  3. finish, a block per slot: A[j] = mean_h c_h e_h and the candidates' normalised attention without dividing
//     underflowed values, p[j] = sum_h w_h e_h / sum_h w_h, with e_h = exp(l_h[j] - lse_cand_h) (the one exp per
//     head and logit), c_h = exp(d_h), w_h = exp(d_h - max_h d_h), d_h = lse_cand_h - lse_all_h (the same for the
//     semantic term); then the layer score, the cumulative score, and the chunk's partial sums of the entropy of p;
//  4. entropy, a block per image: the chunks' partial sums, without cancellation (a p_m > 1/2 takes
//     ln p_m = log1p(-sum of the other p)).
// All in float32 (float64 inputs are read as such and converted); every sum in a fixed order (deterministic). The
// workspace holds the logits and rho by packed row, the outputs are packed by candidate (image b's from
// row_b - b * first). Packed offsets that are not increasing or overrun T never cause an out-of-bounds access.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <type_traits>

#include "cuda_common.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

constexpr int kMaxWarps = 4;       // warps of a scores block
constexpr int kMinBlocks = 8;      // scores blocks per SM the registers must allow: at most 64 registers a thread
constexpr int kMaxUnits = 4;       // 16-byte loads in flight per lane, for each of k and v (2 for float64)
constexpr int kStatThreads = 128;  // head statistics, finish and entropy blocks

struct Params {
  int64_t B, H, D, P;  // P: padded head row in shared memory (D + g)
  int g;               // lanes per head in the dot products (a power of two, g H <= 32 where H allows)
  int64_t S, chunk, chunks;  // dense: S and chunks per image; tokens per chunk
  int64_t slots;
  const int64_t* cu;  // packed: (B + 1,) row offsets; nullptr: dense
  int64_t rows;       // T, the packed row axis (B S for a dense batch)
  const void* q;
  DType q_dtype;
  int64_t qs0, qs1, qs2;
  const void* k;
  const void* v;
  // Image b's packed row r, head h, element d of k at b * ks0 + r * ks2 + h * ks1 + d * ks3, ks0 its image_skew;
  // the same for v, and for prev by packed candidate.
  int64_t ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3;
  const float* prev;
  int64_t ps0, ps1;
  float scale;
  int first;
  bool semantic;
  float *cum, *entropy, *attn;
  float4* part;     // (slots, H): max and sum-exp of the chunk's candidates' relay logits, then of their value logits
  float4* head;     // (B, H): lse_cand and lse_all of the relay logits, then of the value logits
  float4* ent;      // (slots, 2): the chunk's five entropy partial sums (padded to two float4)
  float* logit_a;   // (T, H) by packed row
  float* logit_s;   // (T, H), semantic only
  float* rho;       // (T,)
};

// One image: its rows row .. row + S of the packed row axis, its slots base .. base + chunks, and its N candidates
// from packed candidate cand (clamped so that every address stays inside the tensors, whatever the offsets).
struct Image {
  int64_t b, row, S, base, chunks, cand, N;
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

__device__ __forceinline__ int64_t packed_base(const Params& p, int64_t b) {
  return b + clamp64(p.cu[b], 0, p.rows) / p.chunk;
}

__device__ Image image_at(const Params& p, int64_t b) {
  Image im;
  im.b = b;
  if (p.cu) {
    im.row = clamp64(p.cu[b], 0, p.rows), im.S = clamp64(p.cu[b + 1], im.row, p.rows) - im.row;
    im.base = b + im.row / p.chunk;
  } else {
    im.row = b * p.S, im.S = p.S, im.base = b * p.chunks;
  }
  im.chunks = (im.S + p.chunk - 1) / p.chunk;
  im.cand = im.row - b * p.first;
  const int64_t T_c = p.rows - p.B * p.first;
  im.N = im.cand >= 0 ? clamp64(im.S - p.first, 0, T_c - im.cand) : 0;
  return im;
}

// The image of a slot and the slot's chunk c within it; c >= chunks: an idle slot.
__device__ Image image_of_slot(const Params& p, int64_t slot, int64_t* c) {
  int64_t b;
  if (p.cu) {  // the last image whose base is <= slot
    int64_t lo = 0, hi = p.B - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (packed_base(p, mid) <= slot) lo = mid;
      else hi = mid - 1;
    }
    b = lo;
  } else {
    b = slot / p.chunks;
  }
  const Image im = image_at(p, b);
  *c = slot - im.base;
  return im;
}

__device__ __forceinline__ float logaddexpf(float x, float y) {
  return fmaxf(x, y) + log1pf(expf(-fabsf(x - y)));
}

// One more logit l in a running softmax (max m, sum s of exp(l - m)); -inf adds nothing, NaN propagates.
__device__ __forceinline__ void online_add(float& m, float& s, float l) {
  if (l == -INFINITY) return;
  if (l > m) {
    s = s * expf(m - l) + 1.0f;
    m = l;
  } else {
    s += expf(l - m);
  }
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
  const float top = fmaxf(m, m2);
  if (top == -INFINITY) return;  // both empty
  s = (m == -INFINITY ? 0.0f : s * expf(m - top)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - top));
  m = top;
}

// Shared memory of a scores block: q and v0 rows, then per warp a k row and a v row, each H x P floats, then per
// warp each head's running (max, sum) of the relay and value logits (4 H floats).
size_t smem_bytes(int warps, int64_t H, int64_t P) {
  return sizeof(float) * size_t((2 + 2 * warps) * H * P + 4 * warps * H);
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(32 * kMaxWarps, kMinBlocks) scores_kernel(Params p) {
  using U = Unit<T, VEC>;
  constexpr int W = U::width;
  constexpr int kUnits = std::is_same<T, double>::value ? kMaxUnits / 2 : kMaxUnits;  // within 64 registers
  extern __shared__ float smem[];
  const int64_t H = p.H, P = p.P;
  const int D = int(p.D), warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t c;
  const Image im = image_of_slot(p, blockIdx.x, &c);
  if (c >= im.chunks) return;  // an idle slot
  float* q_s = smem;
  float* v0_s = q_s + H * P;
  float* k_buf = v0_s + H * P + 2 * warp * H * P;
  float* v_buf = k_buf + H * P;
  float* run = v0_s + H * P + 2 * warps * H * P + 4 * warp * H;  // this warp's (max_a, sum_a, max_s, sum_s) by head
  const T* k = static_cast<const T*>(p.k) + (im.b * p.ks0 + im.row * p.ks2);  // the image's token 0
  const T* v = static_cast<const T*>(p.v) + (im.b * p.vs0 + im.row * p.vs2);

  for (int i = threadIdx.x; i < int(H) * D; i += blockDim.x) {
    const int h = i / D, d = i - h * D;
    q_s[h * P + d] = load_any(p.q, p.q_dtype, im.b * p.qs0 + h * p.qs1 + d * p.qs2);
    if (p.semantic) v0_s[h * P + d] = to_float(v[h * p.vs1 + d * p.vs3]);
  }
  for (int64_t h = lane; h < H; h += 32)
    run[4 * h] = -INFINITY, run[4 * h + 1] = 0.0f, run[4 * h + 2] = -INFINITY, run[4 * h + 3] = 0.0f;
  __syncthreads();

  // Each warp: tokens j0 + warp, j0 + warp + warps, ... of this block's chunk.
  const int64_t j0 = c * p.chunk, j1 = j0 + p.chunk < im.S ? j0 + p.chunk : im.S;
  const int units_per_head = D / W, units = int(H) * units_per_head;
  const int g = p.g, part = lane & (g - 1), heads_per_pass = 32 / g;
  for (int64_t j = j0 + warp; j < j1; j += warps) {
    const T* kj = k + j * p.ks2;
    const T* vj = v + j * p.vs2;
    for (int base = 0; base < units; base += 32 * kUnits) {
      typename U::Raw kr[kUnits], vr[kUnits];
#pragma unroll
      for (int i = 0; i < kUnits; ++i) {
        const int u = base + i * 32 + lane;
        if (u < units) {
          const int h = u / units_per_head, d = (u - h * units_per_head) * W;
          kr[i] = U::load(kj + h * p.ks1 + d * p.ks3);
          vr[i] = U::load(vj + h * p.vs1 + d * p.vs3);
        }
      }
#pragma unroll
      for (int i = 0; i < kUnits; ++i) {
        const int u = base + i * 32 + lane;
        if (u < units) {
          const int h = u / units_per_head, d = (u - h * units_per_head) * W;
          U::convert(kr[i], k_buf + h * P + d);
          U::convert(vr[i], v_buf + h * P + d);
        }
      }
    }
    __syncwarp();
    // g lanes per head, each over the channels part, part + g, ...; summed over the g lanes (every lane takes part
    // in the shuffles, whether its head exists or not).
    const bool candidate = j >= p.first;
    for (int h0 = 0; h0 < int(H); h0 += heads_per_pass) {
      const int h = h0 + lane / g;
      const bool live = h < int(H);
      float dot_a = 0.0f, dot_s = 0.0f;
      if (live)
        for (int d = part; d < D; d += g) {
          dot_a = fmaf(q_s[h * P + d], k_buf[h * P + d], dot_a);
          if (p.semantic) dot_s = fmaf(v0_s[h * P + d], v_buf[h * P + d], dot_s);
        }
      for (int o = g >> 1; o > 0; o >>= 1) {
        dot_a += __shfl_xor_sync(kFullMask, dot_a, o);
        dot_s += __shfl_xor_sync(kFullMask, dot_s, o);
      }
      if (live && part == 0) {
        const float la = p.scale * dot_a;
        p.logit_a[(im.row + j) * H + h] = la;
        if (p.semantic) p.logit_s[(im.row + j) * H + h] = dot_s;
        if (candidate) {
          online_add(run[4 * h], run[4 * h + 1], la);
          if (p.semantic) online_add(run[4 * h + 2], run[4 * h + 3], dot_s);
        }
      }
    }
    float l1 = 0.0f;
    for (int d = lane; d < D; d += 32) {  // a lane per channel: |mean over heads of v|
      float total = 0.0f;
      for (int64_t h = 0; h < H; ++h) total += v_buf[h * P + d];
      l1 += fabsf(total / float(H));
    }
    l1 = warp_sum(l1);
    if (lane == 0) p.rho[im.row + j] = l1;
    __syncwarp();  // the buffers are refilled for the next token
  }
  __syncthreads();

  // This chunk's per-head softmax partials over its candidates: the warps' running statistics, in warp order.
  const float* runs = v0_s + H * P + 2 * warps * H * P;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float4 out = make_float4(-INFINITY, 0.0f, -INFINITY, 0.0f);
    for (int w = 0; w < warps; ++w) {
      const float* r = runs + 4 * (w * H + h);
      online_merge(out.x, out.y, r[0], r[1]);
      online_merge(out.z, out.w, r[2], r[3]);
    }
    p.part[blockIdx.x * H + h] = out;
  }
}

// Block (head h, image b): the image's chunk partials of head h merged, in a fixed order, into lse_cand and lse_all.
__global__ void __launch_bounds__(kStatThreads) head_stats_kernel(Params p) {
  __shared__ float scratch[33];
  const int64_t h = blockIdx.x, H = p.H;
  const Image im = image_at(p, blockIdx.y);
  float ma = -INFINITY, sa = 0.0f, ms = -INFINITY, ss = 0.0f;
  for (int64_t c = threadIdx.x; c < im.chunks; c += blockDim.x) {
    const float4 part = p.part[(im.base + c) * H + h];
    online_merge(ma, sa, part.x, part.y);
    online_merge(ms, ss, part.z, part.w);
  }
  const float top_a = block_reduce<float, true>(ma, scratch), top_s = block_reduce<float, true>(ms, scratch);
  const float za = block_reduce<float, false>(ma == -INFINITY ? 0.0f : sa * expf(ma - top_a), scratch);
  const float zs = block_reduce<float, false>(ms == -INFINITY ? 0.0f : ss * expf(ms - top_s), scratch);
  if (threadIdx.x == 0) {
    const float lse_a = top_a + logf(za), lse_s = top_s + logf(zs);
    const float* relay_a = p.logit_a + im.row * H;  // the relay row's logits (the image's row 0)
    const float* relay_s = p.logit_s + im.row * H;
    float4 out = make_float4(lse_a, lse_a, lse_s, lse_s);
    if (p.first && im.S > 0) {
      out.y = logaddexpf(lse_a, relay_a[h]);
      if (p.semantic) out.w = logaddexpf(lse_s, relay_s[h]);
    }
    p.head[im.b * H + h] = out;
  }
}

// In place over H heads, by one whole warp (a lane per head): d_h -> w_h = exp(d_h - max_h d_h) / sum_h of the same.
__device__ void head_weights(float* w, int64_t H) {
  const int lane = threadIdx.x & 31;
  float top = -INFINITY, total = 0.0f;
  for (int64_t h = lane; h < H; h += 32) top = fmaxf(top, w[h]);
  top = warp_max(top);
  for (int64_t h = lane; h < H; h += 32) {
    w[h] = expf(w[h] - top);
    total += w[h];
  }
  const float inv = 1.0f / warp_sum(total);
  for (int64_t h = lane; h < H; h += 32) w[h] *= inv;
}

// Block per slot: its chunk's candidates' attention, layer and cumulative scores, and the entropy partial sums.
// Shared memory: 5 H floats.
__global__ void __launch_bounds__(kStatThreads) finish_kernel(Params p) {
  extern __shared__ float stats[];
  __shared__ float scratch[33];
  const int64_t H = p.H;
  int64_t c;
  const Image im = image_of_slot(p, blockIdx.x, &c);
  if (c >= im.chunks) return;  // an idle slot
  // Per head: lse_cand of the relay logits, c = exp(d), w (normalised), lse_cand of the value logits, its w.
  float *lse_a = stats, *c_a = stats + H, *w_a = stats + 2 * H, *lse_s = stats + 3 * H, *w_s = stats + 4 * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float4 s = p.head[im.b * H + h];
    lse_a[h] = s.x, c_a[h] = expf(s.x - s.y), w_a[h] = s.x - s.y;
    lse_s[h] = s.z, w_s[h] = s.z - s.w;
  }
  __syncthreads();
  if (threadIdx.x < 32) head_weights(w_a, H);  // warp 0
  else if (threadIdx.x < 64 && p.semantic) head_weights(w_s, H);  // warp 1
  __syncthreads();

  // Hn without cancellation: a p_j <= 1/2 adds -p_j ln p_j; a p_m > 1/2 (one-hot rows put 1 - 1e-10 there, which
  // rounds to 1) takes ln p_m = log1p(-r), r = the sum of the other p_j (its exact complement), in the entropy
  // kernel. If rounding leaves two values above 1/2, their own logs are used.
  float ent_small = 0.0f, ent_big = 0.0f, rest = 0.0f, large = 0.0f, n_big = 0.0f;
  const int64_t j0 = c * p.chunk, n0 = (j0 > p.first ? j0 : p.first) - p.first;
  const int64_t n1 = j0 + p.chunk - p.first < im.N ? j0 + p.chunk - p.first : im.N;
  for (int64_t n = n0 + threadIdx.x; n < n1; n += blockDim.x) {
    const int64_t r = im.row + p.first + n;
    float a = 0.0f, pa = 0.0f, ps = 0.0f;
    for (int64_t h = 0; h < H; ++h) {
      const float e = expf(p.logit_a[r * H + h] - lse_a[h]);
      a = fmaf(c_a[h], e, a);
      pa = fmaf(w_a[h], e, pa);
      if (p.semantic) ps = fmaf(w_s[h], expf(p.logit_s[r * H + h] - lse_s[h]), ps);
    }
    a /= float(H);
    const int64_t x = im.cand + n;
    p.attn[x] = a;
    const float term = pa == 0.0f ? 0.0f : -pa * logf(pa);  // 0 ln 0 = 0; a NaN p stays NaN
    if (pa > 0.5f) {
      ent_big += term, large += pa, n_big += 1.0f;
    } else {
      ent_small += term, rest += pa;
    }
    const float rho = p.rho[r];
    const float score = p.first ? (pa + ps) * rho : a * rho;
    p.cum[x] = p.prev ? 0.5f * p.prev[im.b * p.ps0 + x * p.ps1] + 0.5f * score : score;
  }
  ent_small = block_reduce<float, false>(ent_small, scratch), ent_big = block_reduce<float, false>(ent_big, scratch);
  rest = block_reduce<float, false>(rest, scratch), large = block_reduce<float, false>(large, scratch);
  n_big = block_reduce<float, false>(n_big, scratch);
  if (threadIdx.x == 0) {
    p.ent[2 * blockIdx.x] = make_float4(ent_small, ent_big, rest, large);
    p.ent[2 * blockIdx.x + 1] = make_float4(n_big, 0.0f, 0.0f, 0.0f);
  }
}

// Block per image: the entropy from its chunks' partial sums.
__global__ void __launch_bounds__(kStatThreads) entropy_kernel(Params p) {
  __shared__ float scratch[33];
  const Image im = image_at(p, blockIdx.x);
  float ent_small = 0.0f, ent_big = 0.0f, rest = 0.0f, large = 0.0f, n_big = 0.0f;
  for (int64_t c = threadIdx.x; c < im.chunks; c += blockDim.x) {
    const float4 x = p.ent[2 * (im.base + c)];
    ent_small += x.x, ent_big += x.y, rest += x.z, large += x.w, n_big += p.ent[2 * (im.base + c) + 1].x;
  }
  ent_small = block_reduce<float, false>(ent_small, scratch), ent_big = block_reduce<float, false>(ent_big, scratch);
  rest = block_reduce<float, false>(rest, scratch), large = block_reduce<float, false>(large, scratch);
  n_big = block_reduce<float, false>(n_big, scratch);
  if (threadIdx.x == 0) {
    const float ent = ent_small + (n_big == 1.0f ? -large * log1pf(-fminf(rest, 0.5f)) : ent_big);
    p.entropy[im.b] = im.N > 1 ? ent / logf(float(im.N)) : 0.0f;
  }
}

struct Plan {
  int device = 0;
  int warps = kMaxWarps;
  int g = 1;
  int64_t P = 0;
  int64_t chunk = 8;       // tokens per block
  int64_t chunks = 1;      // dense: chunks per image
  int64_t slots = 1;
  size_t smem = 0;         // dynamic shared memory of a scores block, bytes
  size_t smem_limit = 0;   // the most dynamic shared memory any plan on this device uses, bytes
  size_t part_bytes = 0, head_bytes = 0, ent_bytes = 0, logit_bytes = 0, rho_bytes = 0;
};

// The rows of the batch: T, the packed row axis (B S for a dense batch).
int64_t total_rows(const FlowScoresArgs& a) { return a.cu_seqlens ? a.rows : a.B * a.S; }

std::string make_plan(const FlowScoresArgs& a, Plan* plan) {
  if (a.B < 0 || a.H < 1 || a.D < 1 || (a.cu_seqlens == nullptr && a.S < 1) || (a.cu_seqlens && a.rows < 0))
    return "flow_scores: invalid shapes";
  DeviceFacts facts;
  std::string err = device_facts(&facts);
  if (!err.empty()) return err;
  const size_t limit = size_t(facts.smem_optin) - 1024;  // room for the kernel's static shared memory
  plan->device = facts.device;
  plan->smem_limit = limit;
  plan->g = 1;
  while (plan->g < 32 && plan->g * 2 * a.H <= 32) plan->g *= 2;
  plan->P = a.D + plan->g;  // lane (h, part) reads bank h g + part + g i: no conflicts when 32 divides D
  plan->warps = kMaxWarps;
  while (plan->warps > 1 && smem_bytes(plan->warps, a.H, plan->P) > limit) plan->warps /= 2;
  plan->smem = smem_bytes(plan->warps, a.H, plan->P);
  if (plan->smem > limit)
    return "flow_scores: H*D = " + std::to_string(a.H * a.D) + " is too large for the shared memory of this GPU";
  if (int64_t(5) * a.H * int64_t(sizeof(float)) > int64_t(kStaticSmem) - 1024)
    return "flow_scores: H = " + std::to_string(a.H) + " heads are too many for the finish kernel";
  // About eight blocks per SM over the whole batch; at least one token per warp.
  const int64_t T = total_rows(a);
  const int64_t per_block = 8LL * plan->warps * facts.sms;
  const int64_t per_warp = std::max<int64_t>(1, (T + per_block - 1) / per_block);
  plan->chunk = std::min<int64_t>(per_warp * plan->warps, 64LL * plan->warps);
  plan->chunks = a.cu_seqlens ? 0 : (a.S + plan->chunk - 1) / plan->chunk;
  plan->slots = a.cu_seqlens ? a.B + T / plan->chunk + 1 : a.B * plan->chunks;
  if (plan->slots > 0x7fffffffLL) return "flow_scores: too many tokens for one launch";
  if (a.B > 65535) return "flow_scores: B = " + std::to_string(a.B) + " images exceed one launch (65535)";
  plan->part_bytes = align16(sizeof(float4) * size_t(plan->slots * a.H));
  plan->head_bytes = align16(sizeof(float4) * size_t(a.B * a.H));
  plan->ent_bytes = sizeof(float4) * 2 * size_t(plan->slots);
  plan->logit_bytes = align16(sizeof(float) * size_t(T * a.H));
  plan->rho_bytes = align16(sizeof(float) * size_t(T));
  return "";
}

size_t workspace_of(const Plan& plan) {
  return plan.part_bytes + plan.head_bytes + plan.ent_bytes + 2 * plan.logit_bytes + plan.rho_bytes;
}

// Whether k and v allow 16-byte loads of T along a contiguous head dim.
bool vector_ok(const FlowScoresArgs& a, size_t elem) {
  const int64_t w = int64_t(16 / elem);
  auto fits = [&](const void* ptr, const int64_t* st) {
    return aligned16(ptr) && st[3] == 1 && st[0] % w == 0 && st[1] % w == 0 && st[2] % w == 0;
  };
  return a.D % w == 0 && fits(a.k, a.k_stride) && fits(a.v, a.v_stride);
}

// Raises the scores kernel's dynamic shared memory limit to plan.smem_limit, once per device: the same value for
// every shape, so that concurrent launches of different shapes from several host threads never undo each other's
// setting (two first calls that race both set the same value).
template <typename T, bool VEC>
std::string allow_smem(const Plan& plan) {
  constexpr int kMaxDevices = 64;  // beyond: set on every call (to the same value)
  static std::atomic<bool> done[kMaxDevices];
  const bool tracked = plan.device < kMaxDevices;
  if (tracked && done[plan.device].load(std::memory_order_acquire)) return "";
  const cudaError_t err =
      cudaFuncSetAttribute(scores_kernel<T, VEC>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_limit));
  if (err != cudaSuccess) return std::string("flow_scores: setting shared memory: ") + cudaGetErrorString(err);
  if (tracked) done[plan.device].store(true, std::memory_order_release);
  return "";
}

template <typename T, bool VEC>
std::string launch_all(const Params& p, const Plan& plan, cudaStream_t stream) {
  std::string err = allow_smem<T, VEC>(plan);
  if (!err.empty()) return err;
  scores_kernel<T, VEC><<<unsigned(plan.slots), 32 * plan.warps, plan.smem, stream>>>(p);
  err = launch_error("flow_scores launch (scores)");
  if (!err.empty()) return err;
  head_stats_kernel<<<dim3(unsigned(p.H), unsigned(p.B)), kStatThreads, 0, stream>>>(p);
  err = launch_error("flow_scores launch (head statistics)");
  if (!err.empty()) return err;
  finish_kernel<<<unsigned(plan.slots), kStatThreads, 5 * size_t(p.H) * sizeof(float), stream>>>(p);
  err = launch_error("flow_scores launch (finish)");
  if (!err.empty()) return err;
  entropy_kernel<<<unsigned(p.B), kStatThreads, 0, stream>>>(p);
  return launch_error("flow_scores launch (entropy)");
}

template <typename T>
std::string launch_typed(const Params& p, const Plan& plan, bool vec, cudaStream_t stream) {
  return vec ? launch_all<T, true>(p, plan, stream) : launch_all<T, false>(p, plan, stream);
}

}  // namespace

size_t flow_scores_workspace_bytes(const FlowScoresArgs& args) {
  Plan plan;
  if (!make_plan(args, &plan).empty()) return 0;
  return workspace_of(plan);
}

std::string launch_flow_scores(const FlowScoresArgs& a, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  Plan plan;
  std::string err = make_plan(a, &plan);
  if (!err.empty()) return err;
  if (a.B == 0) return "";
  const size_t need = workspace_of(plan);
  if (workspace_bytes < need || !aligned16(workspace))
    return "flow_scores: the workspace must be 16-byte aligned and hold " + std::to_string(need) + " bytes";

  Params p{};
  const bool packed = a.cu_seqlens != nullptr;
  p.B = a.B, p.H = a.H, p.D = a.D, p.P = plan.P, p.g = plan.g, p.S = packed ? 0 : a.S;
  p.chunk = plan.chunk, p.chunks = plan.chunks, p.slots = plan.slots, p.cu = a.cu_seqlens, p.rows = total_rows(a);
  p.first = a.has_cls ? 1 : 0;
  p.q = a.q, p.q_dtype = a.q_dtype, p.qs0 = a.q_stride[0], p.qs1 = a.q_stride[1], p.qs2 = a.q_stride[2];
  p.k = a.k, p.v = a.v;
  p.ks0 = image_skew(packed, a.k_stride[0], a.S, a.k_stride[2]), p.ks1 = a.k_stride[1], p.ks2 = a.k_stride[2];
  p.ks3 = a.k_stride[3];
  p.vs0 = image_skew(packed, a.v_stride[0], a.S, a.v_stride[2]), p.vs1 = a.v_stride[1], p.vs2 = a.v_stride[2];
  p.vs3 = a.v_stride[3];
  p.prev = a.prev, p.ps0 = image_skew(packed, a.prev_stride[0], a.S - p.first, a.prev_stride[1]);
  p.ps1 = a.prev_stride[1];
  p.scale = a.scale, p.semantic = a.has_cls && a.semantic;
  p.cum = a.cum, p.entropy = a.entropy, p.attn = a.attn;
  char* ws = static_cast<char*>(workspace);
  p.part = reinterpret_cast<float4*>(ws), ws += plan.part_bytes;
  p.head = reinterpret_cast<float4*>(ws), ws += plan.head_bytes;
  p.ent = reinterpret_cast<float4*>(ws), ws += plan.ent_bytes;
  p.logit_a = reinterpret_cast<float*>(ws), ws += plan.logit_bytes;
  p.logit_s = reinterpret_cast<float*>(ws), ws += plan.logit_bytes;
  p.rho = reinterpret_cast<float*>(ws);

  switch (a.kv_dtype) {
    case DType::kFloat32: return launch_typed<float>(p, plan, vector_ok(a, 4), stream);
    case DType::kFloat16: return launch_typed<__half>(p, plan, vector_ok(a, 2), stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, plan, vector_ok(a, 2), stream);
    case DType::kFloat64: return launch_typed<double>(p, plan, vector_ok(a, 8), stream);
    default: return "flow_scores: k and v must be float32, float16, bfloat16 or float64";
  }
}

}  // namespace cuda
}  // namespace flowcut
