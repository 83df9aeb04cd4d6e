// The native ops' schemas (torch.ops.flowcut.native_flow_scores / native_select_gather and their packed forms
// native_flow_scores_varlen / native_select_gather_varlen; the generic primitives native_attention_scores /
// native_text_guided_scores / native_topk_select / native_merge_nearest), their input checks, and the CPU
// implementations.
// cuda_binding.cpp adds the CUDA ones; flowcut_kernels/ops/native.py registers the fake (meta) implementations.
//
// TORCH_LIBRARY (this library defines the native_* schemas) coexists with the Python custom_ops of the
// same namespace (flow_scores, select_gather, prune_count, the Triton ops): those are fragments, which
// may join a namespace that one TORCH_LIBRARY owns, in either load order (checked when this was written).
// The fake implementations live in flowcut_kernels.ops.native, named below so that FakeTensor tracing of
// these ops without that import says where to find them.

#include "ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "flowcut_cpu.h"
#include "primitives_cpu.h"

namespace flowcut {

namespace {

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

// cu_seqlens (B + 1,) int32/int64, B >= 1, on `device`.
void check_cu_seqlens(const at::Tensor& cu_seqlens, const at::Device& device) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2, "cu_seqlens must have shape (B + 1,) with B >= 1, got ",
              cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
              "cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.device() == device, "cu_seqlens must be on the device of the other tensors (", device,
              "), got ", cu_seqlens.device());
}

}  // namespace

std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu_seqlens, int64_t rows, int64_t min_len) {
  const at::Tensor host = cu_seqlens.to(at::Device(at::kCPU), at::kLong).contiguous();
  const int64_t* values = host.const_data_ptr<int64_t>();
  std::vector<int64_t> cu(values, values + host.numel());
  TORCH_CHECK(cu[0] == 0, "cu_seqlens must start at 0, got ", cu[0]);
  for (size_t b = 0; b + 1 < cu.size(); ++b)
    TORCH_CHECK(cu[b + 1] - cu[b] >= min_len, "cu_seqlens must ",
                min_len > 0 ? "increase by at least " + std::to_string(min_len) + " per image (each image needs a "
                                  "candidate)"
                            : std::string("not decrease"),
                ", got ", cu[b + 1] - cu[b], " rows for image ", b);
  TORCH_CHECK(cu.back() == rows, "cu_seqlens must end at the row count ", rows, ", got ", cu.back());
  return cu;
}

void check_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0,
              "scale must be a finite positive float (the attention scale, e.g. head_dim ** -0.5), got ", scale);
}

// k and v of flow_scores: `dims` dims (shape `shape`), at least one head (dim 1), one shape, one float dtype.
static void check_kv(const at::Tensor& k, const at::Tensor& v, int64_t dims, const char* shape) {
  TORCH_CHECK(k.dim() == dims, "k must have shape ", shape, ", got ", k.sizes());
  TORCH_CHECK(k.size(1) >= 1, "k must hold at least one head (H >= 1: the scores are means over heads), got ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(is_float(k) && v.scalar_type() == k.scalar_type(),
              "k and v must share one dtype of float32/float16/bfloat16/float64, got ", k.scalar_type(), " and ",
              v.scalar_type());
}

