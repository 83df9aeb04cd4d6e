// C++ CPU kernels of the generic primitives attention_scores, text_guided_scores, topk_select and merge_nearest
// (flowcut_kernels/ops/reference.py, "Generic primitives"; docs/semantics.md for the ranking rules), parallel over
// images, heads and rows. Inputs are read in place through their strides, each in its own dtype: a row at a time
// is converted to double, and every reduction accumulates in double. Partial results of parallel tasks are combined
// in a fixed order, so the outputs do not depend on the thread count.
#include "primitives_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "dot_cpu.h"
#include "ops.h"

namespace flowcut {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename T>
void copy_row(const T* p, int64_t stride, int64_t n, double* out) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = double(p[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = double(p[i * stride]);
  }
}

// Reads a float tensor of any of the four dtypes as double, by element offset (its strides applied by the caller).
struct Reader {
  const void* data;
  at::ScalarType type;

  explicit Reader(const at::Tensor& t) : data(t.const_data_ptr()), type(t.scalar_type()) {}

  // n elements from `offset`, `stride` apart, into out.
  void row(int64_t offset, int64_t stride, int64_t n, double* out) const {
    switch (type) {
      case at::kDouble: return copy_row(static_cast<const double*>(data) + offset, stride, n, out);
      case at::kFloat: return copy_row(static_cast<const float*>(data) + offset, stride, n, out);
      case at::kHalf: return copy_row(static_cast<const at::Half*>(data) + offset, stride, n, out);
      case at::kBFloat16: return copy_row(static_cast<const at::BFloat16*>(data) + offset, stride, n, out);
      default: TORCH_CHECK(false, "flowcut native CPU primitives: unsupported dtype ", type);
    }
  }

  double at(int64_t offset) const {
    double x;
    row(offset, 1, 1, &x);
    return x;
  }
};

// x . y over n doubles, in 4 independent lanes (which vectorise).
double dot(const double* x, const double* y, int64_t n) {
  double lanes[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 4 <= n; d += 4)
    for (int u = 0; u < 4; ++u) lanes[u] += x[d + u] * y[d + u];
  for (; d < n; ++d) lanes[d % 4] += x[d] * y[d];
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// In place: x[0..n) -> softmax(x), max-subtracted.
void softmax(double* x, int64_t n) {
  const double top = *std::max_element(x, x + n);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += (x[i] = std::exp(x[i] - top));
  for (int64_t i = 0; i < n; ++i) x[i] /= total;
}

// In place: x -> x / max(|x|, 1e-12), as torch.nn.functional.normalize.
void normalize(double* x, int64_t n) {
  const double norm = std::max(std::sqrt(dot(x, x, n)), 1e-12);
  for (int64_t i = 0; i < n; ++i) x[i] /= norm;
}

// The segment of offsets off (not decreasing, off[0] = 0) holding position p: the last g with off[g] <= p.
int64_t segment_of(const std::vector<int64_t>& off, int64_t p) {
  return int64_t(std::upper_bound(off.begin(), off.end(), p) - off.begin()) - 1;
}

// A (B + 1,) integer tensor's values on the host.
std::vector<int64_t> host_values(const at::Tensor& t) {
  const at::Tensor host = t.to(at::Device(at::kCPU), at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + host.numel());
}

// Offsets as a (B + 1,) tensor of dtype `dtype` on the CPU.
at::Tensor offsets_tensor(const std::vector<int64_t>& offsets, at::ScalarType dtype) {
  at::Tensor t = at::empty({int64_t(offsets.size())}, at::kLong);
  std::copy(offsets.begin(), offsets.end(), t.data_ptr<int64_t>());
  return t.to(dtype);
}

at::Tensor attention_scores_stream(const at::Tensor& q, const at::Tensor& k, double scale,
                                   const std::optional<at::Tensor>& key_mask, int64_t span_start, int64_t span_end) {
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3);
  const int64_t Hq = q.size(1), Q = q.size(2), group = Hq / Hkv, R = group * Q, n = span_end - span_start;
  std::vector<double> partial(static_cast<size_t>(B * Hkv * n));
  const Reader qr(q), kr(k);
  const bool in_place = k.scalar_type() == at::kFloat && k.stride(3) == 1;
  const float* kf = in_place ? k.const_data_ptr<float>() : nullptr;
  const bool* mask = key_mask.has_value() ? key_mask->const_data_ptr<bool>() : nullptr;
  const int64_t ms0 = mask ? key_mask->stride(0) : 0, ms1 = mask ? key_mask->stride(1) : 0;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> qbuf(static_cast<size_t>(R * D)), kbuf(static_cast<size_t>(D));
    std::vector<double> logits(static_cast<size_t>(R * S));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      for (int64_t r = 0; r < R; ++r)  // row r: query head g * group + r / Q, query row r % Q
        qr.row(b * q.stride(0) + (g * group + r / Q) * q.stride(1) + (r % Q) * q.stride(2), q.stride(3), D,
               &qbuf[r * D]);
      for (int64_t j = 0; j < S; ++j) {
        const int64_t at_kj = b * k.stride(0) + g * k.stride(1) + j * k.stride(2);
        if (mask && !mask[b * ms0 + j * ms1]) {  // excluded: weight 0
          for (int64_t r = 0; r < R; ++r) logits[r * S + j] = -kInf;
        } else if (in_place) {
          for (int64_t r = 0; r < R; ++r) logits[r * S + j] = scale * dot_f32(kf + at_kj, &qbuf[r * D], D);
        } else {
          kr.row(at_kj, k.stride(3), D, kbuf.data());
          for (int64_t r = 0; r < R; ++r) logits[r * S + j] = scale * dot(&qbuf[r * D], kbuf.data(), D);
        }
      }
      double* acc = &partial[task * n];
      std::fill(acc, acc + n, 0.0);
      for (int64_t r = 0; r < R; ++r) {
        double* l = &logits[r * S];
        double top = -kInf, total = 0.0;
        bool nan = false;
        for (int64_t j = 0; j < S; ++j) nan = nan || std::isnan(l[j]), top = std::max(top, l[j]);
        if (top > -kInf && top < kInf && !nan) {  // one exp per key: p_j = exp(l_j - top) / Σ exp(l - top)
          for (int64_t j = 0; j < S; ++j) total += (l[j] = std::exp(l[j] - top));
          for (int64_t c = 0; c < n; ++c) acc[c] += l[span_start + c] / total;
          continue;
        }
        // a row without a key to attend, with a NaN or a +inf logit is NaN, as softmax gives
        for (int64_t c = 0; c < n; ++c) acc[c] += std::numeric_limits<double>::quiet_NaN();
      }
    }
  });
  at::Tensor out = at::empty({B, n}, k.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const double rows_total = double(Hq * Q);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t c = 0; c < n; ++c) {
        double total = 0.0;
        for (int64_t g = 0; g < Hkv; ++g) total += partial[(b * Hkv + g) * n + c];
        o[b * n + c] = float(total / rows_total);
      }
  });
  return out;
}

}  // namespace

