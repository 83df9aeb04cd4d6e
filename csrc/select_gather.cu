// CUDA select_gather: one launch, grid (row groups, images), for a dense batch and a packed one alike: image b
// is rows row_b .. row_b + S_b of a packed row axis and keeps keep_b of them, written to output rows
// out_b .. out_b + keep_b (a dense batch is the case row_b = b S, out_b = b keep); an image of a packed batch that
// keeps fewer rows than the most leaves its last blocks idle.
//
// Every block of an image selects the same kept set, redundantly, so that no block waits for another:
// a radix select over order-preserving 32-bit keys of cum finds the K-th largest score tau, then two
// block prefix scans keep every candidate above tau and the first ones (lowest indices) equal to tau, and
// give each kept candidate its output position in ascending order. Block 0 writes cum_out and index_out;
// each block then copies its own range of output rows (the relay row first in the CLS variant) with
// 16-byte loads, several in flight per lane, a warp per row.
#include <algorithm>
#include <string>
#include <type_traits>

#include "cuda_common.cuh"

namespace flowcut {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kCopyUnroll = 4;
constexpr int64_t kMaxRowsPerBlock = 8192;
constexpr int kHistWords = 258;  // the radix histogram, then the digit found and the rank left
constexpr int kScanWords = 33;   // block_exclusive_scan's scratch
// The row list (dynamic) and the histogram and scan scratch (static) stay within the 48 KiB of shared memory
// every block may use without raising cudaFuncAttributeMaxDynamicSharedMemorySize (a per-kernel setting that
// concurrent launches of different sizes would race on).
static_assert((kMaxRowsPerBlock + kHistWords + kScanWords) * 4 <= 48 * 1024, "select_gather: shared memory");

struct Params {
  int64_t S, C, keep, rows_per_block;  // S, keep: each image's (dense)
  const int64_t* cu;      // packed: (B + 1,) input row offsets; nullptr: dense
  const int64_t* cu_out;  // packed: (B + 1,) output row offsets
  int first;
  // Image b's packed row r, channel x of hidden at b * hs0 + r * hs1 + x * hs2 elements, hs0 its image_skew; the
  // same for cum and index_map by packed candidate.
  const char* hidden;
  int64_t hs0, hs1, hs2;
  const float* cum;
  int64_t cs0, cs1;
  const int64_t* index_map;
  int64_t is0, is1;
  char* hidden_out;
  float* cum_out;
  int64_t* index_out;
};

// Order-preserving key: larger score, larger key; every NaN (any sign or payload) one key above everything
// (as torch.sort ranks NaN; NaNs then tie, lower index first), -0.0 == 0.0.
__device__ __forceinline__ unsigned order_key(float x) {
  if (isnan(x)) return 0xffffffffu;
  if (x == 0.0f) x = 0.0f;
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The key of the K-th largest of the N scores cum[j * stride] (1 <= K <= N), and how many candidates equal to it
// are kept.
__device__ void radix_select(const float* cum, int64_t stride, int64_t N, int64_t K, unsigned* hist, unsigned* tau,
                             int64_t* take) {
  unsigned prefix = 0, mask = 0;
  int64_t want = K;  // rank still to find among the candidates matching prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const unsigned key = order_key(cum[j * stride]);
      if ((key & mask) == prefix) atomicAdd(hist + ((key >> shift) & 255u), 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // one warp finds the digit, scanning from the largest
      const int lane = threadIdx.x;
      unsigned mine = 0;
      for (int i = 0; i < 8; ++i) mine += hist[255 - 8 * lane - i];
      unsigned incl = mine;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += y;
      }
      const unsigned hit = __ballot_sync(kFullMask, int64_t(incl) >= want);
      if (lane == __ffs(hit) - 1) {
        int64_t above = int64_t(incl - mine);
        for (int i = 0; i < 8; ++i) {
          const unsigned digit = unsigned(255 - 8 * lane - i);
          if (above + hist[digit] >= want) {
            hist[256] = digit;
            hist[257] = unsigned(want - above);
            break;
          }
          above += hist[digit];
        }
      }
    }
    __syncthreads();
    prefix |= hist[256] << shift;
    mask |= 255u << shift;
    want = hist[257];
    __syncthreads();  // hist is cleared next round
  }
  *tau = prefix;
  *take = want;
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
};

