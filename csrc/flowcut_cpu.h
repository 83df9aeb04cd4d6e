// C++ CPU kernels of the two FlowCut ops (SPEC.md), behind the ATen interface the op registration uses.
// Shapes: B images, H heads, S tokens (relay row first when has_cls), D head dim, C hidden size,
// N candidates (S - 1 with a CLS token, S without). Inputs are checked by ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <tuple>

namespace flowcut {

// q_relay (B, H, D), k and v (B, H, S, D): float16, bfloat16, float32 or float64 (k and v alike), any strides;
// prev (B, N) float32 or none. Returns cum (B, N), entropy (B,), attn (B, N), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_cpu(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    double scale, bool has_cls, bool semantic);

// hidden (B, S, C) any dtype and strides, cum (B, N) float32, index_map (B, N) int64, 1 <= keep <= S.
// Returns hidden_out (B, keep, C), cum_out (B, K), index_out (B, K) with K = keep - has_cls.
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_cpu(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, int64_t keep, bool has_cls);

}  // namespace flowcut