void check_flow_scores_inputs(const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& prev, bool has_cls) {
  check_kv(k, v, 4, "(B, H, S, D)");
  TORCH_CHECK(q_relay.dim() == 3 && q_relay.size(0) == k.size(0) && q_relay.size(1) == k.size(1) &&
                  q_relay.size(2) == k.size(3),
              "q_relay must have shape (B, H, D) = (", k.size(0), ", ", k.size(1), ", ", k.size(3), "), got ",
              q_relay.sizes());
  TORCH_CHECK(is_float(q_relay), "q_relay must be float32/float16/bfloat16/float64, got ", q_relay.scalar_type());
  const int64_t n = k.size(2) - (has_cls ? 1 : 0);
  TORCH_CHECK(n >= 1, "k has S=", k.size(2), " tokens: no candidate left (the CLS variant needs S >= 2)");
  TORCH_CHECK(q_relay.device() == k.device() && v.device() == k.device(),
              "q_relay, k and v must be on one device");
  if (prev.has_value()) {
    TORCH_CHECK(prev->dim() == 2 && prev->size(0) == k.size(0) && prev->size(1) == n,
                "prev must have shape (B, N) = (", k.size(0), ", ", n, "), got ", prev->sizes());
    TORCH_CHECK(prev->scalar_type() == at::kFloat, "prev must be float32, got ", prev->scalar_type());
    TORCH_CHECK(prev->device() == k.device(), "prev must be on the device of k");
  }
}

void check_select_gather_inputs(const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map,
                                int64_t keep, bool has_cls) {
  TORCH_CHECK(hidden.dim() == 3, "hidden must have shape (B, S, C), got ", hidden.sizes());
  const int64_t n = hidden.size(1) - (has_cls ? 1 : 0);
  TORCH_CHECK(cum.dim() == 2 && cum.size(0) == hidden.size(0) && cum.size(1) == n,
              "cum must have shape (B, N) = (", hidden.size(0), ", ", n, "), got ", cum.sizes());
  TORCH_CHECK(index_map.sizes() == cum.sizes(), "index_map must have the shape of cum ", cum.sizes(), ", got ",
              index_map.sizes());
  TORCH_CHECK(cum.scalar_type() == at::kFloat, "cum must be float32, got ", cum.scalar_type());
  TORCH_CHECK(index_map.scalar_type() == at::kLong, "index_map must be int64, got ", index_map.scalar_type());
  TORCH_CHECK(is_float(hidden), "hidden must be float32/float16/bfloat16/float64, got ", hidden.scalar_type());
  TORCH_CHECK(keep >= 1 && keep <= hidden.size(1), "keep=", keep, " is out of range [1, S=", hidden.size(1), "]");
  TORCH_CHECK(cum.device() == hidden.device() && index_map.device() == hidden.device(),
              "hidden, cum and index_map must be on one device");
}

void check_flow_scores_varlen_inputs(const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& prev,
                                     bool has_cls) {
  check_kv(k, v, 3, "(T, H, D)");
  check_cu_seqlens(cu_seqlens, k.device());
  const int64_t B = cu_seqlens.numel() - 1, first = has_cls ? 1 : 0;
  TORCH_CHECK(q_relay.dim() == 3 && q_relay.size(0) == B && q_relay.size(1) == k.size(1) &&
                  q_relay.size(2) == k.size(2),
              "q_relay must have shape (B, H, D) = (", B, ", ", k.size(1), ", ", k.size(2), "), got ", q_relay.sizes());
  TORCH_CHECK(is_float(q_relay), "q_relay must be float32/float16/bfloat16/float64, got ", q_relay.scalar_type());
  TORCH_CHECK(q_relay.device() == k.device() && v.device() == k.device(), "q_relay, k and v must be on one device");
  if (prev.has_value()) {
    const int64_t n = k.size(0) - B * first;
    TORCH_CHECK(prev->dim() == 1 && prev->size(0) == n, "prev must have shape (T_c,) = (", n, ",), got ",
                prev->sizes());
    TORCH_CHECK(prev->scalar_type() == at::kFloat, "prev must be float32, got ", prev->scalar_type());
    TORCH_CHECK(prev->device() == k.device(), "prev must be on the device of k");
  }
  TORCH_CHECK(k.size(0) >= B * (first + 1), "k has T=", k.size(0), " rows: too few for ", B, " images of at least ",
              first + 1, " rows each");
}

