// CUDA flow_scores (docs/semantics.md signals 1-7): one launch, grid (chunks of tokens, images), for a dense
// batch and a packed one alike: image b is rows row_b .. row_b + S_b of a packed row axis (a dense batch is the
// case row_b = b S, S_b = S), and an image of a packed batch shorter than the longest leaves its last blocks idle.
//
// Every block streams a chunk of one image's tokens: each warp takes a token, loads its k and v rows for all
// heads with 16-byte loads (several in flight per lane) into its shared buffer as float, then writes the
// per-head relay logit scale*r_h.k_h[j] and value logit v_h[0].v_h[j] and the density rho_j = L1 of the
// head-mean value to a global workspace, and the block writes each head's (max, sum of exp) over its chunk's
// candidates. The image's last block to finish (a counter per image) combines the chunk partials into each
// head's candidate log-sum-exp lse_cand_h, adds the relay row's own logit in the CLS variant
// (lse_all_h = logaddexp(lse_cand_h, l_h[0]); lse_all_h = lse_cand_h in the mean variant), and computes
// A[j] = mean_h exp(l_h[j] - lse_all_h) and the candidates' normalised attention without dividing underflowed
// values: p[j] = sum_h w_h exp(l_h[j] - lse_cand_h) / sum_h w_h, w_h = exp(d_h - max_h d_h),
// d_h = lse_cand_h - lse_all_h (the same for the semantic term); then the layer score, the cumulative score
// and the entropy of p (without cancellation: a p_m > 1/2 takes ln p_m = log1p(-sum of the other p)). All in float32 (float64 inputs are read as such and converted). The workspace holds the
// logits and rho by packed row, the outputs are packed by candidate (image b's from row_b - b * first).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "cuda_common.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

constexpr int kMaxUnits = 4;  // 16-byte loads in flight per lane, for each of k and v

struct Plan {
  int device = 0;
  int warps = 8;
  int64_t chunk = 8;        // tokens per block
  int64_t chunks = 1;       // blocks per image (of the longest image)
  size_t smem = 0;          // dynamic shared memory, bytes
  size_t smem_limit = 0;    // the most dynamic shared memory any plan on this device uses, bytes
  size_t ws_floats = 0;     // workspace floats before the counters
};

struct Params {
  int64_t B, H, S, D, chunk, chunks;
  const int64_t* cu;  // packed: (B + 1,) row offsets; nullptr: dense, image b in rows b S .. b S + S
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
  float* logit_a;   // (T, H) by packed row
  float* logit_s;   // (T, H), semantic only
  float* rho;       // (T,)
  float4* partial;  // (B, chunks, H): max and sum-exp of the candidates' relay logits, then of their value logits
  unsigned* counter;  // (B,)
};

// The rows of the batch: T, the packed row axis (B S for a dense batch).
int64_t total_rows(const FlowScoresArgs& a) { return a.cu_seqlens ? a.rows : a.B * a.S; }

// Shared memory: q and v0 rows, then per warp a k row and a v row, each H x (D + 1) floats (the pad keeps
// the lane-per-head reads free of bank conflicts), then 5 H + 2 head statistics and 33 floats of scratch.
size_t smem_bytes(int warps, int64_t H, int64_t D) {
  return sizeof(float) * size_t((2 + 2 * warps) * H * (D + 1) + 5 * H + 2 + 33);
}

