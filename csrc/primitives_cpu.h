// C++ CPU kernels of the generic primitives (flowcut_kernels/ops/reference.py, "Generic primitives"), behind the
// ATen interface the op registration uses. Inputs are checked structurally by ops.cpp (dims, dtypes, devices,
// sizes); every input may have any strides and any float dtype; every reduction accumulates in double.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace flowcut {

// q (B, Hq, Q, D), k (B, Hkv, S, D) (query head h reads key head h / (Hq / Hkv)), key_mask (B, S) bool or none.
// Returns (B, span_end - span_start) float32: the mean over the Hq heads and Q rows of softmax over the unmasked
// keys of scale * q . k, columns span_start .. span_end.
at::Tensor attention_scores_cpu(const at::Tensor& q, const at::Tensor& k, double scale,
                                const std::optional<at::Tensor>& key_mask, int64_t span_start, int64_t span_end);

// q_relay (B, Hq, D), v_relay (B, Hkv, D), k and v (B, Hkv, S, D); segments G triples (b, start, end).
// Returns (sum (end - start),) float32, segment by segment: (rel + sem) * rho.
at::Tensor text_guided_scores_cpu(const at::Tensor& q_relay, const at::Tensor& v_relay, const at::Tensor& k,
                                  const at::Tensor& v, at::IntArrayRef segments, double scale);

// scores (T,), cu the checked host offsets (B + 1), keep B counts, protect (T,) bool or none. Returns kept and
// dropped int64 row indices (ascending within each image) and their offsets (B + 1,) in offsets_dtype.
// Checks keep[b] <= the unprotected rows of image b.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_select_cpu(const at::Tensor& scores,
                                                                           const std::vector<int64_t>& cu,
                                                                           at::IntArrayRef keep,
                                                                           const std::optional<at::Tensor>& protect,
                                                                           at::ScalarType offsets_dtype);

// hidden (T, C), keys (T, Ck), kept (K,), dropped (M,) int64 grouped by kept_cu / dropped_cu (B + 1,), sizes (T,)
// or none. Checks the values (offsets from 0 to K / M, not decreasing; indices in [0, T); an image with dropped
// rows keeps one). Returns merged (K, C) in hidden's dtype and sizes_out (K,) float32.
std::tuple<at::Tensor, at::Tensor> merge_nearest_cpu(const at::Tensor& hidden, const at::Tensor& keys,
                                                     const at::Tensor& kept, const at::Tensor& dropped,
                                                     const at::Tensor& kept_cu, const at::Tensor& dropped_cu,
                                                     const std::optional<at::Tensor>& sizes);

}  // namespace flowcut
