// CUDA flow_scores (SPEC.md signals 1-7): one launch, grid (chunks of tokens, images).
//
// Every block streams a chunk of one image's tokens: each warp takes a token, loads its k and v rows for all
// heads with 16-byte loads (several in flight per lane) into its shared buffer as float, then writes the
// per-head relay logit scale*r_h.k_h[j] and value logit v_h[0].v_h[j] and the density rho_j = L1 of the
// head-mean value to a global workspace, and the block writes each head's (max, sum of exp) over its chunk.
// The image's last block to finish (a counter per image) combines the chunk partials into each head's softmax
// normaliser and computes A, Sm, the layer score, the cumulative score and the entropy. All in float32.
#include <algorithm>
#include <cmath>
#include <string>

#include "cuda_common.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

constexpr int kMaxUnits = 4;  // 16-byte loads in flight per lane, for each of k and v

struct Plan {
  int warps = 8;
  int64_t chunk = 8;    // tokens per block
  int64_t chunks = 1;   // blocks per image
  size_t smem = 0;      // dynamic shared memory, bytes
  size_t ws_floats = 0; // workspace floats before the counters
};

struct Params {
  int64_t B, H, S, D, N, chunk, chunks;
  const void* q;
  DType q_dtype;
  int64_t qs0, qs1, qs2;
  const void* k;
  const void* v;
  int64_t ks0, ks1, ks2, ks3, vs0, vs1, vs2, vs3;
  const float* prev;
  int64_t ps0, ps1;
  float scale;
  int first;
  bool semantic;
  float *cum, *entropy, *attn;
  float* logit_a;   // (B, S, H)
  float* logit_s;   // (B, S, H), semantic only
  float* rho;       // (B, S)
  float* sm;        // (B, S) head-mean value softmax, written by the last block
  float4* partial;  // (B, chunks, H): max and sum-exp of the relay logits, then of the value logits
  unsigned* counter;  // (B,)
};

// Shared memory: q and v0 rows, then per warp a k row and a v row, each H x (D + 1) floats (the pad keeps
// the lane-per-head reads free of bank conflicts), then 4 H head statistics and 33 floats of scratch.
size_t smem_bytes(int warps, int64_t H, int64_t D) {
  return sizeof(float) * size_t((2 + 2 * warps) * H * (D + 1) + 4 * H + 33);
}

std::string make_plan(const FlowScoresArgs& a, Plan* plan) {
  DeviceFacts facts;
  std::string err = device_facts(&facts);
  if (!err.empty()) return err;
  const size_t limit = size_t(facts.smem_optin) - 1024;  // room for the kernel's static shared memory
  plan->warps = 8;
  while (plan->warps > 1 && smem_bytes(plan->warps, a.H, a.D) > limit) plan->warps /= 2;
  plan->smem = smem_bytes(plan->warps, a.H, a.D);
  if (plan->smem > limit)
    return "flow_scores: H*D = " + std::to_string(a.H * a.D) + " is too large for the shared memory of this GPU";
  // About eight blocks per SM over the whole batch; at least one token per warp.
  const int64_t per_warp = std::max<int64_t>(1, (a.B * a.S + 8LL * plan->warps * facts.sms - 1) /
                                                    (8LL * plan->warps * facts.sms));
  plan->chunk = std::min<int64_t>(per_warp * plan->warps, 64LL * plan->warps);
  plan->chunks = (a.S + plan->chunk - 1) / plan->chunk;
  const size_t bsh = size_t(a.B * a.S * a.H);
  plan->ws_floats = 2 * bsh + 2 * size_t(a.B * a.S) + 4 * size_t(a.B * plan->chunks * a.H);
  return "";
}

