// CUDA kernels of the two FlowCut ops (docs/semantics.md) and of the generic primitives (attention_scores,
// text_guided_scores, topk_select, merge_nearest), behind a launcher interface free of torch headers:
// raw pointers, sizes, strides in elements, and a cudaStream_t. Used by cuda_binding.cpp (the torch ops)
// and by test_kernels.cpp (the standalone CMake test program).
//
// Shapes: B images, H heads, S tokens (relay row first when has_cls), D head dim, C hidden size,
// N candidates (S - 1 with a CLS token, S without), K kept candidates (keep - 1 with CLS, else keep).
//
// Each launcher takes a dense batch (B images of S tokens) or a packed one: images of their own lengths S_b
// along one axis of T rows, image b in rows cu_seqlens[b] .. cu_seqlens[b + 1] (an int64 array on the device),
// its N_b candidates along one of T_c = T - B * has_cls, at cu_seqlens[b] - b * has_cls. A packed tensor is
// described as its dense form with image stride 0: row j of image b is row cu_seqlens[b] + j of the packed axis.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace flowcut {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// One layer's scores. Inputs may have any strides; outputs are contiguous float32. Computed in float32
// (float64 inputs are converted as they are loaded).
struct FlowScoresArgs {
  int64_t B = 0, H = 0, S = 0, D = 0;  // S: dense only (each image's tokens)
  // Packed: (B + 1,) row offsets on the device, never read on the host; nullptr: dense. Offsets that are not
  // increasing or overrun rows give unspecified scores but no out-of-bounds access.
  const int64_t* cu_seqlens = nullptr;
  int64_t rows = 0;  // packed: T = cu_seqlens[B], host-known (it sizes the launch and the workspace)
  const void* q = nullptr;  // (B, H, D) relay query, dtype q_dtype (float32/float16/bfloat16/float64)
  DType q_dtype = DType::kFloat32;
  int64_t q_stride[3] = {0, 0, 0};
  const void* k = nullptr;  // (B, H, S, D) or packed (T, H, D), dtype kv_dtype (float32/float16/bfloat16/float64)
  const void* v = nullptr;  // (B, H, S, D) or packed (T, H, D), dtype kv_dtype
  DType kv_dtype = DType::kFloat32;
  int64_t k_stride[4] = {0, 0, 0, 0};  // image, head, token, dim; packed: {0, head, row, dim}
  int64_t v_stride[4] = {0, 0, 0, 0};
  const float* prev = nullptr;  // (B, N) or packed (T_c,) previous cumulative score; nullptr: the first scored layer
  int64_t prev_stride[2] = {0, 0};  // image, candidate; packed: {0, candidate}
  float scale = 1.0f;
  bool has_cls = true;   // CLS variant (row 0 is the relay) or mean variant
  bool semantic = true;  // CLS-value similarity term (CLS variant only)
  float* cum = nullptr;      // out (B, N) or packed (T_c,)
  float* entropy = nullptr;  // out (B,)
  float* attn = nullptr;     // out (B, N) or packed (T_c,)
};

// Device scratch, in bytes, that launch_flow_scores needs for these args on the current device.
size_t flow_scores_workspace_bytes(const FlowScoresArgs& args);

