// C++ CPU kernels of flow_scores and select_gather (docs/semantics.md), parallel over images and heads. Dense and
// packed (varlen) batches share one body: every image is a segment of rows of a packed row axis (a dense batch
// of B images of S tokens is the uniform case, image b in rows b S .. b S + S), read through its tensor's strides.
// Inputs are read in place, each in its own dtype; every reduction accumulates in double (dot products over the
// head dim in 8 independent lanes, which vectorise).
//
// flow_scores stays exact when the relay row takes almost all of a head's softmax mass (A / sum A would be
// 0 / 0): per head h with logits l_h (relay: scale * r_h . k_h[j]; value: v_h[0] . v_h[j]), lse_cand_h is the
// log-sum-exp over the candidates and lse_all_h = logaddexp(lse_cand_h, l_h[0]) in the CLS variant (= lse_cand_h
// in the mean variant). Then A[j] = mean_h exp(l_h[j] - lse_all_h) (which may underflow: its true value), and
// p = A / sum A = sum_h w_h exp(l_h[j] - lse_cand_h) / sum_h w_h with w_h = exp(d_h - max_h d_h),
// d_h = lse_cand_h - lse_all_h; the same p for the value logits gives the semantic term. Hn is computed without
// cancellation (normalised_entropy).
#include "flowcut_cpu.h"

#include "dot_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace flowcut {

// Function clones for wider vector units, picked at load time by the CPU (GCC on x86-64 Linux; elsewhere the one
// baseline body): the double-lane loops below then run 4 or 8 lanes per instruction instead of 2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FLOWCUT_CPU_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define FLOWCUT_CPU_CLONES
#endif

