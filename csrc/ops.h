// Input checks shared by the CPU and CUDA implementations of the native ops (ops.cpp defines them).
// They guard direct torch.ops.flowcut.native_* calls; flowcut_kernels.ops checks its inputs before.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace flowcut {

// q_relay (B, H, D), k and v (B, H, S, D), prev (B, N) float32 or none; one device.
void check_flow_scores_inputs(const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& prev, bool has_cls);

// hidden (B, S, C), cum (B, N) float32, index_map (B, N) int64, 1 <= keep <= S; one device.
void check_select_gather_inputs(const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map,
                                int64_t keep, bool has_cls);

// The packed forms: q_relay (B, H, D), k and v (T, H, D), cu_seqlens (B + 1,) int32/int64, prev (T_c,) float32
// or none (T_c = T - B * has_cls); one device. Returns cu_seqlens' values, read on the host (a copy of B + 1
// integers from a GPU) and checked: 0, increasing, every image with a candidate, ending at T.
std::vector<int64_t> check_flow_scores_varlen_inputs(const at::Tensor& q_relay, const at::Tensor& k,
                                                     const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                     const std::optional<at::Tensor>& prev, bool has_cls);

// hidden (T, C), cum (T_c,) float32, index_map (T_c,) int64, cu_seqlens (B + 1,) int32/int64, keep B counts with
// 1 <= keep[b] <= S_b; one device. Returns cu_seqlens' values, read and checked alike.
std::vector<int64_t> check_select_gather_varlen_inputs(const at::Tensor& hidden, const at::Tensor& cum,
                                                       const at::Tensor& index_map, const at::Tensor& cu_seqlens,
                                                       at::IntArrayRef keep, bool has_cls);

// The output offsets of select_gather_varlen: 0, keep[0], keep[0] + keep[1], ..., as an int64 CPU tensor.
at::Tensor keep_offsets(at::IntArrayRef keep);

}  // namespace flowcut
