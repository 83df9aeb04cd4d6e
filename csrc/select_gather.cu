// CUDA select_gather, for a dense batch and a packed one alike: image b is rows row_b .. row_b + S_b of a packed row
// axis and keeps keep_b of them, written to output rows out_b .. out_b + keep_b (a dense batch is the case
// row_b = b S, out_b = b keep). Two launches:
//  1. select, a block per image, once: the radix select of select.cuh over order-preserving keys of cum finds the
//     K-th largest score tau; two block prefix scans keep every candidate above tau and the first ones (lowest
//     indices) equal to tau, give each kept candidate its output position in ascending order, write cum_out and
//     index_out, and record each output row's source (an element offset into hidden) in the workspace;
//  2. gather, over all output rows of the batch: a warp per row copies it with 16-byte loads, several in flight
//     per lane.
// Packed offsets stay on the device and are never read on the host: the launch is sized by host-known totals (rows
// in and out), and offsets that are not increasing or overrun those totals never cause an out-of-bounds access (an
// image whose rows do not fit is clamped; an output row that no image fills is written as zeros).
#include <algorithm>
#include <string>
#include <type_traits>

#include "select.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

constexpr int kSelectThreads = 512;
constexpr int kGatherWarps = 8;
constexpr int kRowsPerWarp = 4;
constexpr int kCopyUnroll = 4;