FLOWCUT_CPU_CLONES double dot_f32(const float* x, const double* y, int64_t n) {
  double lanes[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int u = 0; u < 8; ++u) lanes[u] += double(x[d + u]) * y[d + u];
  for (; d < n; ++d) lanes[d % 8] += double(x[d]) * y[d];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

FLOWCUT_CPU_CLONES void add_f32(const float* x, double* acc, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += double(x[d]);
}

namespace {

// Image b of a batch: rows row .. row + len of the packed row axis, and its candidates at cand .. cand + len - first
// of the packed candidate axis.
struct Image {
  int64_t row, len, cand;
};

std::vector<Image> images_of(const std::vector<int64_t>& cu, int64_t first) {
  std::vector<Image> images(cu.size() - 1);
  for (size_t b = 0; b < images.size(); ++b) images[b] = {cu[b], cu[b + 1] - cu[b], cu[b] - int64_t(b) * first};
  return images;
}

// The offsets 0, S, 2 S, ..., B S of a dense batch.
std::vector<int64_t> dense_offsets(int64_t B, int64_t S) {
  std::vector<int64_t> cu(B + 1);
  for (int64_t b = 0; b <= B; ++b) cu[b] = b * S;
  return cu;
}

// The image whose candidates include packed candidate c.
int64_t image_of(const std::vector<Image>& images, int64_t c) {
  const auto after = std::upper_bound(images.begin(), images.end(), c,
                                      [](int64_t x, const Image& img) { return x < img.cand; });
  return int64_t(after - images.begin()) - 1;
}

// The image holding packed row r.
int64_t image_of_row(const std::vector<Image>& images, int64_t r) {
  const auto after = std::upper_bound(images.begin(), images.end(), r,
                                      [](int64_t x, const Image& img) { return x < img.row; });
  return int64_t(after - images.begin()) - 1;
}

// Where packed row r of image b lies in a tensor: element offset b * skew + r * row. A packed tensor (T, ...) has
// skew 0; a dense one (B, S, ...) skew = stride(0) - S * stride(row axis), so that packed row b S + j is row j of
// image b.
struct Rows {
  int64_t skew, row;
  int64_t operator()(int64_t b, int64_t r) const { return b * skew + r * row; }
};

// t's rows along dim `dim`; `dense`: t has an image axis 0 in front.
Rows rows_of(const at::Tensor& t, int64_t dim, bool dense) {
  return {dense ? t.stride(0) - t.size(dim) * t.stride(dim) : 0, t.stride(dim)};
}

// k or v, (B, H, S, D) dense or (T, H, D) packed: head h of packed row r of image b at at(b, r, h), its elements
// `elem` apart.
template <typename T>
struct KV {
  const T* data;
  Rows rows;
  int64_t head, elem;
  const T* at(int64_t b, int64_t r, int64_t h) const { return data + rows(b, r) + h * head; }
};

template <typename T>
KV<T> kv_view(const at::Tensor& t, bool dense) {
  return {t.const_data_ptr<T>(), rows_of(t, dense ? 2 : 0, dense), t.stride(1), t.stride(t.dim() - 1)};
}

// x[0..n) (stride `stride`, any dtype) . y[0..n), accumulated in 8 double lanes.
template <typename T>
double dot(const T* x, int64_t stride, const double* y, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return dot_f32(x, y, n);
  }
  double lanes[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  if (stride == 1) {
    for (; d + 8 <= n; d += 8)
      for (int u = 0; u < 8; ++u) lanes[u] += double(x[d + u]) * y[d + u];
  }
  for (; d < n; ++d) lanes[d % 8] += double(x[d * stride]) * y[d];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// acc[0..n) += x[0..n) (stride `stride`, any dtype).
template <typename T>
void add_row(const T* x, int64_t stride, double* acc, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1) return add_f32(x, acc, n);
  }
  for (int64_t d = 0; d < n; ++d) acc[d] += double(x[d * stride]);
}

double logaddexp(double x, double y) { return std::max(x, y) + std::log1p(std::exp(-std::abs(x - y))); }

// One head's softmax statistics of its S logits l (the relay row first when first = 1), for its N candidates:
// all[n] = exp(l[n + first] - lse_all), cand[n] = exp(l[n + first] - lse_cand), from one exp per candidate,
// e[n] = exp(l[n + first] - top) with top the candidates' largest logit: cand[n] = e[n] / sum e and
// all[n] = e[n] exp(top - lse_all) (which underflows only where exp(l - lse_all) does). Returns
// d = lse_cand - lse_all.
double head_softmax(const double* l, int64_t S, int64_t first, double* all, double* cand) {
  const int64_t N = S - first;
  const double top = *std::max_element(l + first, l + S);
  double total = 0.0;
  for (int64_t n = 0; n < N; ++n) total += (cand[n] = std::exp(l[n + first] - top));
  const double lse_cand = top + std::log(total);
  const double lse_all = first ? logaddexp(lse_cand, l[0]) : lse_cand;
  const double to_all = std::exp(top - lse_all), inv_total = 1.0 / total;
  for (int64_t n = 0; n < N; ++n) {
    if (all) all[n] = cand[n] * to_all;
    cand[n] *= inv_total;
  }
  return lse_cand - lse_all;
}

// Per image, in place: d_h -> w_h / sum_h w_h with w_h = exp(d_h - max_h d_h).
void head_weights(std::vector<double>& d, int64_t B, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    double* w = d.data() + b * H;
    const double top = *std::max_element(w, w + H);
    double total = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      w[h] = std::exp(w[h] - top);
      total += w[h];
    }
    for (int64_t h = 0; h < H; ++h) w[h] /= total;
  }
}

// Per image and head, image b's block of H N_b values at H cand_b, head-major: attn_all (softmax over all the
// image's tokens) and attn_cand (over its candidates) of the relay logits, sem_cand of the value logits when
// wanted; per (b, h) the weights of head_weights for the relay (w_attn) and value (w_sem) terms; and per packed
// row rho, the L1 norm of its head-mean value.
struct HeadSignals {
  std::vector<double> attn_all, attn_cand, sem_cand, w_attn, w_sem, rho;
};

