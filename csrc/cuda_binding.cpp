// CUDA implementations of torch.ops.flowcut.native_flow_scores / native_select_gather and their packed forms
// native_flow_scores_varlen / native_select_gather_varlen: check the inputs, allocate the outputs (and
// flow_scores' workspace) from torch's caching allocator, and call the torch-free launchers of flowcut_cuda.h on
// torch's current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

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

// The longest image of offsets cu.
int64_t longest(const std::vector<int64_t>& cu) {
  int64_t most = 0;
  for (size_t b = 0; b + 1 < cu.size(); ++b) most = std::max(most, cu[b + 1] - cu[b]);
  return most;
}

// flow_scores with a's shape, packing and k, v, prev strides set: fills in the rest, allocates the outputs
// (`candidates` scores, packed) and the workspace, and launches.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_flow_scores(
    cuda::FlowScoresArgs& a, const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& prev, int64_t candidates, double scale, bool has_cls, bool semantic) {
  a.q = q_relay.const_data_ptr(), a.q_dtype = dtype_of(q_relay);  // any float dtype, read as is
  for (int i = 0; i < 3; ++i) a.q_stride[i] = q_relay.stride(i);
  a.k = k.const_data_ptr(), a.v = v.const_data_ptr(), a.kv_dtype = dtype_of(k);
  if (prev.has_value()) a.prev = prev->const_data_ptr<float>();
  a.scale = float(scale), a.has_cls = has_cls, a.semantic = semantic;
  const auto opts = k.options().dtype(at::kFloat);
  at::Tensor cum = at::empty({candidates}, opts), entropy = at::empty({a.B}, opts);
  at::Tensor attn = at::empty({candidates}, opts);
  a.cum = cum.data_ptr<float>(), a.entropy = entropy.data_ptr<float>(), a.attn = attn.data_ptr<float>();
  const size_t bytes = cuda::flow_scores_workspace_bytes(a);
  TORCH_CHECK(bytes > 0, "flowcut native flow_scores: no launch plan for H*D = ", a.H * a.D, " on this GPU");
  at::Tensor workspace = at::empty({int64_t(bytes)}, k.options().dtype(at::kByte));
  check_launch(cuda::launch_flow_scores(a, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
  return {cum, entropy, attn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_cuda(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    double scale, bool has_cls, bool semantic) {
  check_flow_scores_inputs(q_relay, k, v, prev, has_cls);
  const c10::cuda::CUDAGuard guard(k.device());
  cuda::FlowScoresArgs a;
  a.B = k.size(0), a.H = k.size(1), a.S = k.size(2), a.D = k.size(3);
  const int64_t n = a.S - (has_cls ? 1 : 0);
  for (int i = 0; i < 4; ++i) a.k_stride[i] = k.stride(i), a.v_stride[i] = v.stride(i);
  if (prev.has_value()) a.prev_stride[0] = prev->stride(0), a.prev_stride[1] = prev->stride(1);
  auto [cum, entropy, attn] = run_flow_scores(a, q_relay, k, v, prev, a.B * n, scale, has_cls, semantic);
  return {cum.view({a.B, n}), entropy, attn.view({a.B, n})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_varlen_cuda(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    const std::optional<at::Tensor>& prev, double scale, bool has_cls, bool semantic) {
  // The offsets are read on the host once (B + 1 integers, one copy): checked, and the longest image sizes the grid.
  const std::vector<int64_t> cu = check_flow_scores_varlen_inputs(q_relay, k, v, cu_seqlens, prev, has_cls);
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();  // the kernel's, on the device
  cuda::FlowScoresArgs a;
  a.B = int64_t(cu.size()) - 1, a.H = k.size(1), a.S = longest(cu), a.D = k.size(2);
  a.cu_seqlens = offsets.const_data_ptr<int64_t>(), a.rows = k.size(0);
  a.k_stride[1] = k.stride(1), a.k_stride[2] = k.stride(0), a.k_stride[3] = k.stride(2);  // image stride 0
  a.v_stride[1] = v.stride(1), a.v_stride[2] = v.stride(0), a.v_stride[3] = v.stride(2);
  if (prev.has_value()) a.prev_stride[1] = prev->stride(0);
  return run_flow_scores(a, q_relay, k, v, prev, a.rows - a.B * (has_cls ? 1 : 0), scale, has_cls, semantic);
}

// select_gather with a's shape, packing and strides set: fills in the rest, allocates the outputs (`rows_out`
// hidden rows, `kept` candidates, packed) and launches.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_select_gather(
    cuda::SelectGatherArgs& a, const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map,
    int64_t rows_out, int64_t kept) {
  a.hidden = hidden.const_data_ptr(), a.elem_size = hidden.element_size();
  a.cum = cum.const_data_ptr<float>(), a.index_map = index_map.const_data_ptr<int64_t>();
  at::Tensor hidden_out = at::empty({rows_out, a.C}, hidden.options());
  at::Tensor cum_out = at::empty({kept}, cum.options());
  at::Tensor index_out = at::empty({kept}, index_map.options());
  a.hidden_out = hidden_out.data_ptr(), a.cum_out = cum_out.data_ptr<float>();
  a.index_out = index_out.data_ptr<int64_t>();
  check_launch(cuda::launch_select_gather(a, c10::cuda::getCurrentCUDAStream()));
  return {hidden_out, cum_out, index_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_cuda(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, int64_t keep, bool has_cls) {
  check_select_gather_inputs(hidden, cum, index_map, keep, has_cls);
  const c10::cuda::CUDAGuard guard(hidden.device());
  cuda::SelectGatherArgs a;
  a.B = hidden.size(0), a.S = hidden.size(1), a.C = hidden.size(2), a.keep = keep, a.has_cls = has_cls;
  const int64_t n_keep = keep - (has_cls ? 1 : 0);
  for (int i = 0; i < 3; ++i) a.hidden_stride[i] = hidden.stride(i);
  a.cum_stride[0] = cum.stride(0), a.cum_stride[1] = cum.stride(1);
  a.index_stride[0] = index_map.stride(0), a.index_stride[1] = index_map.stride(1);
  auto [hidden_out, cum_out, index_out] = run_select_gather(a, hidden, cum, index_map, a.B * keep, a.B * n_keep);
  return {hidden_out.view({a.B, keep, a.C}), cum_out.view({a.B, n_keep}), index_out.view({a.B, n_keep})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_gather_varlen_cuda(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, const at::Tensor& cu_seqlens,
    at::IntArrayRef keep, bool has_cls) {
  // The offsets are read on the host once (B + 1 integers, one copy): checked against keep, and the longest image
  // bounds the candidates per block; the keep counts arrive as host ints.
  const std::vector<int64_t> cu = check_select_gather_varlen_inputs(hidden, cum, index_map, cu_seqlens, keep, has_cls);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();  // the kernel's, on the device
  const at::Tensor out_offsets = keep_offsets(keep).to(hidden.device());
  cuda::SelectGatherArgs a;
  a.B = int64_t(keep.size()), a.S = longest(cu), a.C = hidden.size(1), a.has_cls = has_cls;
  a.keep = *std::max_element(keep.begin(), keep.end());
  a.cu_seqlens = offsets.const_data_ptr<int64_t>(), a.cu_seqlens_out = out_offsets.const_data_ptr<int64_t>();
  a.hidden_stride[1] = hidden.stride(0), a.hidden_stride[2] = hidden.stride(1);  // image stride 0
  a.cum_stride[1] = cum.stride(0), a.index_stride[1] = index_map.stride(0);
  const int64_t rows_out = std::accumulate(keep.begin(), keep.end(), int64_t{0});
  auto [hidden_out, cum_out, index_out] =
      run_select_gather(a, hidden, cum, index_map, rows_out, rows_out - a.B * (has_cls ? 1 : 0));
  return {hidden_out, cum_out, index_out, out_offsets.to(cu_seqlens.scalar_type())};
}

}  // namespace
}  // namespace flowcut

TORCH_LIBRARY_IMPL(flowcut, CUDA, m) {
  m.impl("native_flow_scores", &flowcut::flow_scores_cuda);
  m.impl("native_select_gather", &flowcut::select_gather_cuda);
  m.impl("native_flow_scores_varlen", &flowcut::flow_scores_varlen_cuda);
  m.impl("native_select_gather_varlen", &flowcut::select_gather_varlen_cuda);
}
