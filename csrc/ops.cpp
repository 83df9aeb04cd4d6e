// The native ops' schemas (torch.ops.flowcut.native_flow_scores / native_select_gather and their packed forms
// native_flow_scores_varlen / native_select_gather_varlen), their input checks, and the CPU implementations.
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

#include <vector>

#include "flowcut_cpu.h"

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

// cu_seqlens' values on the host (a copy of B + 1 integers from a GPU), checked: 0, then increasing by at least
// min_len per image, ending at rows. The kernels index by them.
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu_seqlens, int64_t rows, int64_t min_len) {
  const at::Tensor host = cu_seqlens.to(at::Device(at::kCPU), at::kLong).contiguous();
  const int64_t* values = host.const_data_ptr<int64_t>();
  std::vector<int64_t> cu(values, values + host.numel());
  TORCH_CHECK(cu[0] == 0, "cu_seqlens must start at 0, got ", cu[0]);
  for (size_t b = 0; b + 1 < cu.size(); ++b)
    TORCH_CHECK(cu[b + 1] - cu[b] >= min_len, "cu_seqlens must increase by at least ", min_len,
                " per image (each image needs a candidate), got ", cu[b + 1] - cu[b], " rows for image ", b);
  TORCH_CHECK(cu.back() == rows, "cu_seqlens must end at the row count ", rows, ", got ", cu.back());
  return cu;
}

}  // namespace

void check_flow_scores_inputs(const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& prev, bool has_cls) {
  TORCH_CHECK(k.dim() == 4, "k must have shape (B, H, S, D), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(is_float(k) && v.scalar_type() == k.scalar_type(),
              "k and v must share one dtype of float32/float16/bfloat16/float64, got ", k.scalar_type(), " and ",
              v.scalar_type());
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

std::vector<int64_t> check_flow_scores_varlen_inputs(const at::Tensor& q_relay, const at::Tensor& k,
                                                     const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                     const std::optional<at::Tensor>& prev, bool has_cls) {
  TORCH_CHECK(k.dim() == 3, "k must have shape (T, H, D), got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(is_float(k) && v.scalar_type() == k.scalar_type(),
              "k and v must share one dtype of float32/float16/bfloat16/float64, got ", k.scalar_type(), " and ",
              v.scalar_type());
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
  return read_cu_seqlens(cu_seqlens, k.size(0), first + 1);
}

std::vector<int64_t> check_select_gather_varlen_inputs(const at::Tensor& hidden, const at::Tensor& cum,
                                                       const at::Tensor& index_map, const at::Tensor& cu_seqlens,
                                                       at::IntArrayRef keep, bool has_cls) {
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
  std::vector<int64_t> cu = read_cu_seqlens(cu_seqlens, hidden.size(0), first + 1);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(keep[b] >= 1 && keep[b] <= cu[b + 1] - cu[b], "keep[", b, "]=", keep[b], " is out of range [1, S=",
                cu[b + 1] - cu[b], "]");
  return cu;
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
  const std::vector<int64_t> cu = check_flow_scores_varlen_inputs(q_relay, k, v, cu_seqlens, prev, has_cls);
  return flow_scores_varlen_cpu(q_relay, k, v, cu, prev, scale, has_cls, semantic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_gather_varlen_cpu_checked(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, const at::Tensor& cu_seqlens,
    at::IntArrayRef keep, bool has_cls) {
  const std::vector<int64_t> cu = check_select_gather_varlen_inputs(hidden, cum, index_map, cu_seqlens, keep, has_cls);
  auto [hidden_out, cum_out, index_out] = select_gather_varlen_cpu(hidden, cum, index_map, cu, keep, has_cls);
  return {hidden_out, cum_out, index_out, keep_offsets(keep).to(cu_seqlens.scalar_type())};
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
}

TORCH_LIBRARY_IMPL(flowcut, CPU, m) {
  m.impl("native_flow_scores", &flowcut::flow_scores_cpu_checked);
  m.impl("native_select_gather", &flowcut::select_gather_cpu_checked);
  m.impl("native_flow_scores_varlen", &flowcut::flow_scores_varlen_cpu_checked);
  m.impl("native_select_gather_varlen", &flowcut::select_gather_varlen_cpu_checked);
}