template <typename T>
void head_signals(const double* q, const KV<T>& k, const KV<T>& v, const std::vector<Image>& images, int64_t Tc,
                  int64_t H, int64_t D, int64_t first, double scale, bool want_semantic, HeadSignals& out) {
  const int64_t B = int64_t(images.size());
  out.attn_all.resize(H * Tc), out.attn_cand.resize(H * Tc), out.w_attn.resize(B * H);
  out.sem_cand.resize(want_semantic ? H * Tc : 0), out.w_sem.resize(want_semantic ? B * H : 0);
  // The relay logits token by token (a token's heads are neighbours in a HF layout: k is read once, in order), then
  // the value logits and rho the same way over v (one tensor streamed at a time), image b's head h at
  // H row_b + h len_b + j of the packed rows; then each head's softmax statistics.
  const int64_t rows = images.back().row + images.back().len;
  out.rho.resize(rows);
  std::vector<double> v0(want_semantic ? B * H * D : 0), attn_logits(H * rows);
  std::vector<double> sem_logits(want_semantic ? H * rows : 0);
  for (int64_t b = 0; want_semantic && b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) v0[(b * H + h) * D + d] = double(v.at(b, images[b].row, h)[d * v.elem]);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = image_of_row(images, r);
      const Image& img = images[b];
      const int64_t o = H * img.row + r - img.row;
      for (int64_t h = 0; h < H; ++h)
        attn_logits[o + h * img.len] = scale * dot(k.at(b, r, h), k.elem, q + (b * H + h) * D, D);
    }
  });
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<double> mean_v(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = image_of_row(images, r);
      const Image& img = images[b];
      const int64_t o = H * img.row + r - img.row;
      for (int64_t h = 0; want_semantic && h < H; ++h)
        sem_logits[o + h * img.len] = dot(v.at(b, r, h), v.elem, &v0[(b * H + h) * D], D);
      std::fill(mean_v.begin(), mean_v.end(), 0.0);
      for (int64_t h = 0; h < H; ++h) add_row(v.at(b, r, h), v.elem, mean_v.data(), D);
      double l1 = 0.0;
      for (int64_t d = 0; d < D; ++d) l1 += std::abs(mean_v[d] / double(H));
      out.rho[r] = l1;
    }
  });
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const Image& img = images[b];
      const int64_t o = H * img.cand + h * (img.len - first), l = H * img.row + h * img.len;
      out.w_attn[bh] = head_softmax(&attn_logits[l], img.len, first, &out.attn_all[o], &out.attn_cand[o]);
      if (want_semantic) out.w_sem[bh] = head_softmax(&sem_logits[l], img.len, first, nullptr, &out.sem_cand[o]);
    }
  });
  head_weights(out.w_attn, B, H);
  if (want_semantic) head_weights(out.w_sem, B, H);
}

// Per packed candidate: A (head mean over all the image's tokens), p = A / sum A and p_sem (the semantic term,
// normalised over the candidates), and rho = L1 norm of the head-mean value.
void candidate_signals(const HeadSignals& hs, const std::vector<Image>& images, int64_t H, int64_t first,
                       bool want_semantic, std::vector<double>& A, std::vector<double>& p,
                       std::vector<double>& p_sem, std::vector<double>& rho) {
  at::parallel_for(0, int64_t(A.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = image_of(images, c);
      const Image& img = images[b];
      const int64_t N = img.len - first, n = c - img.cand, r = img.row + first + n;
      double a = 0.0, pa = 0.0, ps = 0.0;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t bh = b * H + h, o = H * img.cand + h * N + n;
        a += hs.attn_all[o];
        pa += hs.w_attn[bh] * hs.attn_cand[o];
        if (want_semantic) ps += hs.w_sem[bh] * hs.sem_cand[o];
      }
      A[c] = a / double(H);
      p[c] = pa;
      p_sem[c] = ps;
      rho[c] = hs.rho[r];
    }
  });
}

// Hn = (-sum p ln p) / ln N of one image's N candidates (0 ln 0 = 0; 0 when N = 1), without cancellation: a p_j <= 1/2
// adds -p_j ln p_j as it is; a p_m > 1/2 (one-hot rows put 1 - 1e-15 there, which rounds to 1) takes
// ln p_m = log1p(-r), r = the sum of the other p_j (its exact complement), so its share -p_m ln p_m ~ r is kept. If
// rounding leaves two values above 1/2, their own logs are used.
double normalised_entropy(const double* p, int64_t N) {
  if (N <= 1) return 0.0;
  double ent_small = 0.0, ent_big = 0.0, rest = 0.0, large = 0.0;
  int64_t n_big = 0;
  for (int64_t n = 0; n < N; ++n) {
    const double x = p[n];
    const double term = x > 0.0 ? -x * std::log(x) : 0.0;
    if (x > 0.5) {
      ent_big += term, large += x, ++n_big;
    } else {
      ent_small += term, rest += x;
    }
  }
  const double h = ent_small + (n_big == 1 ? -large * std::log1p(-std::min(rest, 0.5)) : ent_big);
  return h / std::log(double(N));
}

