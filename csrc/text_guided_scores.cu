// CUDA text_guided_scores (flowcut_kernels/ops/reference.py, "Generic primitives"; the launcher's contract is in
// flowcut_cuda.h): a block per (key head, segment) computes logits, softmaxes and head sums into a workspace; a warp
// per output token then sums over the key heads and multiplies by rho. Accumulation in Acc (float, or double for
// float64 k); no floating-point atomics, every sum in a fixed order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "acc_math.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

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
      x = warp_sum(x);
      if (lane == 0) lg[i * p.total + j] = scale * x;
    }
    __syncwarp();
    for (int64_t d = lane; d < D; d += 32)
      row_s[d] = load_as<Acc>(p.v, p.vd, b * p.vs0 + kv * p.vs1 + t * p.vs2 + d * p.vs3);
    __syncwarp();
    Acc x = Acc(0);
    for (int64_t d = lane; d < D; d += 32) x = fma_acc(vt_s[d], row_s[d], x);
    x = warp_sum(x);
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
  l1 = warp_sum(l1);
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

}  // namespace

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

}  // namespace cuda
}  // namespace flowcut
