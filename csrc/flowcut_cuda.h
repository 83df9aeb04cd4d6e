// CUDA kernels of the two FlowCut ops (docs/semantics.md), behind a launcher interface free of torch headers:
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
  int64_t B = 0, H = 0, S = 0, D = 0;  // packed: S is the longest image's length (it sizes the grid)
  const int64_t* cu_seqlens = nullptr;  // packed: (B + 1,) row offsets on the device; nullptr: dense
  int64_t rows = 0;                     // packed: T = cu_seqlens[B] (it sizes the workspace)
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

// One kernel launch (after a memset of the per-image block counters inside workspace) on stream.
// workspace: at least flow_scores_workspace_bytes(args) bytes, 16-byte aligned.
// Returns "" on success, else what went wrong.
std::string launch_flow_scores(const FlowScoresArgs& args, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

// Keep the relay row and the K best candidates (ties: lower index), in ascending order, and gather.
struct SelectGatherArgs {
  int64_t B = 0, S = 0, C = 0, keep = 0;  // packed: S the longest image's length, keep the largest keep_b
  // Packed: (B + 1,) offsets on the device of the input rows and of the output rows (0, keep_0, keep_0 + keep_1,
  // ...: image b keeps keep_b = cu_seqlens_out[b + 1] - cu_seqlens_out[b] rows). Both nullptr: dense.
  const int64_t* cu_seqlens = nullptr;
  const int64_t* cu_seqlens_out = nullptr;
  bool has_cls = true;
  const void* hidden = nullptr;  // (B, S, C) or packed (T, C), any dtype of elem_size 2, 4 or 8 bytes
  size_t elem_size = 4;
  int64_t hidden_stride[3] = {0, 0, 0};  // image, token, channel; packed: {0, row, channel}
  const float* cum = nullptr;  // (B, N) or packed (T_c,)
  int64_t cum_stride[2] = {0, 0};  // image, candidate; packed: {0, candidate}
  const int64_t* index_map = nullptr;  // (B, N) or packed (T_c,)
  int64_t index_stride[2] = {0, 0};
  void* hidden_out = nullptr;    // out (B, keep, C) or packed (sum keep_b, C), contiguous
  float* cum_out = nullptr;      // out (B, K) or packed (sum K_b,)
  int64_t* index_out = nullptr;  // out (B, K) or packed (sum K_b,)
};

// One kernel launch on stream. Returns "" on success, else what went wrong.
std::string launch_select_gather(const SelectGatherArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace flowcut