// Few rows per key head (R = (Hq / Hkv) Q <= kStreamRows, a relay query): one pass over the keys per (image, key
// head), each key row read once (float32 rows in place, other dtypes converted) and dotted in double with the R
// query rows; then per row p_j = exp(l_j - max l) / Σ_j exp(l_j - max l) (one exp per key) and the span's p into the
// task's partial sum, the partials summed image by image in a fixed order. More rows: the logits in double by GEMM
// (every product of the inputs is exact in double): q viewed as (B, Hkv, R, D) (query head g (Hq / Hkv) + i, row qi
// at i Q + qi) times k^T; masked keys set to -inf; the same p per row; the span's p summed over the key heads and
// rows. A row without a key to attend, with a NaN or a +inf logit is NaN, as softmax gives. Images are taken a
// chunk at a time (one image's rows a tile at a time when its logits alone are large): the logits never exceed
// kChunk doubles.
at::Tensor attention_scores_cpu(const at::Tensor& q, const at::Tensor& k, double scale,
                                const std::optional<at::Tensor>& key_mask, int64_t span_start, int64_t span_end) {
  constexpr int64_t kChunk = int64_t(1) << 23, kStreamRows = 8;  // 64 MiB of double logits
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3);
  const int64_t Hq = q.size(1), Q = q.size(2), group = Hq / Hkv, R = group * Q, n = span_end - span_start;
  if (B == 0 || n == 0) return at::empty({B, n}, k.options().dtype(at::kFloat));
  if (R <= kStreamRows) return attention_scores_stream(q, k, scale, key_mask, span_start, span_end);
  const auto dbl = k.options().dtype(at::kDouble);
  const at::Tensor qd = at::empty(q.sizes(), dbl).copy_(q).view({B, Hkv, R, D});
  const at::Tensor kt = at::empty(k.sizes(), dbl).copy_(k).transpose(2, 3);  // (B, Hkv, D, S)
  const at::Tensor excluded = key_mask.has_value() ? at::logical_not(*key_mask).view({B, 1, 1, S}) : at::Tensor();
  const int64_t per_image = std::max<int64_t>(Hkv * R * S, 1);
  const int64_t images = std::max<int64_t>(kChunk / per_image, 1), rows = images > 1 ? R : std::max<int64_t>(
      kChunk / std::max<int64_t>(Hkv * S, 1), 1);
  at::Tensor total = at::zeros({B, n}, dbl);
  for (int64_t b0 = 0; b0 < B; b0 += images) {
    const int64_t nb = std::min(images, B - b0);
    for (int64_t r0 = 0; r0 < R; r0 += rows) {
      const int64_t nr = std::min(rows, R - r0);
      at::Tensor logits = at::matmul(qd.narrow(0, b0, nb).narrow(2, r0, nr), kt.narrow(0, b0, nb)).mul_(scale);
      if (excluded.defined()) logits.masked_fill_(excluded.narrow(0, b0, nb), -kInf);
      // one exp per logit: exp(l - max l) / Σ exp(l - max l) (NaN rows where max l is not finite)
      logits.sub_(std::get<0>(logits.max(-1, true))).exp_();
      total.narrow(0, b0, nb).add_(
          logits.narrow(3, span_start, n).div(logits.sum(-1, true)).sum(at::IntArrayRef{1, 2}));
    }
  }
  return total.div_(double(Hq * Q)).to(at::kFloat);
}