// flow_scores of the images cu[b] .. cu[b + 1] of k and v, (B, H, S, D) when dense, else (T, H, D); prev (B, N)
// or (T_c,) alike. Returns cum (T_c,), entropy (B,), attn (T_c,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_images(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    const std::vector<int64_t>& cu, bool dense, double scale, bool has_cls, bool semantic) {
  const int64_t first = has_cls ? 1 : 0, B = int64_t(cu.size()) - 1, Tc = cu.back() - B * first;
  const int64_t H = k.size(1), D = k.size(-1);
  const bool want_semantic = has_cls && semantic;
  const std::vector<Image> images = images_of(cu, first);
  const at::Tensor q = q_relay.to(at::kDouble).contiguous();  // (B, H, D), exact: tiny next to k and v

  HeadSignals hs;
  std::vector<double> A(Tc), p(Tc), p_sem(Tc), rho(Tc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "flowcut_native_flow_scores", [&] {
    const auto kv = kv_view<scalar_t>(k, dense), vv = kv_view<scalar_t>(v, dense);
    head_signals(q.const_data_ptr<double>(), kv, vv, images, Tc, H, D, first, scale, want_semantic, hs);
    candidate_signals(hs, images, H, first, want_semantic, A, p, p_sem, rho);
  });

  auto opts = k.options().dtype(at::kFloat);
  at::Tensor cum = at::empty({Tc}, opts), entropy = at::empty({B}, opts), attn = at::empty({Tc}, opts);
  float *cum_p = cum.data_ptr<float>(), *ent_p = entropy.data_ptr<float>(), *attn_p = attn.data_ptr<float>();
  const float* prev_p = prev.has_value() ? prev->const_data_ptr<float>() : nullptr;
  const Rows prev_rows = prev.has_value() ? rows_of(*prev, dense ? 1 : 0, dense) : Rows{0, 0};

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = images[b].cand, N = images[b].len - first;
      for (int64_t c = c0; c < c0 + N; ++c) {
        double score;
        if (has_cls) score = (want_semantic ? p[c] + p_sem[c] : p[c]) * rho[c];
        else score = A[c] * rho[c];
        cum_p[c] = float(prev_p ? 0.5 * double(prev_p[prev_rows(b, c)]) + 0.5 * score : score);
        attn_p[c] = float(A[c]);
      }
      ent_p[b] = float(normalised_entropy(p.data() + c0, N));
    }
  });
  return {cum, entropy, attn};
}

// True when candidate i ranks before candidate j: the larger score first (NaN above everything, as
// torch.sort orders it), equal scores (-0.0 == 0.0) by lower index.
bool ranks_before(const float* c, int64_t stride, int64_t i, int64_t j) {
  const float x = c[i * stride], y = c[j * stride];
  const bool nx = std::isnan(x), ny = std::isnan(y);
  if (nx || ny) return nx && ny ? i < j : nx;
  if (x != y) return x > y;
  return i < j;
}