std::string make_plan(const FlowScoresArgs& a, Plan* plan) {
  DeviceFacts facts;
  std::string err = device_facts(&facts);
  if (!err.empty()) return err;
  const size_t limit = size_t(facts.smem_optin) - 1024;  // room for the kernel's static shared memory
  plan->device = facts.device;
  plan->smem_limit = limit;
  plan->warps = 8;
  while (plan->warps > 1 && smem_bytes(plan->warps, a.H, a.D) > limit) plan->warps /= 2;
  plan->smem = smem_bytes(plan->warps, a.H, a.D);
  if (plan->smem > limit)
    return "flow_scores: H*D = " + std::to_string(a.H * a.D) + " is too large for the shared memory of this GPU";
  // About eight blocks per SM over the whole batch; at least one token per warp.
  const int64_t T = total_rows(a);
  const int64_t per_warp = std::max<int64_t>(1, (T + 8LL * plan->warps * facts.sms - 1) /
                                                    (8LL * plan->warps * facts.sms));
  plan->chunk = std::min<int64_t>(per_warp * plan->warps, 64LL * plan->warps);
  plan->chunks = (a.S + plan->chunk - 1) / plan->chunk;
  plan->ws_floats = 2 * size_t(T * a.H) + size_t(T) + 4 * size_t(a.B * plan->chunks * a.H);
  return "";
}

__device__ __forceinline__ float logaddexpf(float x, float y) {
  return fmaxf(x, y) + log1pf(expf(-fabsf(x - y)));
}

// In place over H heads: d_h -> w_h = exp(d_h - max_h d_h); *inv_sum = 1 / sum_h w_h (at least 1: the largest
// w_h is 1).
__device__ void head_weights(float* w, int64_t H, float* inv_sum) {
  float top = -INFINITY, total = 0.0f;
  for (int64_t h = 0; h < H; ++h) top = fmaxf(top, w[h]);
  for (int64_t h = 0; h < H; ++h) {
    w[h] = expf(w[h] - top);
    total += w[h];
  }
  *inv_sum = 1.0f / total;
}

