// CUDA implementations of torch.ops.flowcut.native_flow_scores / native_select_gather: check the inputs,
// allocate the outputs (and flow_scores' workspace) from torch's caching allocator, and call the
// torch-free launchers of flowcut_cuda.h on torch's current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "flowcut_cuda.h"
#include "ops.h"

namespace flowcut {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kFloat: return cuda::DType::kFloat32;
    default: TORCH_CHECK(false, "flowcut native CUDA ops: unsupported dtype ", t.scalar_type());
  }
}

void check_launch(const std::string& error) { TORCH_CHECK(error.empty(), "flowcut native CUDA kernel: ", error); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_cuda(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    double scale, bool has_cls, bool semantic) {
  check_flow_scores_inputs(q_relay, k, v, prev, has_cls);
  const c10::cuda::CUDAGuard guard(k.device());
  cuda::FlowScoresArgs a;
  a.B = k.size(0), a.H = k.size(1), a.S = k.size(2), a.D = k.size(3);
  const int64_t n = a.S - (has_cls ? 1 : 0);
  a.q = q_relay.const_data_ptr(), a.q_dtype = dtype_of(q_relay);  // any float dtype, read as is
  for (int i = 0; i < 3; ++i) a.q_stride[i] = q_relay.stride(i);
  a.k = k.const_data_ptr(), a.v = v.const_data_ptr(), a.kv_dtype = dtype_of(k);
  for (int i = 0; i < 4; ++i) a.k_stride[i] = k.stride(i), a.v_stride[i] = v.stride(i);
  if (prev.has_value()) {
    a.prev = prev->const_data_ptr<float>();
    a.prev_stride[0] = prev->stride(0), a.prev_stride[1] = prev->stride(1);
  }
  a.scale = float(scale), a.has_cls = has_cls, a.semantic = semantic;
  const auto opts = k.options().dtype(at::kFloat);
  at::Tensor cum = at::empty({a.B, n}, opts), entropy = at::empty({a.B}, opts), attn = at::empty({a.B, n}, opts);
  a.cum = cum.data_ptr<float>(), a.entropy = entropy.data_ptr<float>(), a.attn = attn.data_ptr<float>();
  const size_t bytes = cuda::flow_scores_workspace_bytes(a);
  TORCH_CHECK(bytes > 0, "flowcut native flow_scores: no launch plan for H*D = ", a.H * a.D, " on this GPU");
  at::Tensor workspace = at::empty({int64_t(bytes)}, k.options().dtype(at::kByte));
  check_launch(cuda::launch_flow_scores(a, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
  return {cum, entropy, attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_cuda(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, int64_t keep, bool has_cls) {
  check_select_gather_inputs(hidden, cum, index_map, keep, has_cls);
  const c10::cuda::CUDAGuard guard(hidden.device());
  cuda::SelectGatherArgs a;
  a.B = hidden.size(0), a.S = hidden.size(1), a.C = hidden.size(2), a.keep = keep, a.has_cls = has_cls;
  const int64_t n_keep = keep - (has_cls ? 1 : 0);
  a.hidden = hidden.const_data_ptr(), a.elem_size = hidden.element_size();
  for (int i = 0; i < 3; ++i) a.hidden_stride[i] = hidden.stride(i);
  a.cum = cum.const_data_ptr<float>(), a.cum_stride[0] = cum.stride(0), a.cum_stride[1] = cum.stride(1);
  a.index_map = index_map.const_data_ptr<int64_t>();
  a.index_stride[0] = index_map.stride(0), a.index_stride[1] = index_map.stride(1);
  at::Tensor hidden_out = at::empty({a.B, keep, a.C}, hidden.options());
  at::Tensor cum_out = at::empty({a.B, n_keep}, cum.options());
  at::Tensor index_out = at::empty({a.B, n_keep}, index_map.options());
  a.hidden_out = hidden_out.data_ptr(), a.cum_out = cum_out.data_ptr<float>();
  a.index_out = index_out.data_ptr<int64_t>();
  check_launch(cuda::launch_select_gather(a, c10::cuda::getCurrentCUDAStream()));
  return {hidden_out, cum_out, index_out};
}

}  // namespace
}  // namespace flowcut

TORCH_LIBRARY_IMPL(flowcut, CUDA, m) {
  m.impl("native_flow_scores", &flowcut::flow_scores_cuda);
  m.impl("native_select_gather", &flowcut::select_gather_cuda);
}