// select_gather of the images cu[b] .. cu[b + 1] of hidden, (B, S, C) when dense, else (T, C); cum and index_map
// (B, N) or (T_c,) alike; keep[b] rows of image b. Returns hidden_out (sum keep, C), cum_out and index_out
// (sum K_b,), image after image.
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_images(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, const std::vector<int64_t>& cu,
    at::IntArrayRef keep, bool dense, bool has_cls) {
  const int64_t first = has_cls ? 1 : 0, B = int64_t(keep.size()), C = hidden.size(-1);
  const std::vector<Image> images = images_of(cu, first);
  std::vector<int64_t> out_row(B + 1, 0);  // image b's output rows: out_row[b] .. out_row[b + 1]
  for (int64_t b = 0; b < B; ++b) out_row[b + 1] = out_row[b] + keep[b];
  const int64_t rows_out = out_row[B], kept = rows_out - B * first;
  at::Tensor hidden_out = at::empty({rows_out, C}, hidden.options());
  at::Tensor cum_out = at::empty({kept}, cum.options());
  at::Tensor index_out = at::empty({kept}, index_map.options());
  const int64_t dim = dense ? 1 : 0;
  const Rows hidden_rows = rows_of(hidden, dim, dense), cum_rows = rows_of(cum, dim, dense);
  const Rows index_rows = rows_of(index_map, dim, dense);

  // src[o]: the element offset in hidden of output row o's source row (the relay row first in the CLS variant).
  std::vector<int64_t> src(rows_out);
  const float* c = cum.const_data_ptr<float>();
  const int64_t* idx = index_map.const_data_ptr<int64_t>();
  float* c_out = cum_out.data_ptr<float>();
  int64_t* i_out = index_out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    for (int64_t b = begin; b < end; ++b) {
      const Image& img = images[b];
      const int64_t N = img.len - first, K = keep[b] - first, o = out_row[b], oc = o - b * first;
      const float* cb = c + cum_rows(b, img.cand);
      order.resize(N);
      std::iota(order.begin(), order.end(), int64_t{0});
      auto before = [&](int64_t i, int64_t j) { return ranks_before(cb, cum_rows.row, i, j); };
      if (K < N) std::nth_element(order.begin(), order.begin() + K, order.end(), before);
      std::sort(order.begin(), order.begin() + K);  // the kept candidates in ascending order
      if (has_cls) src[o] = hidden_rows(b, img.row);
      for (int64_t n = 0; n < K; ++n) {
        const int64_t j = order[n];
        src[o + first + n] = hidden_rows(b, img.row + first + j);
        c_out[oc + n] = cb[j * cum_rows.row];
        i_out[oc + n] = idx[index_rows(b, img.cand + j)];
      }
    }
  });

  // Copy the rows, byte-wise whatever the dtype: memcpy when a row is contiguous.
  const auto elem = int64_t(hidden.element_size());
  const char* from0 = static_cast<const char*>(hidden.const_data_ptr());
  char* to0 = static_cast<char*>(hidden_out.data_ptr());
  const int64_t hc = hidden.stride(-1) * elem;
  at::parallel_for(0, rows_out, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const char* from = from0 + src[o] * elem;
      char* to = to0 + o * C * elem;
      if (hc == elem) {
        std::memcpy(to, from, size_t(C * elem));
      } else {
        for (int64_t x = 0; x < C; ++x) std::memcpy(to + x * elem, from + x * hc, size_t(elem));
      }
    }
  });
  return {hidden_out, cum_out, index_out};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_cpu(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    double scale, bool has_cls, bool semantic) {
  const int64_t B = k.size(0), S = k.size(2), N = S - (has_cls ? 1 : 0);
  auto [cum, entropy, attn] =
      flow_scores_images(q_relay, k, v, prev, dense_offsets(B, S), true, scale, has_cls, semantic);
  return {cum.view({B, N}), entropy, attn.view({B, N})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_varlen_cpu(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& cu,
    const std::optional<at::Tensor>& prev, double scale, bool has_cls, bool semantic) {
  return flow_scores_images(q_relay, k, v, prev, cu, false, scale, has_cls, semantic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_cpu(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, int64_t keep, bool has_cls) {
  const int64_t B = hidden.size(0), S = hidden.size(1), K = keep - (has_cls ? 1 : 0);
  auto [hidden_out, cum_out, index_out] = select_gather_images(
      hidden, cum, index_map, dense_offsets(B, S), std::vector<int64_t>(B, keep), true, has_cls);
  return {hidden_out.view({B, keep, hidden.size(2)}), cum_out.view({B, K}), index_out.view({B, K})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_varlen_cpu(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, const std::vector<int64_t>& cu,
    at::IntArrayRef keep, bool has_cls) {
  return select_gather_images(hidden, cum, index_map, cu, keep, false, has_cls);
}

}  // namespace flowcut