void check_select_gather_varlen_inputs(const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map,
                                       const at::Tensor& cu_seqlens, at::IntArrayRef keep, bool has_cls) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must have shape (T, C), got ", hidden.sizes());
  TORCH_CHECK(is_float(hidden), "hidden must be float32/float16/bfloat16/float64, got ", hidden.scalar_type());
  check_cu_seqlens(cu_seqlens, hidden.device());
  const int64_t B = cu_seqlens.numel() - 1, first = has_cls ? 1 : 0, n = hidden.size(0) - B * first;
  TORCH_CHECK(cum.dim() == 1 && cum.size(0) == n, "cum must have shape (T_c,) = (", n, ",), got ", cum.sizes());
  TORCH_CHECK(index_map.sizes() == cum.sizes(), "index_map must have the shape of cum ", cum.sizes(), ", got ",
              index_map.sizes());
  TORCH_CHECK(cum.scalar_type() == at::kFloat, "cum must be float32, got ", cum.scalar_type());
  TORCH_CHECK(index_map.scalar_type() == at::kLong, "index_map must be int64, got ", index_map.scalar_type());
  TORCH_CHECK(int64_t(keep.size()) == B, "keep must hold one count per image (", B, "), got ", keep.size());
  TORCH_CHECK(cum.device() == hidden.device() && index_map.device() == hidden.device(),
              "hidden, cum and index_map must be on one device");
  TORCH_CHECK(n >= 0, "hidden has T=", hidden.size(0), " rows: too few for ", B, " images");
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(keep[b] >= 1, "keep[", b, "]=", keep[b], " is out of range [1, S]: an image keeps at least one row");
    total += keep[b];
  }
  TORCH_CHECK(total <= hidden.size(0), "keep sums to ", total, " rows, more than the T=", hidden.size(0),
              " rows of hidden");
}

void check_keep_fits(const std::vector<int64_t>& cu, at::IntArrayRef keep) {
  for (size_t b = 0; b + 1 < cu.size(); ++b)
    TORCH_CHECK(keep[b] <= cu[b + 1] - cu[b], "keep[", b, "]=", keep[b], " is out of range [1, S=", cu[b + 1] - cu[b],
                "]");
}

void check_attention_scores_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& key_mask,
                                   int64_t span_start, int64_t span_end) {
  TORCH_CHECK(k.dim() == 4, "k must have shape (B, Hkv, S, D), got ", k.sizes());
  TORCH_CHECK(q.dim() == 4 && q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "q must have shape (B, Hq, Q, D) with B = ", k.size(0), ", D = ", k.size(3), ", got ", q.sizes());
  TORCH_CHECK(is_float(q) && is_float(k), "q and k must be float32/float16/bfloat16/float64, got ", q.scalar_type(),
              " and ", k.scalar_type());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) >= 1 && q.size(1) % k.size(1) == 0, "q's ", q.size(1),
              " query heads must be a positive multiple of k's ", k.size(1), " key heads");
  TORCH_CHECK(q.size(2) >= 1, "q must hold at least one query row, got ", q.sizes());
  TORCH_CHECK(q.device() == k.device(), "q and k must be on one device");
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->dim() == 2 && key_mask->size(0) == k.size(0) && key_mask->size(1) == k.size(2),
                "key_mask must have shape (B, S) = (", k.size(0), ", ", k.size(2), "), got ", key_mask->sizes());
    TORCH_CHECK(key_mask->scalar_type() == at::kBool, "key_mask must be bool, got ", key_mask->scalar_type());
    TORCH_CHECK(key_mask->device() == k.device(), "key_mask must be on the device of k");
  }
  TORCH_CHECK(0 <= span_start && span_start <= span_end && span_end <= k.size(2), "the span [", span_start, ", ",
              span_end, ") must satisfy 0 <= start <= end <= S = ", k.size(2));
}