template <typename Unit>
__global__ void select_gather_kernel(Params p, int64_t row_units) {
  extern __shared__ int rows[];  // source rows of this block's output rows
  __shared__ unsigned hist[kHistWords];
  __shared__ int scan[kScanWords];
  const int64_t b = blockIdx.y, r0 = int64_t(blockIdx.x) * p.rows_per_block;
  // This image: input rows row .. row + S, output rows out .. out + keep; its N candidates from packed candidate
  // cand, its K kept ones from cand_out.
  const int64_t row = p.cu ? p.cu[b] : b * p.S, S = p.cu ? p.cu[b + 1] - row : p.S;
  const int64_t out = p.cu ? p.cu_out[b] : b * p.keep, keep = p.cu ? p.cu_out[b + 1] - out : p.keep;
  if (r0 >= keep) return;  // a packed batch's image that keeps fewer rows: this block has none
  const int64_t r1 = r0 + p.rows_per_block < keep ? r0 + p.rows_per_block : keep;
  const int64_t N = S - p.first, K = keep - p.first, cand = row - b * p.first, cand_out = out - b * p.first;
  const float* cum = p.cum + (b * p.cs0 + cand * p.cs1);
  if (p.first == 1 && r0 == 0) rows[0] = 0;  // the relay row

  if (K > 0) {
    unsigned tau = 0;
    int64_t take = 0;
    const bool all = K == N;
    if (!all) radix_select(cum, p.cs1, N, K, hist, &tau, &take);
    int64_t eq_base = 0, pos_base = 0;
    for (int64_t t = 0; t < N; t += blockDim.x) {
      const int64_t j = t + threadIdx.x;
      const unsigned key = j < N ? order_key(cum[j * p.cs1]) : 0u;
      const bool valid = j < N;
      int eq_total = 0, kept_total = 0;
      const int eq_rank = block_exclusive_scan(valid && key == tau ? 1 : 0, scan, &eq_total);
      const bool kept = valid && (all || key > tau || (key == tau && eq_base + eq_rank < take));
      const int pos = block_exclusive_scan(kept ? 1 : 0, scan, &kept_total);
      if (kept) {
        const int64_t n = pos_base + pos, r = n + p.first;
        if (blockIdx.x == 0) {
          p.cum_out[cand_out + n] = cum[j * p.cs1];
          p.index_out[cand_out + n] = p.index_map[b * p.is0 + (cand + j) * p.is1];
        }
        if (r >= r0 && r < r1) rows[r - r0] = int(j + p.first);
      }
      eq_base += eq_total;
      pos_base += kept_total;
    }
  }
  __syncthreads();

  // Copy rows r0..r1: a warp per row, kCopyUnroll loads in flight per lane.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t r = r0 + warp; r < r1; r += warps) {
    const char* src = p.hidden + (b * p.hs0 + (row + rows[r - r0]) * p.hs1) * Unit::kElemBytes;
    char* dst = p.hidden_out + (out + r) * p.C * Unit::kElemBytes;
    for (int64_t base = 0; base < row_units; base += 32 * kCopyUnroll) {
      typename Unit::Raw x[kCopyUnroll];
#pragma unroll
      for (int i = 0; i < kCopyUnroll; ++i) {
        const int64_t u = base + i * 32 + lane;
        if (u < row_units) x[i] = Unit::load(src, u, p.hs2);
      }
#pragma unroll
      for (int i = 0; i < kCopyUnroll; ++i) {
        const int64_t u = base + i * 32 + lane;
        if (u < row_units) reinterpret_cast<typename Unit::Raw*>(dst)[u] = x[i];
      }
    }
  }
}