struct Params {
  int64_t S, keep;        // dense: each image's rows and kept rows
  const int64_t* cu;      // packed: (B + 1,) input row offsets; nullptr: dense
  const int64_t* cu_out;  // packed: (B + 1,) output row offsets
  int64_t rows, rows_out;  // packed: T, sum keep_b (the clamping bounds)
  int first;
  // Image b's packed row r, channel x of hidden at b * hs0 + r * hs1 + x * hs2 elements, hs0 its image_skew; the
  // same for cum and index_map by packed candidate.
  int64_t hs0, hs1, hs2;
  const float* cum;
  int64_t cs0, cs1;
  const int64_t* index_map;
  int64_t is0, is1;
  float* cum_out;
  int64_t* index_out;
  int64_t* source;  // (rows out,) workspace: the element offset in hidden of each output row's source, -1: none
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// A block per image: its kept candidates' scores, indices and source rows.
__global__ void __launch_bounds__(kSelectThreads) select_rows_kernel(Params p) {
  __shared__ RadixScratch radix;
  __shared__ int scan[33];
  const int64_t b = blockIdx.x, first = p.first;
  // This image: input rows row .. row + S, output rows out .. out + keep; its N candidates from packed candidate
  // cand, its K kept ones from cand_out (packed offsets clamped to the totals).
  int64_t row, S, out, keep;
  if (p.cu) {
    row = clamp64(p.cu[b], 0, p.rows), S = clamp64(p.cu[b + 1], row, p.rows) - row;
    out = clamp64(p.cu_out[b], 0, p.rows_out), keep = clamp64(p.cu_out[b + 1], out, p.rows_out) - out;
  } else {
    row = b * p.S, S = p.S, out = b * p.keep, keep = p.keep;
  }
  const int64_t cand = row - b * first, cand_out = out - b * first;
  const int64_t B = gridDim.x;  // the candidates in and out of the batch: T_c, T_kc
  const int64_t T_c = (p.cu ? p.rows : B * p.S) - B * first, T_kc = (p.cu ? p.rows_out : B * p.keep) - B * first;
  const bool fits = cand >= 0 && cand_out >= 0;
  const int64_t N = fits ? clamp64(S - first, 0, T_c - cand) : 0;
  const int64_t K = fits ? clamp64(keep - first, 0, T_kc - cand_out) : 0;
  const int64_t kept_n = K < N ? K : N;
  const float* cum = p.cum + (b * p.cs0 + cand * p.cs1);
  const int64_t* index_map = p.index_map + (b * p.is0 + cand * p.is1);
  const int64_t image = b * p.hs0;  // the image's offset in hidden (the skew of a dense batch)
  if (first == 1 && keep >= 1 && threadIdx.x == 0) p.source[out] = S >= 1 ? image + row * p.hs1 : -1;  // the relay

  if (kept_n > 0) {
    unsigned tau = 0;
    long long take = 0;
    const bool all = kept_n == N;
    if (!all) {
      auto key_at = [&](int64_t j, unsigned* key) {
        *key = order_key(cum[j * p.cs1]);
        return true;
      };
      radix_select(N, kept_n, key_at, &radix, &tau, &take);
    }
    long long eq_seen = 0, kept_seen = 0;
    for (int64_t t = 0; t < N; t += blockDim.x) {
      const int64_t j = t + threadIdx.x;
      const bool valid = j < N;
      const float score = valid ? cum[j * p.cs1] : 0.0f;
      long long n = 0;  // the kept candidate's output position
      if (keep_in_order(valid && all, valid, order_key(score), tau, take, &eq_seen, &kept_seen, &n, scan)) {
        p.cum_out[cand_out + n] = score;
        p.index_out[cand_out + n] = index_map[j * p.is1];
        p.source[out + first + n] = image + (row + first + j) * p.hs1;
      }
    }
  }
  for (int64_t n = kept_n + threadIdx.x; n < K; n += blockDim.x) {  // more kept than candidates: invalid offsets
    p.cum_out[cand_out + n] = NAN;
    p.index_out[cand_out + n] = -1;
    p.source[out + first + n] = -1;
  }
}

// How a row is copied: 16-byte units along a contiguous, aligned row (VEC), else element by element
// through the channel stride. E: bytes per element (2, 4 or 8; the dtype itself does not matter).
template <int E, bool VEC>
struct Copy;

template <int E>
struct Copy<E, true> {
  using Raw = uint4;
  static constexpr int kElemBytes = E;
  static int64_t units(int64_t C) { return C * E / 16; }
  __device__ static Raw load(const char* row, int64_t u, int64_t) {
    return __ldg(reinterpret_cast<const uint4*>(row) + u);
  }
  __device__ static Raw zero() { return make_uint4(0u, 0u, 0u, 0u); }
};

template <int E>
struct Copy<E, false> {
  using Raw = typename std::conditional<E == 2, unsigned short,
                                        typename std::conditional<E == 4, unsigned, unsigned long long>::type>::type;
  static constexpr int kElemBytes = E;
  static int64_t units(int64_t C) { return C; }
  __device__ static Raw load(const char* row, int64_t u, int64_t stride) {
    return reinterpret_cast<const Raw*>(row)[u * stride];
  }
  __device__ static Raw zero() { return Raw(0); }
};

// Output rows r0 .. r0 + kGatherWarps * kRowsPerWarp: a warp per row, kCopyUnroll loads in flight per lane; a row
// without a source is written as zeros.
template <typename Unit>
__global__ void __launch_bounds__(32 * kGatherWarps)
    gather_rows_kernel(const char* hidden, int64_t hs2, const int64_t* source, int64_t rows_out, int64_t C,
                       int64_t row_units, char* hidden_out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = int64_t(blockIdx.x) * (kGatherWarps * kRowsPerWarp);
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t r = r0 + int64_t(i) * kGatherWarps + warp;
    if (r >= rows_out) return;
    const int64_t from = source[r];
    const char* src = hidden + from * Unit::kElemBytes;
    auto* dst = reinterpret_cast<typename Unit::Raw*>(hidden_out + r * C * Unit::kElemBytes);
    for (int64_t base = 0; base < row_units; base += 32 * kCopyUnroll) {
      typename Unit::Raw x[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int64_t unit = base + u * 32 + lane;
        x[u] = Unit::zero();
        if (unit < row_units && from >= 0) x[u] = Unit::load(src, unit, hs2);
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int64_t unit = base + u * 32 + lane;
        if (unit < row_units) dst[unit] = x[u];
      }
    }
  }
}

template <typename Unit>
std::string launch_gather(const SelectGatherArgs& a, const int64_t* source, int64_t rows_out, cudaStream_t stream) {
  const int64_t blocks = ceil_div(rows_out, kGatherWarps * kRowsPerWarp);
  gather_rows_kernel<Unit><<<unsigned(blocks), 32 * kGatherWarps, 0, stream>>>(
      static_cast<const char*>(a.hidden), a.hidden_stride[2], source, rows_out, a.C, Unit::units(a.C),
      static_cast<char*>(a.hidden_out));
  return launch_error("select_gather launch (gather)");
}

