// The selection shared by select_gather.cu and topk_select.cu: order-preserving integer keys of scores, a block
// radix select of the K-th largest key (8 bits a round, from the top), and the ranks of the kept items in order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda_common.cuh"

namespace flowcut {
namespace cuda {
namespace detail {

// Order-preserving keys: larger score, larger key; every NaN (any sign or payload) the largest key (as torch.sort
// ranks NaN; NaNs then tie, lower index first); -0.0 == 0.0. fp16 and bf16 compare exactly as float.
__device__ __forceinline__ unsigned order_key(float x) {
  if (isnan(x)) return 0xffffffffu;
  if (x == 0.0f) x = 0.0f;
  const unsigned u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long order_key(double x) {
  if (isnan(x)) return ~0ull;
  if (x == 0.0) x = 0.0;
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(x));
  return (u >> 63) ? ~u : (u | (1ull << 63));
}

__device__ __forceinline__ unsigned key_of(float x) { return order_key(x); }
__device__ __forceinline__ unsigned key_of(__half x) { return order_key(__half2float(x)); }
__device__ __forceinline__ unsigned key_of(__nv_bfloat16 x) { return order_key(__bfloat162float(x)); }
__device__ __forceinline__ unsigned long long key_of(double x) { return order_key(x); }

// radix_select's shared memory.
struct RadixScratch {
  unsigned hist[256];
  unsigned digit;
  long long want;
};

// The K-th largest key tau among the items j in [0, n) for which key_at(j, &key) is true (1 <= K <= their count),
// and take, how many items equal to tau are kept (the first ones, by index). Called by every thread of the block
// (blockDim.x a multiple of 32); every thread gets the result. The histogram counts are aggregated per warp (one
// shared-memory atomic per distinct digit of a warp), so that equal keys (ties, a constant score) do not queue on
// one address.
template <typename Key, typename KeyAt>
__device__ void radix_select(int64_t n, long long K, KeyAt key_at, RadixScratch* s, Key* tau, long long* take) {
  const int lane = threadIdx.x & 31;
  Key prefix = 0, mask = 0;
  long long want = K;  // rank still to find among the items matching prefix
  for (int shift = int(sizeof(Key) * 8) - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s->hist[i] = 0;
    __syncthreads();
    for (int64_t t = 0; t < n; t += blockDim.x) {  // the same steps for every lane: the warp stays converged
      const int64_t j = t + threadIdx.x;
      Key key = 0;
      const bool in = j < n && key_at(j, &key) && (key & mask) == prefix;
      const unsigned digit = in ? unsigned((key >> shift) & Key(255)) : 256u;
      const unsigned peers = __match_any_sync(kFullMask, digit);
      if (in && lane == __ffs(peers) - 1) atomicAdd(s->hist + digit, unsigned(__popc(peers)));
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // one warp finds the digit, scanning from the largest
      unsigned mine = 0;
      for (int i = 0; i < 8; ++i) mine += s->hist[255 - 8 * lane - i];
      unsigned incl = mine;
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += y;
      }
      const unsigned hit = __ballot_sync(kFullMask, (long long)incl >= want);
      if (lane == __ffs(hit) - 1) {
        long long above = (long long)(incl - mine);
        for (int i = 0; i < 8; ++i) {
          const unsigned digit = unsigned(255 - 8 * lane - i);
          if (above + s->hist[digit] >= want) {
            s->digit = digit;
            s->want = want - above;
            break;
          }
          above += s->hist[digit];
        }
      }
    }
    __syncthreads();
    prefix |= Key(s->digit) << shift;
    mask |= Key(255) << shift;
    want = s->want;
    __syncthreads();  // hist is cleared next round
  }
  *tau = prefix;
  *take = want;
}

// One tile of blockDim.x items in index order (item t + threadIdx.x), after radix_select: whether this thread's item
// is kept — forced, or a candidate above tau, or one of the first `take` candidates equal to it — and, in *rank, how
// many kept items come before it. *eq_seen and *kept_seen carry the counts from tile to tile. Every thread of the
// block calls it; scan: 33 ints of shared memory.
template <typename Key>
__device__ bool keep_in_order(bool forced, bool candidate, Key key, Key tau, long long take, long long* eq_seen,
                              long long* kept_seen, long long* rank, int* scan) {
  int eq_total = 0, kept_total = 0;
  const int eq_rank = block_exclusive_scan(candidate && key == tau ? 1 : 0, scan, &eq_total);
  const bool kept = forced || (candidate && (key > tau || (key == tau && *eq_seen + eq_rank < take)));
  const int pos = block_exclusive_scan(kept ? 1 : 0, scan, &kept_total);
  *rank = *kept_seen + pos;
  *eq_seen += eq_total, *kept_seen += kept_total;
  return kept;
}

}  // namespace detail
}  // namespace cuda
}  // namespace flowcut
