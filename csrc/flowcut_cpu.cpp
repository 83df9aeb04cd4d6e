// C++ CPU kernels of flow_scores and select_gather (SPEC.md), parallel over images and heads.
// Inputs are read in place through their strides, each in its own dtype; every reduction accumulates in double
// (dot products over the head dim in 8 independent lanes, which vectorise).
//
// flow_scores stays exact when the relay row takes almost all of a head's softmax mass (A / sum A would be
// 0 / 0): per head h with logits l_h (relay: scale * r_h . k_h[j]; value: v_h[0] . v_h[j]), lse_cand_h is the
// log-sum-exp over the candidates and lse_all_h = logaddexp(lse_cand_h, l_h[0]) in the CLS variant (= lse_cand_h
// in the mean variant). Then A[j] = mean_h exp(l_h[j] - lse_all_h) (which may underflow: its true value), and
// p = A / sum A = sum_h w_h exp(l_h[j] - lse_cand_h) / sum_h w_h with w_h = exp(d_h - max_h d_h),
// d_h = lse_cand_h - lse_all_h; the same p for the value logits gives the semantic term.
#include "flowcut_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace flowcut {
namespace {

// Strided view of a (B, H, S, D) tensor.
template <typename T>
struct View4 {
  const T* data;
  int64_t sb, sh, ss, sd;
  const T& operator()(int64_t b, int64_t h, int64_t s, int64_t d) const {
    return data[b * sb + h * sh + s * ss + d * sd];
  }
};

template <typename T>
View4<T> view4(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// x[0..n) (stride `stride`, any dtype) . y[0..n), accumulated in 8 double lanes.
template <typename T>
double dot(const T* x, int64_t stride, const double* y, int64_t n) {
  double lanes[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  if (stride == 1) {
    for (; d + 8 <= n; d += 8)
      for (int u = 0; u < 8; ++u) lanes[u] += double(x[d + u]) * y[d + u];
  }
  for (; d < n; ++d) lanes[d % 8] += double(x[d * stride]) * y[d];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

double logsumexp(const double* x, int64_t n) {
  const double top = *std::max_element(x, x + n);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += std::exp(x[i] - top);
  return top + std::log(total);
}

double logaddexp(double x, double y) { return std::max(x, y) + std::log1p(std::exp(-std::abs(x - y))); }

// One head's softmax statistics of its S logits l (the relay row first when first = 1), for its N candidates:
// all[n] = exp(l[n + first] - lse_all), cand[n] = exp(l[n + first] - lse_cand). Returns d = lse_cand - lse_all.
double head_softmax(const double* l, int64_t S, int64_t first, double* all, double* cand) {
  const int64_t N = S - first;
  const double lse_cand = logsumexp(l + first, N);
  const double lse_all = first ? logaddexp(lse_cand, l[0]) : lse_cand;
  for (int64_t n = 0; n < N; ++n) {
    if (all) all[n] = std::exp(l[n + first] - lse_all);
    cand[n] = std::exp(l[n + first] - lse_cand);
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

// Per head and image, (b, h, n) layout: attn_all (softmax over all S tokens) and attn_cand (over the
// candidates) of the relay logits, sem_cand of the value logits when wanted; and per (b, h) the weights of
// head_weights for the relay (w_attn) and value (w_sem) terms.
struct HeadSignals {
  std::vector<double> attn_all, attn_cand, sem_cand, w_attn, w_sem;
};

template <typename T>
void head_signals(const double* q, const View4<T>& k, const View4<T>& v, int64_t B, int64_t H, int64_t S,
                  int64_t D, int64_t first, double scale, bool want_semantic, HeadSignals& out) {
  const int64_t N = S - first;
  out.attn_all.resize(B * H * N), out.attn_cand.resize(B * H * N), out.w_attn.resize(B * H);
  out.sem_cand.resize(want_semantic ? B * H * N : 0), out.w_sem.resize(want_semantic ? B * H : 0);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> logits(S), v0(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const double* qh = q + bh * D;  // q is contiguous (B, H, D)
      for (int64_t j = 0; j < S; ++j) logits[j] = scale * dot(&k(b, h, j, 0), k.sd, qh, D);
      out.w_attn[bh] = head_softmax(logits.data(), S, first, &out.attn_all[bh * N], &out.attn_cand[bh * N]);
      if (!want_semantic) continue;
      for (int64_t d = 0; d < D; ++d) v0[d] = double(v(b, h, 0, d));
      for (int64_t j = 0; j < S; ++j) logits[j] = dot(&v(b, h, j, 0), v.sd, v0.data(), D);
      out.w_sem[bh] = head_softmax(logits.data(), S, first, nullptr, &out.sem_cand[bh * N]);
    }
  });
  head_weights(out.w_attn, B, H);
  if (want_semantic) head_weights(out.w_sem, B, H);
}

// Per candidate: A (head mean over all S tokens), p = A / sum A and p_sem (the semantic term, normalised
// over the candidates), and rho = L1 norm of the head-mean value.
template <typename T>
void candidate_signals(const View4<T>& v, const HeadSignals& hs, int64_t B, int64_t H, int64_t S, int64_t D,
                       int64_t first, bool want_semantic, std::vector<double>& A, std::vector<double>& p,
                       std::vector<double>& p_sem, std::vector<double>& rho) {
  const int64_t N = S - first;
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> mean_v(D);
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N, n = bn % N, j = n + first;
      double a = 0.0, pa = 0.0, ps = 0.0;
      std::fill(mean_v.begin(), mean_v.end(), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        const int64_t bh = b * H + h;
        a += hs.attn_all[bh * N + n];
        pa += hs.w_attn[bh] * hs.attn_cand[bh * N + n];
        if (want_semantic) ps += hs.w_sem[bh] * hs.sem_cand[bh * N + n];
        for (int64_t d = 0; d < D; ++d) mean_v[d] += double(v(b, h, j, d));
      }
      double l1 = 0.0;
      for (int64_t d = 0; d < D; ++d) l1 += std::abs(mean_v[d] / double(H));
      A[bn] = a / double(H);
      p[bn] = pa;
      p_sem[bn] = ps;
      rho[bn] = l1;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_scores_cpu(
    const at::Tensor& q_relay, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& prev,
    double scale, bool has_cls, bool semantic) {
  const int64_t B = k.size(0), H = k.size(1), S = k.size(2), D = k.size(3);
  const int64_t first = has_cls ? 1 : 0, N = S - first;
  const bool want_semantic = has_cls && semantic;
  const at::Tensor q = q_relay.to(at::kDouble).contiguous();  // (B, H, D), exact: tiny next to k and v

  HeadSignals hs;
  std::vector<double> A(B * N), p(B * N), p_sem(B * N), rho(B * N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "flowcut_native_flow_scores", [&] {
    const auto kv = view4<scalar_t>(k), vv = view4<scalar_t>(v);
    head_signals(q.const_data_ptr<double>(), kv, vv, B, H, S, D, first, scale, want_semantic, hs);
    candidate_signals(vv, hs, B, H, S, D, first, want_semantic, A, p, p_sem, rho);
  });

  auto opts = k.options().dtype(at::kFloat);
  at::Tensor cum = at::empty({B, N}, opts), entropy = at::empty({B}, opts), attn = at::empty({B, N}, opts);
  float *cum_p = cum.data_ptr<float>(), *ent_p = entropy.data_ptr<float>(), *attn_p = attn.data_ptr<float>();
  const float* prev_p = prev.has_value() ? prev->const_data_ptr<float>() : nullptr;
  const int64_t psb = prev.has_value() ? prev->stride(0) : 0, psn = prev.has_value() ? prev->stride(1) : 0;

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double ent = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t bn = b * N + n;
        if (p[bn] > 0.0) ent -= p[bn] * std::log(p[bn]);
        double score;
        if (has_cls) score = (want_semantic ? p[bn] + p_sem[bn] : p[bn]) * rho[bn];
        else score = A[bn] * rho[bn];
        const double c = prev_p ? 0.5 * double(prev_p[b * psb + n * psn]) + 0.5 * score : score;
        cum_p[bn] = float(c);
        attn_p[bn] = float(A[bn]);
      }
      ent_p[b] = N > 1 ? float(ent / std::log(double(N))) : 0.0f;
    }
  });
  return {cum, entropy, attn};
}

namespace {

// True when candidate i ranks before candidate j: the larger score first (NaN above everything, as
// torch.sort orders it), equal scores (-0.0 == 0.0) by lower index.
bool ranks_before(const float* c, int64_t stride, int64_t i, int64_t j) {
  const float x = c[i * stride], y = c[j * stride];
  const bool nx = std::isnan(x), ny = std::isnan(y);
  if (nx || ny) return nx && ny ? i < j : nx;
  if (x != y) return x > y;
  return i < j;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_gather_cpu(
    const at::Tensor& hidden, const at::Tensor& cum, const at::Tensor& index_map, int64_t keep, bool has_cls) {
  const int64_t B = hidden.size(0), C = hidden.size(2);
  const int64_t first = has_cls ? 1 : 0, N = cum.size(1), K = keep - first;
  at::Tensor hidden_out = at::empty({B, keep, C}, hidden.options());
  at::Tensor cum_out = at::empty({B, K}, cum.options());
  at::Tensor index_out = at::empty({B, K}, index_map.options());
  if (B == 0 || keep == 0) return {hidden_out, cum_out, index_out};

  // rows[b][r]: the hidden row that becomes output row r (the relay row 0 first in the CLS variant).
  std::vector<int64_t> rows(B * keep);
  const float* c = cum.const_data_ptr<float>();
  const int64_t* idx = index_map.const_data_ptr<int64_t>();
  float* c_out = cum_out.data_ptr<float>();
  int64_t* i_out = index_out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(N);
    for (int64_t b = begin; b < end; ++b) {
      const float* cb = c + b * cum.stride(0);
      const int64_t cs = cum.stride(1);
      std::iota(order.begin(), order.end(), int64_t{0});
      auto before = [&](int64_t i, int64_t j) { return ranks_before(cb, cs, i, j); };
      if (K < N) std::nth_element(order.begin(), order.begin() + K, order.end(), before);
      std::sort(order.begin(), order.begin() + K);  // the kept candidates in ascending order
      int64_t* r = rows.data() + b * keep;
      if (has_cls) r[0] = 0;
      for (int64_t n = 0; n < K; ++n) {
        const int64_t j = order[n];
        r[first + n] = j + first;
        c_out[b * K + n] = cb[j * cs];
        i_out[b * K + n] = idx[b * index_map.stride(0) + j * index_map.stride(1)];
      }
    }
  });

  // Copy the rows, byte-wise whatever the dtype: memcpy when a row is contiguous.
  const auto elem = int64_t(hidden.element_size());
  const char* src = static_cast<const char*>(hidden.const_data_ptr());
  char* dst = static_cast<char*>(hidden_out.data_ptr());
  const int64_t hb = hidden.stride(0) * elem, hs = hidden.stride(1) * elem, hc = hidden.stride(2) * elem;
  at::parallel_for(0, B * keep, 64, [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const char* from = src + (br / keep) * hb + rows[br] * hs;
      char* to = dst + br * C * elem;
      if (hc == elem) {
        std::memcpy(to, from, size_t(C * elem));
      } else {
        for (int64_t x = 0; x < C; ++x) std::memcpy(to + x * elem, from + x * hc, size_t(elem));
      }
    }
  });
  return {hidden_out, cum_out, index_out};
}

}  // namespace flowcut