template <typename T, bool VEC>
__global__ void flow_scores_kernel(Params p) {
  using U = Unit<T, VEC>;
  constexpr int W = U::width;
  extern __shared__ float smem[];
  const int64_t H = p.H, D = p.D, P = D + 1;  // P: padded head row
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.y, c = blockIdx.x;
  // This image: rows row .. row + S of the packed row axis, its N candidates from packed candidate cand.
  const int64_t row = p.cu ? p.cu[b] : b * p.S, S = p.cu ? p.cu[b + 1] - row : p.S;
  const int64_t chunks = (S + p.chunk - 1) / p.chunk, N = S - p.first, cand = row - b * p.first;
  if (c >= chunks) return;  // a packed batch's shorter image: this block has no tokens
  float* q_s = smem;
  float* v0_s = q_s + H * P;
  float* k_buf = v0_s + H * P + 2 * warp * H * P;
  float* v_buf = k_buf + H * P;
  float* stats = v0_s + H * P + 2 * warps * H * P;  // 5 H + 2 head statistics of the last block
  float* scratch = stats + 5 * H + 2;
  const T* k = static_cast<const T*>(p.k) + (b * p.ks0 + row * p.ks2);  // the image's token 0
  const T* v = static_cast<const T*>(p.v) + (b * p.vs0 + row * p.vs2);

  for (int64_t i = threadIdx.x; i < H * D; i += blockDim.x) {
    const int64_t h = i / D, d = i % D;
    q_s[h * P + d] = load_any(p.q, p.q_dtype, b * p.qs0 + h * p.qs1 + d * p.qs2);
    if (p.semantic) v0_s[h * P + d] = to_float(v[h * p.vs1 + d * p.vs3]);
  }
  __syncthreads();

  // Each warp: tokens j0 + warp, j0 + warp + warps, ... of this block's chunk.
  const int64_t j0 = c * p.chunk, j1 = j0 + p.chunk < S ? j0 + p.chunk : S;
  const int64_t units_per_head = D / W, units = H * units_per_head;
  for (int64_t j = j0 + warp; j < j1; j += warps) {
    for (int64_t base = 0; base < units; base += 32 * kMaxUnits) {
      typename U::Raw kr[kMaxUnits], vr[kMaxUnits];
#pragma unroll
      for (int i = 0; i < kMaxUnits; ++i) {
        const int64_t u = base + i * 32 + lane;
        if (u < units) {
          const int64_t h = u / units_per_head, d = (u % units_per_head) * W;
          kr[i] = U::load(k + h * p.ks1 + j * p.ks2 + d * p.ks3);
          vr[i] = U::load(v + h * p.vs1 + j * p.vs2 + d * p.vs3);
        }
      }
#pragma unroll
      for (int i = 0; i < kMaxUnits; ++i) {
        const int64_t u = base + i * 32 + lane;
        if (u < units) {
          const int64_t h = u / units_per_head, d = (u % units_per_head) * W;
          U::convert(kr[i], k_buf + h * P + d);
          U::convert(vr[i], v_buf + h * P + d);
        }
      }
    }
    __syncwarp();
    float* la = p.logit_a + (row + j) * H;
    for (int64_t h = lane; h < H; h += 32) {  // a lane per head
      float dot_a = 0.0f, dot_s = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        dot_a = fmaf(q_s[h * P + d], k_buf[h * P + d], dot_a);
        if (p.semantic) dot_s = fmaf(v0_s[h * P + d], v_buf[h * P + d], dot_s);
      }
      la[h] = p.scale * dot_a;
      if (p.semantic) p.logit_s[(row + j) * H + h] = dot_s;
    }
    float l1 = 0.0f;
    for (int64_t d = lane; d < D; d += 32) {  // a lane per channel: |mean over heads of v|
      float total = 0.0f;
      for (int64_t h = 0; h < H; ++h) total += v_buf[h * P + d];
      l1 += fabsf(total / float(H));
    }
    l1 = warp_sum(l1);
    if (lane == 0) p.rho[row + j] = l1;
    __syncwarp();  // the buffers are refilled for the next token
  }
  __syncthreads();  // this block's logits are visible to all its threads

  // This chunk's per-head softmax partials over its candidates (the relay row enters through lse_all).
  const int64_t c0 = j0 > p.first ? j0 : p.first;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float4 part = make_float4(-INFINITY, 0.0f, -INFINITY, 0.0f);
    for (int64_t j = c0; j < j1; ++j) part.x = fmaxf(part.x, p.logit_a[(row + j) * H + h]);
    for (int64_t j = c0; j < j1; ++j) part.y += expf(p.logit_a[(row + j) * H + h] - part.x);
    if (p.semantic) {
      for (int64_t j = c0; j < j1; ++j) part.z = fmaxf(part.z, p.logit_s[(row + j) * H + h]);
      for (int64_t j = c0; j < j1; ++j) part.w += expf(p.logit_s[(row + j) * H + h] - part.z);
    }
    p.partial[(b * p.chunks + c) * H + h] = part;
  }

  // The image's last block finishes it.
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(p.counter + b, 1u) == unsigned(chunks - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();

  // Per head: lse_cand and lse_all of the relay logits, lse_cand of the value logits, and d = lse_cand - lse_all
  // of each in w_a / w_s, turned below into w = exp(d - max_h d), with 1 / sum_h w in inv_w.
  float *lse_a = stats, *lse_all_a = stats + H, *w_a = stats + 2 * H, *lse_s = stats + 3 * H, *w_s = stats + 4 * H;
  float* inv_w = stats + 5 * H;
  const float* relay_a = p.logit_a + row * H;  // the relay row's logits (the image's row 0)
  const float* relay_s = p.logit_s + row * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float ma = -INFINITY, ms = -INFINITY;
    for (int64_t i = 0; i < chunks; ++i) {
      const float4 part = __ldcg(p.partial + (b * p.chunks + i) * H + h);
      ma = fmaxf(ma, part.x), ms = fmaxf(ms, part.z);
    }
    float za = 0.0f, zs = 0.0f;
    for (int64_t i = 0; i < chunks; ++i) {
      const float4 part = __ldcg(p.partial + (b * p.chunks + i) * H + h);
      za += part.y * expf(part.x - ma);
      if (p.semantic) zs += part.w * expf(part.z - ms);
    }
    lse_a[h] = ma + logf(za);
    lse_all_a[h] = p.first ? logaddexpf(lse_a[h], __ldcg(relay_a + h)) : lse_a[h];
    w_a[h] = lse_a[h] - lse_all_a[h];
    if (p.semantic) {  // the CLS variant only
      lse_s[h] = ms + logf(zs);
      w_s[h] = lse_s[h] - logaddexpf(lse_s[h], __ldcg(relay_s + h));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    head_weights(w_a, H, inv_w);
    if (p.semantic) head_weights(w_s, H, inv_w + 1);
  }
  __syncthreads();

  // Hn without cancellation: a p_j <= 1/2 adds -p_j ln p_j; a p_m > 1/2 (one-hot rows put 1 - 1e-10 there, which
  // rounds to 1) takes ln p_m = log1p(-r), r = the sum of the other p_j (its exact complement). If rounding leaves
  // two values above 1/2, their own logs are used.
  float ent_small = 0.0f, ent_big = 0.0f, rest = 0.0f, large = 0.0f, n_big = 0.0f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t r = row + p.first + n;
    float a = 0.0f, pa = 0.0f, ps = 0.0f;
    for (int64_t h = 0; h < H; ++h) {
      const float la = __ldcg(p.logit_a + r * H + h);
      a += expf(la - lse_all_a[h]);
      pa += w_a[h] * expf(la - lse_a[h]);
      if (p.semantic) ps += w_s[h] * expf(__ldcg(p.logit_s + r * H + h) - lse_s[h]);
    }
    a /= float(H), pa *= inv_w[0];
    p.attn[cand + n] = a;
    const float term = pa > 0.0f ? -pa * logf(pa) : 0.0f;
    if (pa > 0.5f) {
      ent_big += term, large += pa, n_big += 1.0f;
    } else {
      ent_small += term, rest += pa;
    }
    const float rho = __ldcg(p.rho + r);
    float score;
    if (p.first) score = (p.semantic ? pa + ps * inv_w[1] : pa) * rho;
    else score = a * rho;
    p.cum[cand + n] = p.prev ? 0.5f * p.prev[b * p.ps0 + (cand + n) * p.ps1] + 0.5f * score : score;
  }
  ent_small = block_sum(ent_small, scratch), ent_big = block_sum(ent_big, scratch);
  rest = block_sum(rest, scratch), large = block_sum(large, scratch), n_big = block_sum(n_big, scratch);
  if (threadIdx.x == 0) {
    const float ent = ent_small + (n_big == 1.0f ? -large * log1pf(-fminf(rest, 0.5f)) : ent_big);
    p.entropy[b] = N > 1 ? ent / logf(float(N)) : 0.0f;
    p.counter[b] = 0u;  // left as found
  }
}