template <typename T, bool VEC>
__global__ void flow_scores_kernel(Params p) {
  using U = Unit<T, VEC>;
  constexpr int W = U::width;
  extern __shared__ float smem[];
  const int64_t H = p.H, D = p.D, S = p.S, P = D + 1;  // P: padded head row
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.y, c = blockIdx.x;
  float* q_s = smem;
  float* v0_s = q_s + H * P;
  float* k_buf = v0_s + H * P + 2 * warp * H * P;
  float* v_buf = k_buf + H * P;
  float* stats = v0_s + H * P + 2 * warps * H * P;  // [4][H]: max and sum of relay, then value logits
  float* scratch = stats + 4 * H;
  const T* k = static_cast<const T*>(p.k) + b * p.ks0;
  const T* v = static_cast<const T*>(p.v) + b * p.vs0;

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
    float* la = p.logit_a + (b * S + j) * H;
    for (int64_t h = lane; h < H; h += 32) {  // a lane per head
      float dot_a = 0.0f, dot_s = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        dot_a = fmaf(q_s[h * P + d], k_buf[h * P + d], dot_a);
        if (p.semantic) dot_s = fmaf(v0_s[h * P + d], v_buf[h * P + d], dot_s);
      }
      la[h] = p.scale * dot_a;
      if (p.semantic) p.logit_s[(b * S + j) * H + h] = dot_s;
    }
    float l1 = 0.0f;
    for (int64_t d = lane; d < D; d += 32) {  // a lane per channel: |mean over heads of v|
      float total = 0.0f;
      for (int64_t h = 0; h < H; ++h) total += v_buf[h * P + d];
      l1 += fabsf(total / float(H));
    }
    l1 = warp_sum(l1);
    if (lane == 0) p.rho[b * S + j] = l1;
    __syncwarp();  // the buffers are refilled for the next token
  }
  __syncthreads();  // this block's logits are visible to all its threads

  // This chunk's per-head softmax partials.
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float4 part = make_float4(-INFINITY, 0.0f, -INFINITY, 0.0f);
    for (int64_t j = j0; j < j1; ++j) part.x = fmaxf(part.x, p.logit_a[(b * S + j) * H + h]);
    for (int64_t j = j0; j < j1; ++j) part.y += expf(p.logit_a[(b * S + j) * H + h] - part.x);
    if (p.semantic) {
      for (int64_t j = j0; j < j1; ++j) part.z = fmaxf(part.z, p.logit_s[(b * S + j) * H + h]);
      for (int64_t j = j0; j < j1; ++j) part.w += expf(p.logit_s[(b * S + j) * H + h] - part.z);
    }
    p.partial[(b * p.chunks + c) * H + h] = part;
  }

  // The image's last block finishes it.
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(p.counter + b, 1u) == unsigned(p.chunks - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();

  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float ma = -INFINITY, ms = -INFINITY;
    for (int64_t i = 0; i < p.chunks; ++i) {
      const float4 part = __ldcg(p.partial + (b * p.chunks + i) * H + h);
      ma = fmaxf(ma, part.x), ms = fmaxf(ms, part.z);
    }
    float za = 0.0f, zs = 0.0f;
    for (int64_t i = 0; i < p.chunks; ++i) {
      const float4 part = __ldcg(p.partial + (b * p.chunks + i) * H + h);
      za += part.y * expf(part.x - ma);
      if (p.semantic) zs += part.w * expf(part.z - ms);
    }
    stats[h] = ma, stats[H + h] = za, stats[2 * H + h] = ms, stats[3 * H + h] = zs;
  }
  __syncthreads();

  const int64_t N = p.N;
  float sum_a = 0.0f, sum_s = 0.0f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t j = n + p.first;
    float a = 0.0f, s = 0.0f;
    for (int64_t h = 0; h < H; ++h) {
      a += expf(__ldcg(p.logit_a + (b * S + j) * H + h) - stats[h]) / stats[H + h];
      if (p.semantic) s += expf(__ldcg(p.logit_s + (b * S + j) * H + h) - stats[2 * H + h]) / stats[3 * H + h];
    }
    a /= float(H), s /= float(H);
    p.attn[b * N + n] = a;
    p.sm[b * S + j] = s;
    sum_a += a, sum_s += s;
  }
  sum_a = block_sum(sum_a, scratch);
  sum_s = block_sum(sum_s, scratch);

  float ent = 0.0f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t j = n + p.first;
    const float a = p.attn[b * N + n], pa = a / sum_a, rho = __ldcg(p.rho + b * S + j);
    if (pa > 0.0f) ent -= pa * logf(pa);
    float score;
    if (p.first) score = (p.semantic ? pa + p.sm[b * S + j] / sum_s : pa) * rho;
    else score = a * rho;
    p.cum[b * N + n] = p.prev ? 0.5f * p.prev[b * p.ps0 + n * p.ps1] + 0.5f * score : score;
  }
  ent = block_sum(ent, scratch);
  if (threadIdx.x == 0) {
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

template <typename T>
std::string launch_typed(const Params& p, const Plan& plan, bool vec, cudaStream_t stream) {
  auto kernel = vec ? flow_scores_kernel<T, true> : flow_scores_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem));
  if (err != cudaSuccess) return std::string("flow_scores: setting shared memory: ") + cudaGetErrorString(err);
  const dim3 grid(unsigned(plan.chunks), unsigned(p.B));
  kernel<<<grid, 32 * plan.warps, plan.smem, stream>>>(p);
  err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("flow_scores launch: ") + cudaGetErrorString(err);
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
  p.B = a.B, p.H = a.H, p.S = a.S, p.D = a.D, p.first = a.has_cls ? 1 : 0, p.N = a.S - p.first;
  p.chunk = plan.chunk, p.chunks = plan.chunks;
  p.q = a.q, p.q_dtype = a.q_dtype, p.qs0 = a.q_stride[0], p.qs1 = a.q_stride[1], p.qs2 = a.q_stride[2];
  p.k = a.k, p.v = a.v;
  p.ks0 = a.k_stride[0], p.ks1 = a.k_stride[1], p.ks2 = a.k_stride[2], p.ks3 = a.k_stride[3];
  p.vs0 = a.v_stride[0], p.vs1 = a.v_stride[1], p.vs2 = a.v_stride[2], p.vs3 = a.v_stride[3];
  p.prev = a.prev, p.ps0 = a.prev_stride[0], p.ps1 = a.prev_stride[1];
  p.scale = a.scale, p.semantic = a.has_cls && a.semantic;
  p.cum = a.cum, p.entropy = a.entropy, p.attn = a.attn;
  const size_t bsh = size_t(a.B * a.S * a.H), bs = size_t(a.B * a.S);
  float* ws = static_cast<float*>(workspace);
  p.partial = reinterpret_cast<float4*>(ws);  // first: 16-byte aligned
  p.logit_a = ws + 4 * size_t(a.B * plan.chunks * a.H);
  p.logit_s = p.logit_a + bsh;
  p.rho = p.logit_s + bsh;
  p.sm = p.rho + bs;
  p.counter = reinterpret_cast<unsigned*>(ws + plan.ws_floats);

  cudaError_t merr = cudaMemsetAsync(p.counter, 0, size_t(a.B) * sizeof(unsigned), stream);
  if (merr != cudaSuccess) return std::string("flow_scores: clearing counters: ") + cudaGetErrorString(merr);
  switch (a.kv_dtype) {
    case DType::kFloat32: return launch_typed<float>(p, plan, vector_ok(a, 4), stream);
    case DType::kFloat16: return launch_typed<__half>(p, plan, vector_ok(a, 2), stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16>(p, plan, vector_ok(a, 2), stream);
    default: return "flow_scores: k and v must be float32, float16 or bfloat16";
  }
}

}  // namespace cuda
}  // namespace flowcut
