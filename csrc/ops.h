// Input checks shared by the CPU and CUDA implementations of the native ops (ops.cpp defines them).
// They guard direct torch.ops.flowcut.native_* calls; flowcut_kernels.ops checks its inputs before.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace flowcut {

// q_relay (B, H, D), k and v (B, H, S, D), prev (B, N) float32 or none; one device.
// scale (flow_scores, attention_scores, text_guided_scores): finite and > 0, the attention scale of a model.
void check_scale(double scale);

void check_flow_scores_inputs(const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& prev, bool has_cls);

// hidden (B, S, C), cum (B, N) float32, index_map (B, N) int64, 1 <= keep <= S; one device.
void check_select_gather_inputs(const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map,
                                int64_t keep, bool has_cls);

// The packed forms: q_relay (B, H, D), k and v (T, H, D), cu_seqlens (B + 1,) int32/int64, prev (T_c,) float32
// or none (T_c = T - B * has_cls), T >= B * (has_cls + 1); one device. Structural: cu_seqlens' values are not read
// (the CUDA kernels take them on the device; the CPU implementations read and check them with read_cu_seqlens).
void check_flow_scores_varlen_inputs(const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_seqlens, const std::optional<at::Tensor>& prev,
                                     bool has_cls);

// hidden (T, C), cum (T_c,) float32, index_map (T_c,) int64, cu_seqlens (B + 1,) int32/int64, keep B counts >= 1
// summing to at most T; one device. Structural, as above; keep[b] <= S_b needs the offsets: check_keep_fits.
void check_select_gather_varlen_inputs(const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map,
                                       const at::Tensor& cu_seqlens, at::IntArrayRef keep, bool has_cls);

// cu_seqlens' values on the host (a copy of B + 1 integers from a GPU), checked: 0, then increasing by at least
// min_len per image, ending at rows. For the CPU implementations, which index by them.
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu_seqlens, int64_t rows, int64_t min_len);

// keep[b] <= S_b for the offsets cu (read_cu_seqlens').
void check_keep_fits(const std::vector<int64_t>& cu, at::IntArrayRef keep);

// The output offsets of select_gather_varlen: 0, keep[0], keep[0] + keep[1], ..., as an int64 CPU tensor.
at::Tensor keep_offsets(at::IntArrayRef keep);

// --- Generic primitives (structural checks: dims, dtypes, devices, sizes) ----------------------------------

// q (B, Hq, Q, D) and k (B, Hkv, S, D) float, Hq a multiple of Hkv >= 1, Q >= 1; key_mask (B, S) bool or none;
// 0 <= span_start <= span_end <= S; one device.
void check_attention_scores_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& key_mask,
                                   int64_t span_start, int64_t span_end);

// q_relay (B, Hq, D), v_relay (B, Hkv, D), k and v (B, Hkv, S, D), all float, Hq a multiple of Hkv >= 1; segments
// G triples (b, start, end) with 0 <= b < B, 0 <= start <= end <= S; one device.
void check_text_guided_scores_inputs(const at::Tensor& q_relay, const at::Tensor& v_relay, const at::Tensor& k,
                                     const at::Tensor& v, at::IntArrayRef segments);

// scores (T,) float, cu_seqlens (B + 1,) int32/int64, keep B counts >= 0, protect (T,) bool or none; one device.
// Returns cu_seqlens' values, read on the host (a copy of B + 1 integers from a GPU) and checked: 0, not
// decreasing (empty images are allowed), ending at T. keep[b] <= the unprotected rows of image b is checked by the
// implementations, which count them.
std::vector<int64_t> check_topk_select_inputs(const at::Tensor& scores, const at::Tensor& cu_seqlens,
                                              at::IntArrayRef keep, const std::optional<at::Tensor>& protect);

// hidden (T, C) and keys (T, Ck) float, kept (K,) and dropped (M,) int64, kept_cu and dropped_cu (B + 1,)
// int32/int64 with B >= 1, sizes (T,) float or none; one device. The values (offsets, indices) are checked by the
// CPU implementation; the CUDA one reads none of them on the host (see cuda_binding.cpp).
void check_merge_nearest_inputs(const at::Tensor& hidden, const at::Tensor& keys, const at::Tensor& kept,
                                const at::Tensor& dropped, const at::Tensor& kept_cu, const at::Tensor& dropped_cu,
                                const std::optional<at::Tensor>& sizes);

// The offsets 0, n[0], n[0] + n[1], ... (B + 1 values) of per-image counts n.
std::vector<int64_t> offsets_of(const std::vector<int64_t>& counts);

}  // namespace flowcut