void check_text_guided_scores_inputs(const at::Tensor& q_relay, const at::Tensor& v_relay, const at::Tensor& k,
                                     const at::Tensor& v, at::IntArrayRef segments) {
  TORCH_CHECK(k.dim() == 4, "k must have shape (B, Hkv, S, D), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3);
  TORCH_CHECK(q_relay.dim() == 3 && q_relay.size(0) == B && q_relay.size(2) == D && Hkv >= 1 && q_relay.size(1) >= 1 &&
                  q_relay.size(1) % Hkv == 0,
              "q_relay must have shape (B, Hq, D) with B = ", B, ", D = ", D, " and Hq a positive multiple of ", Hkv,
              ", got ", q_relay.sizes());
  TORCH_CHECK(v_relay.dim() == 3 && v_relay.size(0) == B && v_relay.size(1) == Hkv && v_relay.size(2) == D,
              "v_relay must have shape (B, Hkv, D) = (", B, ", ", Hkv, ", ", D, "), got ", v_relay.sizes());
  TORCH_CHECK(is_float(q_relay) && is_float(v_relay) && is_float(k) && is_float(v),
              "q_relay, v_relay, k and v must be float32/float16/bfloat16/float64, got ", q_relay.scalar_type(), ", ",
              v_relay.scalar_type(), ", ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(q_relay.device() == k.device() && v_relay.device() == k.device() && v.device() == k.device(),
              "q_relay, v_relay, k and v must be on one device");
  TORCH_CHECK(segments.size() % 3 == 0, "segments must hold (b, start, end) triples, got ", segments.size(),
              " integers");
  for (size_t g = 0; g < segments.size(); g += 3) {
    const int64_t b = segments[g], start = segments[g + 1], end = segments[g + 2];
    TORCH_CHECK(0 <= b && b < B && 0 <= start && start <= end && end <= S, "segment ", g / 3, " (", b, ", ", start,
                ", ", end, ") must satisfy 0 <= b < B = ", B, " and 0 <= start <= end <= S = ", S);
  }
}

std::vector<int64_t> check_topk_select_inputs(const at::Tensor& scores, const at::Tensor& cu_seqlens,
                                              at::IntArrayRef keep, const std::optional<at::Tensor>& protect) {
  TORCH_CHECK(scores.dim() == 1, "scores must have shape (T,), got ", scores.sizes());
  TORCH_CHECK(is_float(scores), "scores must be float32/float16/bfloat16/float64, got ", scores.scalar_type());
  check_cu_seqlens(cu_seqlens, scores.device());
  const int64_t B = cu_seqlens.numel() - 1;
  TORCH_CHECK(int64_t(keep.size()) == B, "keep must hold one count per image (", B, "), got ", keep.size());
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(keep[b] >= 0, "keep[", b, "]=", keep[b], " must be >= 0");
  if (protect.has_value()) {
    TORCH_CHECK(protect->dim() == 1 && protect->size(0) == scores.size(0), "protect must have shape (T,) = (",
                scores.size(0), ",), got ", protect->sizes());
    TORCH_CHECK(protect->scalar_type() == at::kBool, "protect must be bool, got ", protect->scalar_type());
    TORCH_CHECK(protect->device() == scores.device(), "protect must be on the device of scores");
  }
  return read_cu_seqlens(cu_seqlens, scores.size(0), 0);
}

void check_merge_nearest_inputs(const at::Tensor& hidden, const at::Tensor& keys, const at::Tensor& kept,
                                const at::Tensor& dropped, const at::Tensor& kept_cu, const at::Tensor& dropped_cu,
                                const std::optional<at::Tensor>& sizes) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must have shape (T, C), got ", hidden.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.size(0) == hidden.size(0), "keys must have shape (T, Ck) with T = ",
              hidden.size(0), ", got ", keys.sizes());
  TORCH_CHECK(is_float(hidden) && is_float(keys), "hidden and keys must be float32/float16/bfloat16/float64, got ",
              hidden.scalar_type(), " and ", keys.scalar_type());
  TORCH_CHECK(kept.dim() == 1 && kept.scalar_type() == at::kLong, "kept must be an int64 (K,) tensor, got ",
              kept.scalar_type(), " of shape ", kept.sizes());
  TORCH_CHECK(dropped.dim() == 1 && dropped.scalar_type() == at::kLong, "dropped must be an int64 (M,) tensor, got ",
              dropped.scalar_type(), " of shape ", dropped.sizes());
  check_cu_seqlens(kept_cu, hidden.device());
  check_cu_seqlens(dropped_cu, hidden.device());
  TORCH_CHECK(kept_cu.numel() == dropped_cu.numel(), "kept_cu and dropped_cu must both have shape (B + 1,), got ",
              kept_cu.sizes(), " and ", dropped_cu.sizes());
  TORCH_CHECK(keys.device() == hidden.device() && kept.device() == hidden.device() &&
                  dropped.device() == hidden.device(),
              "hidden, keys, kept and dropped must be on one device");
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->dim() == 1 && sizes->size(0) == hidden.size(0), "sizes must have shape (T,) = (",
                hidden.size(0), ",), got ", sizes->sizes());
    TORCH_CHECK(is_float(*sizes), "sizes must be float32/float16/bfloat16/float64, got ", sizes->scalar_type());
    TORCH_CHECK(sizes->device() == hidden.device(), "sizes must be on the device of hidden");
  }
}