// Whether k and v allow 16-byte loads of T along a contiguous head dim.
bool vector_ok(const FlowScoresArgs& a, size_t elem) {
  const int64_t w = int64_t(16 / elem);
  auto fits = [&](const void* ptr, const int64_t* st) {
    return aligned16(ptr) && st[3] == 1 && st[0] % w == 0 && st[1] % w == 0 && st[2] % w == 0;
  };
  return a.D % w == 0 && fits(a.k, a.k_stride) && fits(a.v, a.v_stride);
}

// Raises a kernel's dynamic shared memory limit to plan.smem_limit, once per device: the same value for every
// shape, so that concurrent launches of different shapes from several host threads never undo each other's
// setting (two first calls that race both set the same value).
template <typename T, bool VEC>
std::string allow_smem(const Plan& plan) {
  constexpr int kMaxDevices = 64;  // beyond: set on every call (to the same value)
  static std::atomic<bool> done[kMaxDevices];
  const bool tracked = plan.device < kMaxDevices;
  if (tracked && done[plan.device].load(std::memory_order_acquire)) return "";
  const cudaError_t err = cudaFuncSetAttribute(flow_scores_kernel<T, VEC>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_limit));
  if (err != cudaSuccess) return std::string("flow_scores: setting shared memory: ") + cudaGetErrorString(err);
  if (tracked) done[plan.device].store(true, std::memory_order_release);
  return "";
}

