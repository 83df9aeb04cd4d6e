// CUDA implementations of torch.ops.flowcut.native_flow_scores / native_select_gather, their packed forms
// native_flow_scores_varlen / native_select_gather_varlen, and the generic primitives native_attention_scores /
// native_text_guided_scores / native_topk_select / native_merge_nearest: check the inputs, allocate the outputs (and
// the workspaces) from torch's caching allocator, and call the torch-free launchers of flowcut_cuda.h on torch's
// current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
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

// Host int64 values as a tensor on `device`: one asynchronous copy from pinned memory (the caching host allocator
// keeps the buffer until the copy has run).
at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  at::Tensor host = at::empty({int64_t(values.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return host.to(device, /*non_blocking=*/true);
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
  check_scale(scale);
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
  // No host read: the offsets stay on the device; the launch is sized by B and T (see flowcut_cuda.h).
  check_scale(scale);
  check_flow_scores_varlen_inputs(q_relay, k, v, cu_seqlens, prev, has_cls);
  const c10::cuda::CUDAGuard guard(k.device());
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();  // the kernel's, on the device
  cuda::FlowScoresArgs a;
  a.B = cu_seqlens.numel() - 1, a.H = k.size(1), a.D = k.size(2);
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
  const size_t bytes = cuda::select_gather_workspace_bytes(a);
  at::Tensor workspace = at::empty({int64_t(std::max<size_t>(bytes, 16))}, hidden.options().dtype(at::kByte));
  check_launch(cuda::launch_select_gather(a, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
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
  // No host read: the input offsets stay on the device, the keep counts arrive as host ints (they give the output
  // offsets and sizes); keep[b] <= S_b is left to the caller (flowcut_kernels.ops checks it; see flowcut_cuda.h).
  check_select_gather_varlen_inputs(hidden, cum, index_map, cu_seqlens, keep, has_cls);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();  // the kernel's, on the device
  const std::vector<int64_t> out_cu = offsets_of(std::vector<int64_t>(keep.begin(), keep.end()));
  const at::Tensor out_offsets = to_device(out_cu, hidden.device());
  cuda::SelectGatherArgs a;
  a.B = int64_t(keep.size()), a.C = hidden.size(1), a.has_cls = has_cls;
  a.cu_seqlens = offsets.const_data_ptr<int64_t>(), a.cu_seqlens_out = out_offsets.const_data_ptr<int64_t>();
  a.rows = hidden.size(0), a.rows_out = out_cu.back();
  a.hidden_stride[1] = hidden.stride(0), a.hidden_stride[2] = hidden.stride(1);  // image stride 0
  a.cum_stride[1] = cum.stride(0), a.index_stride[1] = index_map.stride(0);
  auto [hidden_out, cum_out, index_out] =
      run_select_gather(a, hidden, cum, index_map, a.rows_out, a.rows_out - a.B * (has_cls ? 1 : 0));
  return {hidden_out, cum_out, index_out, out_offsets.to(cu_seqlens.scalar_type())};
}

// --- Generic primitives ---------------------------------------------------------------------------------------

// A byte workspace of at least `bytes` (16-byte aligned, as every caching-allocator block is).
at::Tensor workspace_of(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(std::max<size_t>(bytes, 16))}, like.options().dtype(at::kByte));
}

at::Tensor attention_scores_cuda(const at::Tensor& q, const at::Tensor& k, double scale,
                                 const std::optional<at::Tensor>& key_mask, int64_t span_start, int64_t span_end) {
  check_scale(scale);
  check_attention_scores_inputs(q, k, key_mask, span_start, span_end);
  const c10::cuda::CUDAGuard guard(k.device());
  cuda::AttentionScoresArgs a;
  a.B = k.size(0), a.Hq = q.size(1), a.Hkv = k.size(1), a.Q = q.size(2), a.S = k.size(2), a.D = k.size(3);
  a.span_start = span_start, a.span_end = span_end;
  a.q = q.const_data_ptr(), a.q_dtype = dtype_of(q);
  a.k = k.const_data_ptr(), a.k_dtype = dtype_of(k);
  for (int i = 0; i < 4; ++i) a.q_stride[i] = q.stride(i), a.k_stride[i] = k.stride(i);
  if (key_mask.has_value()) {
    a.key_mask = reinterpret_cast<const uint8_t*>(key_mask->const_data_ptr<bool>());
    a.mask_stride[0] = key_mask->stride(0), a.mask_stride[1] = key_mask->stride(1);
  }
  a.scale = scale;
  at::Tensor out = at::empty({a.B, span_end - span_start}, k.options().dtype(at::kFloat));
  a.out = out.data_ptr<float>();
  size_t bytes = 0;
  check_launch(cuda::attention_scores_workspace(a, &bytes));
  at::Tensor workspace = workspace_of(bytes, k);
  check_launch(cuda::launch_attention_scores(a, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor text_guided_scores_cuda(const at::Tensor& q_relay, const at::Tensor& v_relay, const at::Tensor& k,
                                   const at::Tensor& v, at::IntArrayRef segments, double scale) {
  check_scale(scale);
  check_text_guided_scores_inputs(q_relay, v_relay, k, v, segments);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t G = int64_t(segments.size()) / 3;
  std::vector<int64_t> counts(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) counts[g] = segments[3 * g + 2] - segments[3 * g + 1];
  const std::vector<int64_t> off = offsets_of(counts);
  at::Tensor out = at::empty({off.back()}, k.options().dtype(at::kFloat));
  if (off.back() == 0) return out;
  // The segments (host ints) and their output offsets, to the device in one copy.
  std::vector<int64_t> meta(segments.begin(), segments.end());
  meta.insert(meta.end(), off.begin(), off.end());
  const at::Tensor meta_dev = to_device(meta, k.device());
  cuda::TextGuidedScoresArgs a;
  a.B = k.size(0), a.Hq = q_relay.size(1), a.Hkv = k.size(1), a.S = k.size(2), a.D = k.size(3);
  a.G = G, a.segments = meta_dev.const_data_ptr<int64_t>(), a.out_offsets = a.segments + 3 * G, a.total = off.back();
  a.q_relay = q_relay.const_data_ptr(), a.q_dtype = dtype_of(q_relay);
  a.v_relay = v_relay.const_data_ptr(), a.vt_dtype = dtype_of(v_relay);
  for (int i = 0; i < 3; ++i) a.q_stride[i] = q_relay.stride(i), a.vt_stride[i] = v_relay.stride(i);
  a.k = k.const_data_ptr(), a.k_dtype = dtype_of(k), a.v = v.const_data_ptr(), a.v_dtype = dtype_of(v);
  for (int i = 0; i < 4; ++i) a.k_stride[i] = k.stride(i), a.v_stride[i] = v.stride(i);
  a.scale = scale;
  a.out = out.data_ptr<float>();
  size_t bytes = 0;
  check_launch(cuda::text_guided_scores_workspace(a, &bytes));
  at::Tensor workspace = workspace_of(bytes, k);
  check_launch(cuda::launch_text_guided_scores(a, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_select_cuda(const at::Tensor& scores,
                                                                            const at::Tensor& cu_seqlens,
                                                                            at::IntArrayRef keep,
                                                                            const std::optional<at::Tensor>& protect) {
  // Host reads, each a small device-to-host copy (a synchronisation): the B + 1 offsets of cu_seqlens (checked),
  // and, with protect, the protected rows before each offset. The outputs' sizes depend on them.
  const std::vector<int64_t> cu = check_topk_select_inputs(scores, cu_seqlens, keep, protect);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t B = int64_t(keep.size());
  const at::Tensor offsets = cu_seqlens.to(at::kLong).contiguous();  // the kernel's, on the device
  std::vector<int64_t> protected_rows(static_cast<size_t>(B), 0);
  if (protect.has_value()) {
    const at::Tensor before = at::cat({at::zeros({1}, offsets.options()), protect->cumsum(0, at::kLong)});
    const at::Tensor at_offsets = before.index_select(0, offsets).to(at::Device(at::kCPU)).contiguous();
    const int64_t* p = at_offsets.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) protected_rows[b] = p[b + 1] - p[b];
  }
  std::vector<int64_t> n_kept(static_cast<size_t>(B)), n_dropped(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    TORCH_CHECK(keep[b] <= len - protected_rows[b], "keep[", b, "]=", keep[b], " exceeds the ",
                len - protected_rows[b], " unprotected rows of image ", b);
    n_kept[b] = keep[b] + protected_rows[b];
    n_dropped[b] = len - n_kept[b];
  }
  const std::vector<int64_t> kept_off = offsets_of(n_kept), dropped_off = offsets_of(n_dropped);
  // keep, then the two output offsets, to the device in one copy.
  std::vector<int64_t> meta(keep.begin(), keep.end());
  meta.insert(meta.end(), kept_off.begin(), kept_off.end());
  meta.insert(meta.end(), dropped_off.begin(), dropped_off.end());
  const at::Tensor meta_dev = to_device(meta, scores.device());
  const auto index_opts = scores.options().dtype(at::kLong);
  at::Tensor kept = at::empty({kept_off.back()}, index_opts), dropped = at::empty({dropped_off.back()}, index_opts);
  cuda::TopkSelectArgs a;
  a.B = B, a.cu_seqlens = offsets.const_data_ptr<int64_t>();
  a.keep = meta_dev.const_data_ptr<int64_t>(), a.kept_cu = a.keep + B, a.dropped_cu = a.kept_cu + B + 1;
  a.scores = scores.const_data_ptr(), a.scores_dtype = dtype_of(scores), a.scores_stride = scores.stride(0);
  if (protect.has_value()) {
    a.protect = reinterpret_cast<const uint8_t*>(protect->const_data_ptr<bool>());
    a.protect_stride = protect->stride(0);
  }
  a.kept = kept.data_ptr<int64_t>(), a.dropped = dropped.data_ptr<int64_t>();
  check_launch(cuda::launch_topk_select(a, c10::cuda::getCurrentCUDAStream()));
  const auto dtype = cu_seqlens.scalar_type();
  at::Tensor kept_cu = meta_dev.slice(0, B, 2 * B + 1).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor dropped_cu = meta_dev.slice(0, 2 * B + 1, 3 * B + 2).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  return {kept, dropped, kept_cu, dropped_cu};
}

std::tuple<at::Tensor, at::Tensor> merge_nearest_cuda(const at::Tensor& hidden, const at::Tensor& keys,
                                                      const at::Tensor& kept, const at::Tensor& dropped,
                                                      const at::Tensor& kept_cu, const at::Tensor& dropped_cu,
                                                      const std::optional<at::Tensor>& sizes) {
  // No host read: the offsets and indices stay on the device (the kernels never dereference an index outside
  // [0, T): see flowcut_cuda.h); the output sizes are kept's and hidden's.
  check_merge_nearest_inputs(hidden, keys, kept, dropped, kept_cu, dropped_cu, sizes);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor kc = kept_cu.to(at::kLong).contiguous(), dc = dropped_cu.to(at::kLong).contiguous();
  cuda::MergeNearestArgs a;
  a.T = hidden.size(0), a.C = hidden.size(1), a.Ck = keys.size(1), a.K = kept.size(0), a.M = dropped.size(0);
  a.B = kc.numel() - 1;
  a.hidden = hidden.const_data_ptr(), a.hidden_dtype = dtype_of(hidden);
  a.keys = keys.const_data_ptr(), a.keys_dtype = dtype_of(keys);
  for (int i = 0; i < 2; ++i) a.hidden_stride[i] = hidden.stride(i), a.keys_stride[i] = keys.stride(i);
  if (sizes.has_value()) {
    a.sizes = sizes->const_data_ptr(), a.sizes_dtype = dtype_of(*sizes), a.sizes_stride = sizes->stride(0);
  }
  a.kept = kept.const_data_ptr<int64_t>(), a.kept_stride = kept.stride(0);
  a.dropped = dropped.const_data_ptr<int64_t>(), a.dropped_stride = dropped.stride(0);
  a.kept_cu = kc.const_data_ptr<int64_t>(), a.dropped_cu = dc.const_data_ptr<int64_t>();
  at::Tensor merged = at::empty({a.K, a.C}, hidden.options());
  at::Tensor sizes_out = at::empty({a.K}, hidden.options().dtype(at::kFloat));
  a.merged = merged.data_ptr(), a.sizes_out = sizes_out.data_ptr<float>();
  size_t bytes = 0;
  check_launch(cuda::merge_nearest_workspace(a, &bytes));
  at::Tensor workspace = workspace_of(bytes, hidden);
  check_launch(cuda::launch_merge_nearest(a, workspace.data_ptr(), bytes, c10::cuda::getCurrentCUDAStream()));
  return {merged, sizes_out};
}

}  // namespace
}  // namespace flowcut

TORCH_LIBRARY_IMPL(flowcut, CUDA, m) {
  m.impl("native_flow_scores", &flowcut::flow_scores_cuda);
  m.impl("native_select_gather", &flowcut::select_gather_cuda);
  m.impl("native_flow_scores_varlen", &flowcut::flow_scores_varlen_cuda);
  m.impl("native_select_gather_varlen", &flowcut::select_gather_varlen_cuda);
  m.impl("native_attention_scores", &flowcut::attention_scores_cuda);
  m.impl("native_text_guided_scores", &flowcut::text_guided_scores_cuda);
  m.impl("native_topk_select", &flowcut::topk_select_cuda);
  m.impl("native_merge_nearest", &flowcut::merge_nearest_cuda);
}