template <typename Unit>
std::string launch_unit(const Params& p, int64_t B, int64_t groups, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(B));
  const size_t smem = size_t(p.rows_per_block) * sizeof(int);
  select_gather_kernel<Unit><<<grid, kThreads, smem, stream>>>(p, Unit::units(p.C));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string("select_gather launch: ") + cudaGetErrorString(err);
}

template <int E>
std::string launch_elem(const Params& p, bool vec, int64_t B, int64_t groups, cudaStream_t stream) {
  return vec ? launch_unit<Copy<E, true>>(p, B, groups, stream) : launch_unit<Copy<E, false>>(p, B, groups, stream);
}

}  // namespace

std::string launch_select_gather(const SelectGatherArgs& a, cudaStream_t stream) {
  const int64_t first = a.has_cls ? 1 : 0, N = a.S - first;
  if (a.keep < 1 || a.keep > a.S || N < 0)
    return "select_gather: keep=" + std::to_string(a.keep) + " is out of range [1, S=" + std::to_string(a.S) + "]";
  if ((a.cu_seqlens == nullptr) != (a.cu_seqlens_out == nullptr))
    return "select_gather: a packed batch needs both cu_seqlens and cu_seqlens_out";
  if (a.B == 0) return "";
  if (a.B > 65535) return "select_gather: B = " + std::to_string(a.B) + " images exceed one launch (65535)";
  if (N >= (int64_t(1) << 31)) return "select_gather: more than 2^31 candidates per image";
  DeviceFacts facts;
  std::string err = device_facts(&facts);
  if (!err.empty()) return err;

  // Row groups per image: about four blocks per SM over the batch, at least 8 rows (a warp each) per block,
  // and at most kMaxRowsPerBlock rows, so that the row list fits in shared memory.
  int64_t groups = std::max<int64_t>(1, (4LL * facts.sms + a.B - 1) / a.B);
  groups = std::min<int64_t>(groups, (a.keep + 7) / 8);
  groups = std::max<int64_t>(groups, (a.keep + kMaxRowsPerBlock - 1) / kMaxRowsPerBlock);
  groups = std::min<int64_t>(groups, 65535);

  Params p{};
  p.S = a.S, p.C = a.C, p.keep = a.keep, p.first = int(first), p.cu = a.cu_seqlens, p.cu_out = a.cu_seqlens_out;
  p.rows_per_block = (a.keep + groups - 1) / groups;
  groups = (a.keep + p.rows_per_block - 1) / p.rows_per_block;
  const bool packed = a.cu_seqlens != nullptr;
  p.hidden = static_cast<const char*>(a.hidden);
  p.hs0 = image_skew(packed, a.hidden_stride[0], a.S, a.hidden_stride[1]);
  p.hs1 = a.hidden_stride[1], p.hs2 = a.hidden_stride[2];
  p.cum = a.cum, p.cs0 = image_skew(packed, a.cum_stride[0], N, a.cum_stride[1]), p.cs1 = a.cum_stride[1];
  p.index_map = a.index_map, p.is0 = image_skew(packed, a.index_stride[0], N, a.index_stride[1]);
  p.is1 = a.index_stride[1];
  p.hidden_out = static_cast<char*>(a.hidden_out), p.cum_out = a.cum_out, p.index_out = a.index_out;

  const int64_t e = int64_t(a.elem_size);
  const bool vec = aligned16(a.hidden) && aligned16(a.hidden_out) && a.hidden_stride[2] == 1 &&
                   (a.C * e) % 16 == 0 && (a.hidden_stride[0] * e) % 16 == 0 && (a.hidden_stride[1] * e) % 16 == 0;
  switch (a.elem_size) {
    case 2: return launch_elem<2>(p, vec, a.B, groups, stream);
    case 4: return launch_elem<4>(p, vec, a.B, groups, stream);
    case 8: return launch_elem<8>(p, vec, a.B, groups, stream);
    default: return "select_gather: hidden elements must be 2, 4 or 8 bytes, got " + std::to_string(a.elem_size);
  }
}

}  // namespace cuda
}  // namespace flowcut