// Per (segment, key head): the logits of the group's query heads and of the value relevance over the segment's
// tokens (one pass over its k and v rows), their softmaxes, and the sums over the group into per-key-head partials;
// then per output token the sums over the key heads, in order, and rho from the token's values.
at::Tensor text_guided_scores_cpu(const at::Tensor& q_relay, const at::Tensor& v_relay, const at::Tensor& k,
                                  const at::Tensor& v, at::IntArrayRef segments, double scale) {
  const int64_t Hkv = k.size(1), D = k.size(3), Hq = q_relay.size(1), group = Hq / Hkv;
  const int64_t G = int64_t(segments.size()) / 3;
  std::vector<int64_t> off(static_cast<size_t>(G + 1), 0);  // output offsets of the segments
  for (int64_t g = 0; g < G; ++g) off[g + 1] = off[g] + segments[3 * g + 2] - segments[3 * g + 1];
  const int64_t total = off[G];
  at::Tensor out = at::empty({total}, k.options().dtype(at::kFloat));
  if (total == 0) return out;
  std::vector<double> rel(static_cast<size_t>(Hkv * total)), sem(static_cast<size_t>(Hkv * total));
  const Reader qr(q_relay), vtr(v_relay), kr(k), vr(v);
  // float32 rows with contiguous elements are read in place by the vectorised loops, others converted a row at a time
  const float* kf = k.scalar_type() == at::kFloat && k.stride(3) == 1 ? k.const_data_ptr<float>() : nullptr;
  const float* vf = v.scalar_type() == at::kFloat && v.stride(3) == 1 ? v.const_data_ptr<float>() : nullptr;

  at::parallel_for(0, G * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> qbuf(static_cast<size_t>(group * D)), vt(static_cast<size_t>(D)), row(static_cast<size_t>(D));
    std::vector<double> logits;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / Hkv, kv = task % Hkv;
      const int64_t b = segments[3 * g], start = segments[3 * g + 1], n = segments[3 * g + 2] - start;
      if (n == 0) continue;
      for (int64_t i = 0; i < group; ++i)
        qr.row(b * q_relay.stride(0) + (kv * group + i) * q_relay.stride(1), q_relay.stride(2), D, &qbuf[i * D]);
      vtr.row(b * v_relay.stride(0) + kv * v_relay.stride(1), v_relay.stride(2), D, vt.data());
      logits.resize(static_cast<size_t>((group + 1) * n));  // the group's relevance logits, then the value logits
      for (int64_t j = 0; j < n; ++j) {
        const int64_t at_k = b * k.stride(0) + kv * k.stride(1) + (start + j) * k.stride(2);
        const int64_t at_v = b * v.stride(0) + kv * v.stride(1) + (start + j) * v.stride(2);
        if (kf) {
          for (int64_t i = 0; i < group; ++i) logits[i * n + j] = scale * dot_f32(kf + at_k, &qbuf[i * D], D);
        } else {
          kr.row(at_k, k.stride(3), D, row.data());
          for (int64_t i = 0; i < group; ++i) logits[i * n + j] = scale * dot(&qbuf[i * D], row.data(), D);
        }
        if (vf) {
          logits[group * n + j] = scale * dot_f32(vf + at_v, vt.data(), D);
        } else {
          vr.row(at_v, v.stride(3), D, row.data());
          logits[group * n + j] = scale * dot(vt.data(), row.data(), D);
        }
      }
      for (int64_t i = 0; i <= group; ++i) softmax(&logits[i * n], n);
      double* rp = &rel[kv * total + off[g]];
      double* sp = &sem[kv * total + off[g]];
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0.0;
        for (int64_t i = 0; i < group; ++i) sum += logits[i * n + j];
        rp[j] = sum;
        sp[j] = logits[group * n + j];
      }
    }
  });

  float* o = out.data_ptr<float>();
  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> mean(static_cast<size_t>(D)), row(static_cast<size_t>(D));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t g = segment_of(off, p), b = segments[3 * g], j = segments[3 * g + 1] + p - off[g];
      double r = 0.0, sm = 0.0;
      std::fill(mean.begin(), mean.end(), 0.0);
      for (int64_t kv = 0; kv < Hkv; ++kv) {
        r += rel[kv * total + p];
        sm += sem[kv * total + p];
        const int64_t at_v = b * v.stride(0) + kv * v.stride(1) + j * v.stride(2);
        if (vf) {
          add_f32(vf + at_v, mean.data(), D);
        } else {
          vr.row(at_v, v.stride(3), D, row.data());
          for (int64_t d = 0; d < D; ++d) mean[d] += row[d];
        }
      }
      double rho = 0.0;
      for (int64_t d = 0; d < D; ++d) rho += std::abs(mean[d] / double(Hkv));
      // Head means: rel over the Hq query heads; sem over the Hq heads, each key head's repeated Hq / Hkv times.
      o[p] = float((r / double(Hq) + sm / double(Hkv)) * rho);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_select_cpu(const at::Tensor& scores,
                                                                           const std::vector<int64_t>& cu,
                                                                           at::IntArrayRef keep,
                                                                           const std::optional<at::Tensor>& protect,
                                                                           at::ScalarType offsets_dtype) {
  const int64_t B = int64_t(cu.size()) - 1;
  const bool* prot = protect.has_value() ? protect->const_data_ptr<bool>() : nullptr;
  const int64_t ps = prot ? protect->stride(0) : 0, ss = scores.stride(0);
  std::vector<int64_t> n_kept(static_cast<size_t>(B)), n_dropped(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    int64_t protected_rows = 0;
    if (prot)
      for (int64_t j = cu[b]; j < cu[b + 1]; ++j) protected_rows += prot[j * ps] ? 1 : 0;
    TORCH_CHECK(keep[b] <= len - protected_rows, "keep[", b, "]=", keep[b], " exceeds the ", len - protected_rows,
                " unprotected rows of image ", b);
    n_kept[b] = keep[b] + protected_rows;
    n_dropped[b] = len - n_kept[b];
  }
  const std::vector<int64_t> kept_off = offsets_of(n_kept), dropped_off = offsets_of(n_dropped);
  const auto index_opts = scores.options().dtype(at::kLong);
  at::Tensor kept = at::empty({kept_off[B]}, index_opts), dropped = at::empty({dropped_off[B]}, index_opts);
  int64_t *kp = kept.data_ptr<int64_t>(), *dp = dropped.data_ptr<int64_t>();
  const Reader sr(scores);

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> value;
    std::vector<int64_t> order;
    std::vector<char> chosen;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = cu[b], len = cu[b + 1] - row, K = keep[b];
      value.resize(static_cast<size_t>(len));
      sr.row(row * ss, ss, len, value.data());  // exact: every float dtype converts to double losslessly
      order.clear();
      for (int64_t j = 0; j < len; ++j)
        if (!prot || !prot[(row + j) * ps]) order.push_back(j);
      // The larger score first, NaN above everything (NaNs among themselves, and equal scores, -0.0 == 0.0, by
      // lower index): torch.sort(descending=True, stable=True).
      auto before = [&](int64_t i, int64_t j) {
        const double x = value[i], y = value[j];
        const bool nx = std::isnan(x), ny = std::isnan(y);
        if (nx || ny) return nx && ny ? i < j : nx;
        if (x != y) return x > y;
        return i < j;
      };
      if (K < int64_t(order.size())) std::nth_element(order.begin(), order.begin() + K, order.end(), before);
      chosen.assign(static_cast<size_t>(len), 0);
      for (int64_t i = 0; i < K; ++i) chosen[order[i]] = 1;
      int64_t nk = kept_off[b], nd = dropped_off[b];
      for (int64_t j = 0; j < len; ++j) {
        if (chosen[j] || (prot && prot[(row + j) * ps])) kp[nk++] = row + j;
        else dp[nd++] = row + j;
      }
    }
  });
  return {kept, dropped, offsets_tensor(kept_off, offsets_dtype), offsets_tensor(dropped_off, offsets_dtype)};
}