// Four kernel launches on stream (scores, head statistics, finish, entropy: csrc/flow_scores.cu).
// workspace: at least flow_scores_workspace_bytes(args) bytes, 16-byte aligned.
// Returns "" on success, else what went wrong.
std::string launch_flow_scores(const FlowScoresArgs& args, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

// Keep the relay row and the K best candidates (ties: lower index), in ascending order, and gather.
struct SelectGatherArgs {
  int64_t B = 0;
  int64_t S = 0, keep = 0;  // dense: each image's rows and kept rows
  // Packed: (B + 1,) offsets on the device of the input rows and of the output rows (0, keep_0, keep_0 + keep_1,
  // ...: image b keeps keep_b = cu_seqlens_out[b + 1] - cu_seqlens_out[b] rows), never read on the host, and the
  // host-known totals rows = T = cu_seqlens[B] and rows_out = cu_seqlens_out[B]. Both nullptr: dense.
  const int64_t* cu_seqlens = nullptr;
  const int64_t* cu_seqlens_out = nullptr;
  int64_t rows = 0, rows_out = 0;
  int64_t C = 0;
  bool has_cls = true;
  const void* hidden = nullptr;  // (B, S, C) or packed (T, C), any dtype of elem_size 2, 4 or 8 bytes
  size_t elem_size = 4;
  int64_t hidden_stride[3] = {0, 0, 0};  // image, token, channel; packed: {0, row, channel}
  const float* cum = nullptr;  // (B, N) or packed (T_c,)
  int64_t cum_stride[2] = {0, 0};  // image, candidate; packed: {0, candidate}
  const int64_t* index_map = nullptr;  // (B, N) or packed (T_c,)
  int64_t index_stride[2] = {0, 0};
  void* hidden_out = nullptr;    // out (B, keep, C) or packed (rows_out, C), contiguous
  float* cum_out = nullptr;      // out (B, K) or packed (rows_out - B * has_cls,)
  int64_t* index_out = nullptr;  // out (B, K) or packed (rows_out - B * has_cls,)
};

// Device scratch, in bytes, that launch_select_gather needs for these args (8 bytes per output row).
size_t select_gather_workspace_bytes(const SelectGatherArgs& args);

// Two launches on stream (after, for a packed batch, a memset of the workspace): the selection, a block per image,
// then the gather over every output row. workspace: at least select_gather_workspace_bytes(args) bytes, 16-byte
// aligned. Returns "" on success, else what went wrong.
std::string launch_select_gather(const SelectGatherArgs& args, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream);

// --- Generic primitives (flowcut_kernels/ops/reference.py, "Generic primitives"; csrc/<op>.cu) ----------
// Each computes in float32, or in float64 where the reference does (attention_scores and text_guided_scores: k
// float64; merge_nearest: hidden float64). Inputs may have any strides (in elements); outputs are contiguous.
// Deterministic: no floating-point atomics, every sum in a fixed order. Each launcher returns "" on success, else
// what went wrong; one with a workspace takes at least the bytes its *_workspace reports, 16-byte aligned.

// Head- and row-mean attention of query rows over keys, the columns of one span: out[b, c] = mean over the Hq
// heads and Q rows of softmax over the unmasked keys of scale * q . k, column span_start + c. GQA: query head h
// reads key head h / (Hq / Hkv). One pass over k per (image, key head, tile of query rows): running softmax
// statistics per row and the span's logits go to the workspace, then two small launches normalise and average.
struct AttentionScoresArgs {
  int64_t B = 0, Hq = 0, Hkv = 0, Q = 0, S = 0, D = 0;
  int64_t span_start = 0, span_end = 0;  // 0 <= start <= end <= S
  const void* q = nullptr;  // (B, Hq, Q, D), any float dtype
  DType q_dtype = DType::kFloat32;
  int64_t q_stride[4] = {0, 0, 0, 0};
  const void* k = nullptr;  // (B, Hkv, S, D), any float dtype (float64: computed in float64)
  DType k_dtype = DType::kFloat32;
  int64_t k_stride[4] = {0, 0, 0, 0};
  const uint8_t* key_mask = nullptr;  // (B, S) bool as bytes (0: excluded), or nullptr: every key
  int64_t mask_stride[2] = {0, 0};
  double scale = 1.0;
  float* out = nullptr;  // out (B, span_end - span_start)
};

std::string attention_scores_workspace(const AttentionScoresArgs& args, size_t* bytes);
std::string launch_attention_scores(const AttentionScoresArgs& args, void* workspace, size_t workspace_bytes,
                                    cudaStream_t stream);

// The language-model stage's text-guided score of each segment's tokens (reference.text_guided_scores):
// (rel + sem) * rho, packed segment by segment. One block per (segment, key head) computes its logits, softmaxes
// and head sums into the workspace; one warp per output token then sums over the key heads and adds rho.
struct TextGuidedScoresArgs {
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, D = 0;
  int64_t G = 0;                         // segments
  const int64_t* segments = nullptr;     // (G, 3) on the device: b, start, end (0 <= start <= end <= S)
  const int64_t* out_offsets = nullptr;  // (G + 1,) on the device: 0, n_0, n_0 + n_1, ... (n_g = end - start)
  int64_t total = 0;                     // out_offsets[G]
  const void* q_relay = nullptr;  // (B, Hq, D)
  DType q_dtype = DType::kFloat32;
  int64_t q_stride[3] = {0, 0, 0};
  const void* v_relay = nullptr;  // (B, Hkv, D)
  DType vt_dtype = DType::kFloat32;
  int64_t vt_stride[3] = {0, 0, 0};
  const void* k = nullptr;  // (B, Hkv, S, D) (float64: computed in float64)
  DType k_dtype = DType::kFloat32;
  int64_t k_stride[4] = {0, 0, 0, 0};
  const void* v = nullptr;  // (B, Hkv, S, D)
  DType v_dtype = DType::kFloat32;
  int64_t v_stride[4] = {0, 0, 0, 0};
  double scale = 1.0;
  float* out = nullptr;  // out (total,)
};

std::string text_guided_scores_workspace(const TextGuidedScoresArgs& args, size_t* bytes);
std::string launch_text_guided_scores(const TextGuidedScoresArgs& args, void* workspace, size_t workspace_bytes,
                                      cudaStream_t stream);

// Per image, keep[b] best unprotected rows (larger score first; NaN above every number; ties and NaNs by lower
// index; -0.0 == 0.0; compared in the scores' own dtype) and every protected row. One block per image: a radix
// select finds the keep[b]-th best key, then block scans write the kept and dropped global row indices, ascending.
// The caller sizes the outputs: kept_cu / dropped_cu hold each image's output offsets, and keep[b] must not exceed
// the image's unprotected rows.
struct TopkSelectArgs {
  int64_t B = 0;
  const int64_t* cu_seqlens = nullptr;  // (B + 1,) on the device: image b is rows cu[b] .. cu[b + 1]
  const int64_t* keep = nullptr;        // (B,) on the device
  const void* scores = nullptr;         // (T,)
  DType scores_dtype = DType::kFloat32;
  int64_t scores_stride = 1;
  const uint8_t* protect = nullptr;  // (T,) bool as bytes, or nullptr: none
  int64_t protect_stride = 1;
  const int64_t* kept_cu = nullptr;     // (B + 1,) on the device: image b's kept rows at kept[kept_cu[b] ..]
  const int64_t* dropped_cu = nullptr;  // (B + 1,) on the device
  int64_t* kept = nullptr;              // out (kept_cu[B],) int64
  int64_t* dropped = nullptr;           // out (dropped_cu[B],) int64
};

std::string launch_topk_select(const TopkSelectArgs& args, cudaStream_t stream);

// Merge each image's dropped rows into its kept row of largest cosine similarity of keys (the first in kept on
// ties; NaN above every number, as torch.argmax): merged[i] = (s_i h_i + sum_{j -> i} s_j h_j) / (s_i + sum s_j),
// the dropped rows taken in ascending position. A warp per dropped row finds its target; a block per kept row then
// gathers, in order, the rows assigned to it. No value is read on the host: indices outside [0, T) are never
// dereferenced (a kept one gives a NaN row and size, a dropped one is left out), and offsets are clamped.
struct MergeNearestArgs {
  int64_t T = 0, C = 0, Ck = 0, K = 0, M = 0, B = 0;
  const void* hidden = nullptr;  // (T, C) (float64: computed in float64)
  DType hidden_dtype = DType::kFloat32;
  int64_t hidden_stride[2] = {0, 0};
  const void* keys = nullptr;  // (T, Ck)
  DType keys_dtype = DType::kFloat32;
  int64_t keys_stride[2] = {0, 0};
  const void* sizes = nullptr;  // (T,), or nullptr: 1 each
  DType sizes_dtype = DType::kFloat32;
  int64_t sizes_stride = 1;
  const int64_t* kept = nullptr;  // (K,) row indices
  int64_t kept_stride = 1;
  const int64_t* dropped = nullptr;  // (M,) row indices
  int64_t dropped_stride = 1;
  const int64_t* kept_cu = nullptr;     // (B + 1,) on the device
  const int64_t* dropped_cu = nullptr;  // (B + 1,) on the device
  void* merged = nullptr;               // out (K, C) in hidden's dtype
  float* sizes_out = nullptr;           // out (K,)
};

std::string merge_nearest_workspace(const MergeNearestArgs& args, size_t* bytes);
std::string launch_merge_nearest(const MergeNearestArgs& args, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace flowcut