std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts) {
  std::vector<int64_t> offsets(counts.size() + 1, 0);
  for (size_t b = 0; b < counts.size(); ++b) offsets[b + 1] = offsets[b] + counts[b];
  return offsets;
}

at::Tensor keep_offsets(at::IntArrayRef keep) {
  at::Tensor offsets = at::empty({int64_t(keep.size()) + 1}, at::kLong);
  int64_t* o = offsets.data_ptr<int64_t>();
  o[0] = 0;
  for (size_t b = 0; b < keep.size(); ++b) o[b + 1] = o[b] + keep[b];
  return offsets;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_cpu_checked(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    double scale, bool has_cls, bool semantic) {
  check_scale(scale);
  check_flow_scores_inputs(q_relay, k, v, prev, has_cls);
  return flow_scores_cpu(q_relay, k, v, prev, scale, has_cls, semantic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_cpu_checked(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, int64_t keep, bool has_cls) {
  check_select_gather_inputs(hidden, cum, index_map, keep, has_cls);
  return select_gather_cpu(hidden, cum, index_map, keep, has_cls);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_varlen_cpu_checked(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& prev, double scale, bool has_cls, bool semantic) {
  check_scale(scale);
  check_flow_scores_varlen_inputs(q_relay, k, v, cu_seqlens, prev, has_cls);
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens, k.size(0), has_cls ? 2 : 1);
  return flow_scores_varlen_cpu(q_relay, k, v, cu, prev, scale, has_cls, semantic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_gather_varlen_cpu_checked(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, const at::Tensor& cu_seqlens,
    at::IntArrayRef keep, bool has_cls) {
  check_select_gather_varlen_inputs(hidden, cum, index_map, cu_seqlens, keep, has_cls);
  const std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens, hidden.size(0), has_cls ? 2 : 1);
  check_keep_fits(cu, keep);
  auto [hidden_out, cum_out, index_out] = select_gather_varlen_cpu(hidden, cum, index_map, cu, keep, has_cls);
  return {hidden_out, cum_out, index_out, keep_offsets(keep).to(cu_seqlens.scalar_type())};
}

at::Tensor attention_scores_cpu_checked(const at::Tensor& q, const at::Tensor& k, double scale,
                                      const std::optional<at::Tensor>& key_mask, int64_t span_start, int64_t span_end) {
  check_scale(scale);
  check_attention_scores_inputs(q, k, key_mask, span_start, span_end);
  return attention_scores_cpu(q, k, scale, key_mask, span_start, span_end);
}

at::Tensor text_guided_scores_cpu_checked(const at::Tensor& q_relay, const at::Tensor& v_relay, const at::Tensor& k,
                                          const at::Tensor& v, at::IntArrayRef segments, double scale) {
  check_scale(scale);
  check_text_guided_scores_inputs(q_relay, v_relay, k, v, segments);
  return text_guided_scores_cpu(q_relay, v_relay, k, v, segments, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_select_cpu_checked(
    const at::Tensor& scores, const at::Tensor& cu_seqlens, at::IntArrayRef keep,
    const std::optional<at::Tensor>& protect) {
  const std::vector<int64_t> cu = check_topk_select_inputs(scores, cu_seqlens, keep, protect);
  return topk_select_cpu(scores, cu, keep, protect, cu_seqlens.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> merge_nearest_cpu_checked(const at::Tensor& hidden, const at::Tensor& keys,
                                                             const at::Tensor& kept, const at::Tensor& dropped,
                                                             const at::Tensor& kept_cu, const at::Tensor& dropped_cu,
                                                             const std::optional<at::Tensor>& sizes) {
  check_merge_nearest_inputs(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes);
  return merge_nearest_cpu(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes);
}

}  // namespace

}  // namespace flowcut

TORCH_LIBRARY(flowcut, m) {
  m.set_python_module("flowcut_kernels.ops.native");
  m.def(
      "native_flow_scores(Tensor q_relay, Tensor k, Tensor v, Tensor? prev, float scale, bool has_cls, "
      "bool semantic) -> (Tensor cum, Tensor entropy, Tensor attn)");
  m.def(
      "native_select_gather(Tensor hidden, Tensor cum, Tensor index_map, int keep, bool has_cls) "
      "-> (Tensor hidden_out, Tensor cum_out, Tensor index_out)");
  m.def(
      "native_flow_scores_varlen(Tensor q_relay, Tensor k, Tensor v, Tensor cu_seqlens, Tensor? prev, float scale, "
      "bool has_cls, bool semantic) -> (Tensor cum, Tensor entropy, Tensor attn)");
  m.def(
      "native_select_gather_varlen(Tensor hidden, Tensor cum, Tensor index_map, Tensor cu_seqlens, int[] keep, "
      "bool has_cls) -> (Tensor hidden_out, Tensor cum_out, Tensor index_out, Tensor cu_seqlens_out)");
  // The generic primitives (flowcut_kernels/ops/reference.py, "Generic primitives").
  m.def(
      "native_attention_scores(Tensor q, Tensor k, float scale, Tensor? key_mask, int span_start, int span_end) "
      "-> Tensor");
  m.def(
      "native_text_guided_scores(Tensor q_relay, Tensor v_relay, Tensor k, Tensor v, int[] segments, float scale) "
      "-> Tensor");
  m.def(
      "native_topk_select(Tensor scores, Tensor cu_seqlens, int[] keep, Tensor? protect) "
      "-> (Tensor kept, Tensor dropped, Tensor kept_cu, Tensor dropped_cu)");
  m.def(
      "native_merge_nearest(Tensor hidden, Tensor keys, Tensor kept, Tensor dropped, Tensor kept_cu, "
      "Tensor dropped_cu, Tensor? sizes) -> (Tensor merged, Tensor sizes_out)");
}

TORCH_LIBRARY_IMPL(flowcut, CPU, m) {
  m.impl("native_flow_scores", &flowcut::flow_scores_cpu_checked);
  m.impl("native_select_gather", &flowcut::select_gather_cpu_checked);
  m.impl("native_flow_scores_varlen", &flowcut::flow_scores_varlen_cpu_checked);
  m.impl("native_select_gather_varlen", &flowcut::select_gather_varlen_cpu_checked);
  m.impl("native_attention_scores", &flowcut::attention_scores_cpu_checked);
  m.impl("native_text_guided_scores", &flowcut::text_guided_scores_cpu_checked);
  m.impl("native_topk_select", &flowcut::topk_select_cpu_checked);
  m.impl("native_merge_nearest", &flowcut::merge_nearest_cpu_checked);
}
