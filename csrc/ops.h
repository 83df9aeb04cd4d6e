// Input checks shared by the CPU and CUDA implementations of the native ops (ops.cpp defines them).
// They guard direct torch.ops.flowcut.native_* calls; flowcut_kernels.ops checks its inputs before.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace flowcut {

// q_relay (B, H, D), k and v (B, H, S, D), prev (B, N) float32 or none; one device.
void check_flow_scores_inputs(const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& prev, bool has_cls);

// hidden (B, S, C), cum (B, N) float32, index_map (B, N) int64, 1 <= keep <= S; one device.
void check_select_gather_inputs(const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map,
                                int64_t keep, bool has_cls);

}  // namespace flowcut
