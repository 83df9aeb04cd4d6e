// C++ CPU kernels of the FlowCut ops (docs/semantics.md), dense and packed (varlen) batches, behind the ATen
// interface the op registration uses.
// Shapes: B images, H heads, S tokens (relay row first when has_cls), D head dim, C hidden size,
// N candidates (S - 1 with a CLS token, S without); a packed batch holds its images' rows along one axis of
// T rows (image b: rows cu[b] .. cu[b + 1]) and their candidates along one of T_c = T - B * has_cls.
// Inputs are checked by ops.cpp (cu: host offsets, 0 = cu[0] < ... < cu[B] = T, every image with a candidate).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace flowcut {

// q_relay (B, H, D), k and v (B, H, S, D): float16, bfloat16, float32 or float64 (k and v alike), any strides;
// prev (B, N) float32 or none. Returns cum (B, N), entropy (B,), attn (B, N), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_cpu(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    double scale, bool has_cls, bool semantic);

// The packed form: k and v (T, H, D) any strides, prev (T_c,) float32 or none.
// Returns cum (T_c,), entropy (B,), attn (T_c,), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_varlen_cpu(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& cu,
    const std::optional<at::Tensor>& prev, double scale, bool has_cls, bool semantic);

// hidden (B, S, C) any dtype and strides, cum (B, N) float32, index_map (B, N) int64, 1 <= keep <= S.
// Returns hidden_out (B, keep, C), cum_out (B, K), index_out (B, K) with K = keep - has_cls.
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_cpu(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, int64_t keep, bool has_cls);

// The packed form: hidden (T, C), cum (T_c,) float32, index_map (T_c,) int64, 1 <= keep[b] <= S_b.
// Returns hidden_out (sum keep, C), cum_out and index_out (sum K_b,), image after image.
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_varlen_cpu(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, const std::vector<int64_t>& cu,
    at::IntArrayRef keep, bool has_cls);

}  // namespace flowcut
