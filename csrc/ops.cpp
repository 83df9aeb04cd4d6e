// The native ops' schemas (torch.ops.flowcut.native_flow_scores / native_select_gather), their input
// checks, and the CPU implementations. cuda_binding.cpp adds the CUDA ones; flowcut_kernels/ops/native.py
// registers the fake (meta) implementations.
//
// TORCH_LIBRARY (this library defines the two native_* schemas) coexists with the Python custom_ops of the
// same namespace (flow_scores, select_gather, prune_count, the Triton ops): those are fragments, which
// may join a namespace that one TORCH_LIBRARY owns, in either load order (checked when this was written).
// The fake implementations live in flowcut_kernels.ops.native, named below so that FakeTensor tracing of
// these ops without that import says where to find them.

#include "ops.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "flowcut_cpu.h"

namespace flowcut {

namespace {

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
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
}

TORCH_LIBRARY_IMPL(flowcut, CPU, m) {
  m.impl("native_flow_scores", &flowcut::flow_scores_cpu_checked);
  m.impl("native_select_gather", &flowcut::select_gather_cpu_checked);
}