template <typename T, bool VEC>
std::string launch_kernel(const Params& p, const Plan& plan, cudaStream_t stream) {
  const std::string err = allow_smem<T, VEC>(plan);
  if (!err.empty()) return err;
  const dim3 grid(unsigned(plan.chunks), unsigned(p.B));
  flow_scores_kernel<T, VEC><<<grid, 32 * plan.warps, plan.smem, stream>>>(p);
  const cudaError_t launch = cudaGetLastError();
  return launch == cudaSuccess ? std::string() : std::string("flow_scores launch: ") + cudaGetErrorString(launch);
}

template <typename T>
std::string launch_typed(const Params& p, const Plan& plan, bool vec, cudaStream_t stream) {
  return vec ? launch_kernel<T, true>(p, plan, stream) : launch_kernel<T, false>(p, plan, stream);
}

}  // namespace

size_t flow_scores_workspace_bytes(const FlowScoresArgs& args) {
  Plan plan;
  if (!make_plan(args, &plan).empty()) return 0;
  return plan.ws_floats * sizeof(float) + size_t(args.B) * sizeof(unsigned);
}

std::string launch_flow_scores(const FlowScoresArgs& a, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream) {
  if (a.B == 0) return "";
  if (a.B > 65535) return "flow_scores: B = " + std::to_string(a.B) + " images exceed one launch (65535)";
  Plan plan;
  std::string err = make_plan(a, &plan);
  if (!err.empty()) return err;
  const size_t need = plan.ws_floats * sizeof(float) + size_t(a.B) * sizeof(unsigned);
  if (workspace_bytes < need || !aligned16(workspace))
    return "flow_scores: the workspace must be 16-byte aligned and hold " + std::to_string(need) + " bytes";

  Params p{};
  p.B = a.B, p.H = a.H, p.S = a.S, p.D = a.D, p.first = a.has_cls ? 1 : 0, p.cu = a.cu_seqlens;
  p.chunk = plan.chunk, p.chunks = plan.chunks;
  p.q = a.q, p.q_dtype = a.q_dtype, p.qs0 = a.q_stride[0], p.qs1 = a.q_stride[1], p.qs2 = a.q_stride[2];
  p.k = a.k, p.v = a.v;
  const bool packed = a.cu_seqlens != nullptr;
  p.ks0 = image_skew(packed, a.k_stride[0], a.S, a.k_stride[2]), p.ks1 = a.k_stride[1], p.ks2 = a.k_stride[2];
  p.ks3 = a.k_stride[3];
  p.vs0 = image_skew(packed, a.v_stride[0], a.S, a.v_stride[2]), p.vs1 = a.v_stride[1], p.vs2 = a.v_stride[2];
  p.vs3 = a.v_stride[3];
  p.prev = a.prev, p.ps0 = image_skew(packed, a.prev_stride[0], a.S - p.first, a.prev_stride[1]);
  p.ps1 = a.prev_stride[1];
  p.scale = a.scale, p.semantic = a.has_cls && a.semantic;
  p.cum = a.cum, p.entropy = a.entropy, p.attn = a.attn;
  const size_t bsh = size_t(total_rows(a) * a.H);
  float* ws = static_cast<float*>(workspace);
  p.partial = reinterpret_cast<float4*>(ws);  // first: 16-byte aligned
  p.logit_a = ws + 4 * size_t(a.B * plan.chunks * a.H);
  p.logit_s = p.logit_a + bsh;
  p.rho = p.logit_s + bsh;
  p.counter = reinterpret_cast<unsigned*>(ws + plan.ws_floats);

  cudaError_t merr = cudaMemsetAsync(p.counter, 0, size_t(a.B) * sizeof(unsigned), stream);
  if (merr != cudaSuccess) return std::string("flow_scores: clearing counters: ") + cudaGetErrorString(merr);
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