template <int E>
std::string launch_elem(const SelectGatherArgs& a, bool vec, const int64_t* source, int64_t rows_out,
                        cudaStream_t stream) {
  return vec ? launch_gather<Copy<E, true>>(a, source, rows_out, stream)
             : launch_gather<Copy<E, false>>(a, source, rows_out, stream);
}

// The output rows of a launch.
int64_t rows_out_of(const SelectGatherArgs& a) { return a.cu_seqlens ? a.rows_out : a.B * a.keep; }

}  // namespace

size_t select_gather_workspace_bytes(const SelectGatherArgs& args) {
  return align16(size_t(std::max<int64_t>(rows_out_of(args), 0)) * sizeof(int64_t));
}

std::string launch_select_gather(const SelectGatherArgs& a, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
  const bool packed = a.cu_seqlens != nullptr;
  if ((a.cu_seqlens == nullptr) != (a.cu_seqlens_out == nullptr))
    return "select_gather: a packed batch needs both cu_seqlens and cu_seqlens_out";
  const int64_t first = a.has_cls ? 1 : 0;
  if (!packed && (a.keep < 1 || a.keep > a.S))
    return "select_gather: keep=" + std::to_string(a.keep) + " is out of range [1, S=" + std::to_string(a.S) + "]";
  if (packed && (a.rows < 0 || a.rows_out < a.B || a.rows_out > a.rows))
    return "select_gather: rows_out=" + std::to_string(a.rows_out) + " must lie in [B, rows=" +
           std::to_string(a.rows) + "]";
  if (a.B == 0) return "";
  if (a.B > 0x7fffffffLL) return "select_gather: too many images for one launch";
  const int64_t rows_out = rows_out_of(a);
  if (ceil_div(rows_out, kGatherWarps * kRowsPerWarp) > 0x7fffffffLL)
    return "select_gather: too many output rows for one launch";
  const size_t need = select_gather_workspace_bytes(a);
  if (workspace_bytes < need || !aligned16(workspace))
    return "select_gather: the workspace must be 16-byte aligned and hold " + std::to_string(need) + " bytes";

  Params p{};
  p.S = a.S, p.keep = a.keep, p.cu = a.cu_seqlens, p.cu_out = a.cu_seqlens_out, p.rows = a.rows;
  p.rows_out = a.rows_out, p.first = int(first);
  const int64_t N = a.S - first;
  p.hs0 = image_skew(packed, a.hidden_stride[0], a.S, a.hidden_stride[1]);
  p.hs1 = a.hidden_stride[1], p.hs2 = a.hidden_stride[2];
  p.cum = a.cum, p.cs0 = image_skew(packed, a.cum_stride[0], N, a.cum_stride[1]), p.cs1 = a.cum_stride[1];
  p.index_map = a.index_map, p.is0 = image_skew(packed, a.index_stride[0], N, a.index_stride[1]);
  p.is1 = a.index_stride[1];
  p.cum_out = a.cum_out, p.index_out = a.index_out;
  p.source = static_cast<int64_t*>(workspace);
  if (packed) {  // rows that no image fills (invalid offsets) keep no source
    const cudaError_t err = cudaMemsetAsync(p.source, 0xff, size_t(rows_out) * sizeof(int64_t), stream);
    if (err != cudaSuccess) return std::string("select_gather: clearing the workspace: ") + cudaGetErrorString(err);
  }
  select_rows_kernel<<<unsigned(a.B), kSelectThreads, 0, stream>>>(p);
  const std::string err = launch_error("select_gather launch (select)");
  if (!err.empty()) return err;

  const int64_t e = int64_t(a.elem_size);
  const bool vec = aligned16(a.hidden) && aligned16(a.hidden_out) && a.hidden_stride[2] == 1 &&
                   (a.C * e) % 16 == 0 && (a.hidden_stride[0] * e) % 16 == 0 && (a.hidden_stride[1] * e) % 16 == 0;
  switch (a.elem_size) {
    case 2: return launch_elem<2>(a, vec, p.source, rows_out, stream);
    case 4: return launch_elem<4>(a, vec, p.source, rows_out, stream);
    case 8: return launch_elem<8>(a, vec, p.source, rows_out, stream);
    default: return "select_gather: hidden elements must be 2, 4 or 8 bytes, got " + std::to_string(a.elem_size);
  }
}

}  // namespace cuda
}  // namespace flowcut