// Each dropped row's target (the kept row of its image of largest cosine similarity, the first on ties; NaN above
// every number, as torch.argmax), then per kept row its size-weighted sum with the rows merged into it, taken in
// ascending order of their positions in `dropped` (a stable bucket sort of the targets): deterministic.
std::tuple<at::Tensor, at::Tensor> merge_nearest_cpu(const at::Tensor& hidden, const at::Tensor& keys,
                                                     const at::Tensor& kept, const at::Tensor& dropped,
                                                     const at::Tensor& kept_cu, const at::Tensor& dropped_cu,
                                                     const std::optional<at::Tensor>& sizes) {
  const int64_t T = hidden.size(0), C = hidden.size(1), Ck = keys.size(1), K = kept.size(0), M = dropped.size(0);
  const std::vector<int64_t> kc = host_values(kept_cu), dc = host_values(dropped_cu);
  const int64_t B = int64_t(kc.size()) - 1;
  TORCH_CHECK(kc[0] == 0 && dc[0] == 0, "kept_cu and dropped_cu must start at 0, got ", kc[0], " and ", dc[0]);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(kc[b + 1] >= kc[b] && dc[b + 1] >= dc[b], "kept_cu and dropped_cu must not decrease (image ", b, ")");
    TORCH_CHECK(dc[b + 1] == dc[b] || kc[b + 1] > kc[b], "image ", b,
                " has dropped rows but keeps none: they have nowhere to merge");
  }
  TORCH_CHECK(kc[B] == K && dc[B] == M, "kept_cu and dropped_cu must end at the kept (", K, ") and dropped (", M,
              ") counts, got ", kc[B], " and ", dc[B]);
  const int64_t *kp = kept.const_data_ptr<int64_t>(), *dp = dropped.const_data_ptr<int64_t>();
  const int64_t kst = kept.stride(0), dst = dropped.stride(0);
  for (int64_t i = 0; i < K; ++i)
    TORCH_CHECK(kp[i * kst] >= 0 && kp[i * kst] < T, "kept[", i, "]=", kp[i * kst], " is out of range [0, ", T, ")");
  for (int64_t p = 0; p < M; ++p)
    TORCH_CHECK(dp[p * dst] >= 0 && dp[p * dst] < T, "dropped[", p, "]=", dp[p * dst], " is out of range [0, ", T,
                ")");
  const Reader hr(hidden), keyr(keys);
  const std::optional<Reader> sr = sizes.has_value() ? std::optional<Reader>(Reader(*sizes)) : std::nullopt;
  const int64_t sst = sizes.has_value() ? sizes->stride(0) : 0;
  auto size_of = [&](int64_t r) { return sr ? sr->at(r * sst) : 1.0; };

  // The kept rows' unit keys (double, and rounded to float32), then each dropped row's target (a position in kept):
  // float32 GEMM similarities pick the candidates, within 2 E of the row's largest, E = (Ck + 4) 2^-23 bounding a
  // float32 similarity's error (unit vectors rounded to float32, then Ck products summed in float32); the double
  // cosines of those candidates decide, exactly as over all of them (a row with a NaN similarity: all of them); a
  // single candidate is the argmax without them.
  std::vector<double> unit(static_cast<size_t>(K * Ck));
  at::Tensor unit_f = at::empty({K, Ck}, keys.options().dtype(at::kFloat));
  at::Tensor dropped_f = at::empty({M, Ck}, keys.options().dtype(at::kFloat));
  float *uf = unit_f.data_ptr<float>(), *df = dropped_f.data_ptr<float>();
  at::parallel_for(0, K, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      keyr.row(kp[i * kst] * keys.stride(0), keys.stride(1), Ck, &unit[i * Ck]);
      normalize(&unit[i * Ck], Ck);
      for (int64_t c = 0; c < Ck; ++c) uf[i * Ck + c] = float(unit[i * Ck + c]);
    }
  });
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> x(static_cast<size_t>(Ck));
    for (int64_t p = begin; p < end; ++p) {
      keyr.row(dp[p * dst] * keys.stride(0), keys.stride(1), Ck, x.data());
      normalize(x.data(), Ck);
      for (int64_t c = 0; c < Ck; ++c) df[p * Ck + c] = float(x[c]);
    }
  });
  const double margin = 2.0 * double(Ck + 4) * std::ldexp(1.0, -23);
  std::vector<int64_t> target(static_cast<size_t>(M));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t k0 = kc[b], nk = kc[b + 1] - k0, d0 = dc[b], nd = dc[b + 1] - d0;
    if (nd == 0) continue;
    const at::Tensor sims = at::mm(dropped_f.narrow(0, d0, nd), unit_f.narrow(0, k0, nk).t()).contiguous();
    const float* sp = sims.const_data_ptr<float>();
    at::parallel_for(0, nd, 16, [&](int64_t begin, int64_t end) {
      std::vector<double> x(static_cast<size_t>(Ck));
      for (int64_t r = begin; r < end; ++r) {
        const float* row = sp + r * nk;
        float top = row[0];
        bool nan = false;
        for (int64_t i = 0; i < nk; ++i) {
          nan = nan || std::isnan(row[i]);
          top = std::max(top, row[i]);
        }
        const double floor = nan ? -kInf : double(top) - margin;
        const int64_t p = d0 + r;
        int64_t candidates = 0, only = 0;
        for (int64_t i = 0; i < nk && !nan; ++i)
          if (double(row[i]) >= floor) ++candidates, only = i;
        if (candidates == 1) {  // the only one within the margin: the exact argmax
          target[p] = k0 + only;
          continue;
        }
        keyr.row(dp[p * dst] * keys.stride(0), keys.stride(1), Ck, x.data());
        normalize(x.data(), Ck);
        int64_t best = -1;
        double best_sim = 0.0;
        for (int64_t i = 0; i < nk; ++i) {
          if (!nan && double(row[i]) < floor) continue;
          const double sim = dot(x.data(), &unit[(k0 + i) * Ck], Ck);
          const bool better = best < 0 || (std::isnan(sim) ? !std::isnan(best_sim)
                                                           : !std::isnan(best_sim) && sim > best_sim);
          if (better) best = k0 + i, best_sim = sim;
        }
        target[p] = best;
      }
    });
  }

  // The dropped positions merged into each kept row, ascending: list[first[i] .. first[i + 1]].
  std::vector<int64_t> first(static_cast<size_t>(K + 1), 0), list(static_cast<size_t>(M));
  for (int64_t p = 0; p < M; ++p) ++first[target[p] + 1];
  for (int64_t i = 0; i < K; ++i) first[i + 1] += first[i];
  {
    std::vector<int64_t> cursor(first.begin(), first.end() - 1);
    for (int64_t p = 0; p < M; ++p) list[cursor[target[p]]++] = p;
  }

  at::Tensor merged = at::empty({K, C}, hidden.options());
  at::Tensor sizes_out = at::empty({K}, hidden.options().dtype(at::kFloat));
  float* so = sizes_out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "flowcut_native_merge_nearest", [&] {
    scalar_t* out = merged.data_ptr<scalar_t>();
    at::parallel_for(0, K, 8, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(static_cast<size_t>(C)), row(static_cast<size_t>(C));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = kp[i * kst];
        double w = size_of(r);
        hr.row(r * hidden.stride(0), hidden.stride(1), C, acc.data());
        for (int64_t c = 0; c < C; ++c) acc[c] *= w;
        for (int64_t e = first[i]; e < first[i + 1]; ++e) {
          const int64_t j = dp[list[e] * dst];
          const double sj = size_of(j);
          hr.row(j * hidden.stride(0), hidden.stride(1), C, row.data());
          for (int64_t c = 0; c < C; ++c) acc[c] += sj * row[c];
          w += sj;
        }
        for (int64_t c = 0; c < C; ++c) out[i * C + c] = static_cast<scalar_t>(acc[c] / w);
        so[i] = float(w);
      }
    });
  });
  return {merged, sizes_out};
}

}  // namespace flowcut
