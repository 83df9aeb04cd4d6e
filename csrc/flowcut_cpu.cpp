// C++ CPU kernels of flow_scores and select_gather (SPEC.md), parallel over images and heads.
// Every reduction accumulates in double (dot products over the head dim in 8 independent lanes, which
// vectorise); inputs are read in place through their strides.
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

// In place: x <- softmax(x) over n values.
void softmax_inplace(double* x, int64_t n) {
  const double top = *std::max_element(x, x + n);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - top);
    total += x[i];
  }
  for (int64_t i = 0; i < n; ++i) x[i] /= total;
}

// x[0..n) (stride `stride`, any dtype) . y[0..n) (contiguous float), accumulated in 8 double lanes.
template <typename T>
double dot(const T* x, int64_t stride, const float* y, int64_t n) {
  double lanes[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  if (stride == 1) {
    for (; d + 8 <= n; d += 8)
      for (int u = 0; u < 8; ++u) lanes[u] += double(float(x[d + u])) * double(y[d + u]);
  }
  for (; d < n; ++d) lanes[d % 8] += double(float(x[d * stride])) * double(y[d]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Per (image, head): the relay softmax a_h over all S tokens, and the value softmax s_h when wanted.
template <typename T>
void head_softmaxes(const float* q, const View4<T>& k, const View4<T>& v, int64_t B, int64_t H, int64_t S,
                    int64_t D, double scale, bool want_semantic, std::vector<double>& attn_h,
                    std::vector<double>& sem_h) {
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v0(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* qh = q + bh * D;  // q is contiguous (B, H, D)
      double* a = attn_h.data() + bh * S;
      for (int64_t j = 0; j < S; ++j) a[j] = scale * dot(&k(b, h, j, 0), k.sd, qh, D);
      softmax_inplace(a, S);
      if (!want_semantic) continue;
      for (int64_t d = 0; d < D; ++d) v0[d] = float(v(b, h, 0, d));
      double* s = sem_h.data() + bh * S;
      for (int64_t j = 0; j < S; ++j) s[j] = dot(&v(b, h, j, 0), v.sd, v0.data(), D);
      softmax_inplace(s, S);
    }
  });
}

// Per candidate: head means A and Sm of the softmaxes, and rho = L1 norm of the head-mean value.
template <typename T>
void candidate_signals(const View4<T>& v, const std::vector<double>& attn_h, const std::vector<double>& sem_h,
                       int64_t B, int64_t H, int64_t S, int64_t D, int64_t first, bool want_semantic,
                       std::vector<double>& A, std::vector<double>& Sm, std::vector<double>& rho) {
  const int64_t N = S - first;
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> mean_v(D);
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N, j = bn % N + first;
      double a = 0.0, s = 0.0;
      std::fill(mean_v.begin(), mean_v.end(), 0.0);
      for (int64_t h = 0; h < H; ++h) {
        a += attn_h[(b * H + h) * S + j];
        if (want_semantic) s += sem_h[(b * H + h) * S + j];
        for (int64_t d = 0; d < D; ++d) mean_v[d] += double(float(v(b, h, j, d)));
      }
      double l1 = 0.0;
      for (int64_t d = 0; d < D; ++d) l1 += std::abs(mean_v[d] / double(H));
      A[bn] = a / double(H);
      Sm[bn] = s / double(H);
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
  const at::Tensor q = q_relay.to(at::kFloat).contiguous();  // (B, H, D): tiny next to k and v

  std::vector<double> attn_h(B * H * S), sem_h(want_semantic ? B * H * S : 0);
  std::vector<double> A(B * N), Sm(B * N), rho(B * N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "flowcut_native_flow_scores", [&] {
    const auto kv = view4<scalar_t>(k), vv = view4<scalar_t>(v);
    head_softmaxes(q.const_data_ptr<float>(), kv, vv, B, H, S, D, scale, want_semantic, attn_h, sem_h);
    candidate_signals(vv, attn_h, sem_h, B, H, S, D, first, want_semantic, A, Sm, rho);
  });

  auto opts = k.options().dtype(at::kFloat);
  at::Tensor cum = at::empty({B, N}, opts), entropy = at::empty({B}, opts), attn = at::empty({B, N}, opts);
  float *cum_p = cum.data_ptr<float>(), *ent_p = entropy.data_ptr<float>(), *attn_p = attn.data_ptr<float>();
  const float* prev_p = prev.has_value() ? prev->const_data_ptr<float>() : nullptr;
  const int64_t psb = prev.has_value() ? prev->stride(0) : 0, psn = prev.has_value() ? prev->stride(1) : 0;

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const double* a = A.data() + b * N;
      const double* s = Sm.data() + b * N;
      const double* r = rho.data() + b * N;
      const double a_sum = std::accumulate(a, a + N, 0.0), s_sum = std::accumulate(s, s + N, 0.0);
      double ent = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const double p = a[n] / a_sum;  // A normalised over the candidates
        if (p > 0.0) ent -= p * std::log(p);
        double score;
        if (has_cls) score = (want_semantic ? p + s[n] / s_sum : p) * r[n];
        else score = a[n] * r[n];
        const double c = prev_p ? 0.5 * double(prev_p[b * psb + n * psn]) + 0.5 * score : score;
        cum_p[b * N + n] = float(c);
        attn_p[b * N + n] = float(a[n]);
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
