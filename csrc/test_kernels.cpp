// Standalone test of the CUDA kernels (built by CMakeLists.txt; needs a GPU to run): both ops on random
// data, dense and packed (ragged) batches, in several layouts and dtypes, against plain CPU loops in double that
// share no code with the kernels (A / sum A and Sm / sum Sm from logs, so that they stay defined when the relay
// row takes all the mass). Exit status 0 when every case passes. ``--small``: only the cases of at most 1024 rows
// an image and 8 images (what compute-sanitizer's racecheck gets through in a minute or two).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "flowcut_cuda.h"

namespace {

using flowcut::cuda::DType;

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s  %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

void cuda_ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::printf("CUDA error in %s: %s\n", what, cudaGetErrorString(err));
    std::exit(2);
  }
}

// Host copies of values in a dtype: the stored bits and the value they represent.
struct Encoded {
  std::vector<unsigned char> bits;
  std::vector<double> value;
};

Encoded encode(const std::vector<float>& x, DType dtype) {
  Encoded e;
  const size_t n = x.size();
  e.value.resize(n);
  if (dtype == DType::kFloat32) {
    e.bits.resize(n * 4);
    std::memcpy(e.bits.data(), x.data(), n * 4);
    for (size_t i = 0; i < n; ++i) e.value[i] = x[i];
  } else if (dtype == DType::kFloat64) {
    e.value.assign(x.begin(), x.end());
    e.bits.resize(n * 8);
    std::memcpy(e.bits.data(), e.value.data(), n * 8);
  } else if (dtype == DType::kFloat16) {
    e.bits.resize(n * 2);
    for (size_t i = 0; i < n; ++i) {
      const __half h = __float2half(x[i]);
      std::memcpy(e.bits.data() + 2 * i, &h, 2);
      e.value[i] = __half2float(h);
    }
  } else {
    e.bits.resize(n * 2);
    for (size_t i = 0; i < n; ++i) {
      const __nv_bfloat16 h = __float2bfloat16(x[i]);
      std::memcpy(e.bits.data() + 2 * i, &h, 2);
      e.value[i] = __bfloat162float(h);
    }
  }
  return e;
}

template <typename T>
T* to_device(const T* host, size_t n) {
  T* dev = nullptr;
  cuda_ok(cudaMalloc(&dev, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  if (n) cuda_ok(cudaMemcpy(dev, host, n * sizeof(T), cudaMemcpyHostToDevice), "copy to device");
  return dev;
}

template <typename T>
std::vector<T> to_host(const T* dev, size_t n) {
  std::vector<T> host(n);
  if (n) cuda_ok(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost), "copy to host");
  return host;
}

// Offsets 0, n[0], n[0] + n[1], ...
std::vector<int64_t> offsets(const std::vector<int64_t>& n) {
  std::vector<int64_t> out(n.size() + 1, 0);
  for (size_t i = 0; i < n.size(); ++i) out[i + 1] = out[i] + n[i];
  return out;
}

std::string list(const std::vector<int64_t>& n) {
  std::string out;
  for (int64_t x : n) out += (out.empty() ? "" : ",") + std::to_string(x);
  return out;
}

double max_rel_error(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - want[i]) / (std::abs(want[i]) + 1e-6));
  return worst;
}

// ---- flow_scores ------------------------------------------------------------------------------------

struct ScoreCase {
  int64_t B, H, S, D;
  DType dtype;
  // Dense: memory (B, S, H, D) viewed as (B, H, S, D), as HF models hand k and v; else contiguous. Packed:
  // contiguous (T, H, D), as varlen attention holds them; else memory (H, T, D) viewed as (T, H, D).
  bool heads_inner;
  bool has_cls, semantic, with_prev;
  float qk_sigma = 2.0f;  // q and k ~ N(0, qk_sigma^2)
  float v_norm = 0.0f;    // > 0: every v row of this norm (the value logits then reach v_norm^2); else N(0, 1)
  double tol = 1e-4;      // relative error allowed
  std::vector<int64_t> lens = {};  // a packed batch of images of these lengths (B and S unused); empty: dense
  bool tied = false;  // every k row of an image the same (all logits of a head tie: uniform attention)
};

double log_sum_exp(const std::vector<double>& x) {
  const double top = *std::max_element(x.begin(), x.end());
  double total = 0.0;
  for (double y : x) total += std::exp(y - top);
  return top + std::log(total);
}

// The head-mean softmax over all S tokens of logits l[h][j], kept for the candidates j >= first: as logs.
std::vector<double> log_head_mean_softmax(const std::vector<std::vector<double>>& l, int64_t first) {
  const int64_t H = int64_t(l.size()), S = int64_t(l[0].size());
  std::vector<double> lse(H);
  for (int64_t h = 0; h < H; ++h) lse[h] = log_sum_exp(l[h]);
  std::vector<double> out;
  for (int64_t j = first; j < S; ++j) {
    std::vector<double> terms(H);
    for (int64_t h = 0; h < H; ++h) terms[h] = l[h][j] - lse[h];
    out.push_back(log_sum_exp(terms) - std::log(double(H)));
  }
  return out;
}

// exp(x - log sum exp x): the values normalised to sum 1, from their logs.
std::vector<double> normalised(const std::vector<double>& log_x) {
  const double total = log_sum_exp(log_x);
  std::vector<double> out;
  for (double y : log_x) out.push_back(std::exp(y - total));
  return out;
}

void test_flow_scores(const ScoreCase& t, std::mt19937& rng) {
  const bool packed = !t.lens.empty();
  const std::vector<int64_t> lens = packed ? t.lens : std::vector<int64_t>(t.B, t.S), cu = offsets(lens);
  const int64_t B = int64_t(lens.size()), H = t.H, D = t.D, first = t.has_cls ? 1 : 0;
  const int64_t T = cu[B], Tc = T - B * first;  // rows and candidates; image b's candidates from cu[b] - b first
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> q(B * H * D), k(T * H * D), v(T * H * D), prev(Tc);
  for (auto& x : q) x = t.qk_sigma * normal(rng);
  for (auto& x : k) x = t.qk_sigma * normal(rng);
  if (t.tied)  // every row (H D values, contiguous) a copy of row 0
    for (size_t r = 0; r < k.size(); r += size_t(H * D)) std::copy(k.begin(), k.begin() + H * D, k.begin() + r);
  for (auto& x : v) x = normal(rng);
  if (t.v_norm > 0.0f)  // contiguous rows of D values: scale each to the norm
    for (size_t r = 0; r < v.size(); r += size_t(D)) {
      double sq = 0.0;
      for (int64_t d = 0; d < D; ++d) sq += double(v[r + d]) * v[r + d];
      for (int64_t d = 0; d < D; ++d) v[r + d] = float(v[r + d] * t.v_norm / std::sqrt(sq));
    }
  for (auto& x : prev) x = uniform(rng);
  const Encoded qe = encode(q, DType::kFloat32), ke = encode(k, t.dtype), ve = encode(v, t.dtype);
  // Strides {image, head, token, dim}; token j of image b is row start[b] + j along the token stride.
  int64_t st[4] = {H * t.S * D, t.S * D, D, 1};
  if (t.heads_inner) st[0] = t.S * H * D, st[1] = D, st[2] = H * D, st[3] = 1;
  if (packed) st[0] = 0, st[1] = t.heads_inner ? D : T * D, st[2] = t.heads_inner ? H * D : D;
  const std::vector<int64_t> start = packed ? cu : std::vector<int64_t>(B + 1, 0);
  auto at = [&](const std::vector<double>& x, int64_t b, int64_t h, int64_t j, int64_t d) {
    return x[b * st[0] + h * st[1] + (start[b] + j) * st[2] + d * st[3]];
  };

  // Oracle, docs/semantics.md signals 1-7 in double, image by image.
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> cum(Tc), ent(B), attn(Tc);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t S = lens[b], N = S - first, c0 = cu[b] - b * first;
    std::vector<std::vector<double>> la(H, std::vector<double>(S)), ls(H, std::vector<double>(S));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < S; ++j) {
        double x = 0.0, y = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          x += qe.value[(b * H + h) * D + d] * at(ke.value, b, h, j, d);
          y += at(ve.value, b, h, 0, d) * at(ve.value, b, h, j, d);
        }
        la[h][j] = scale * x, ls[h][j] = y;
      }
    const std::vector<double> log_A = log_head_mean_softmax(la, first);
    const std::vector<double> p = normalised(log_A), p_sem = normalised(log_head_mean_softmax(ls, first));
    double e = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t j = n + first;
      double rho = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        double m = 0.0;
        for (int64_t h = 0; h < H; ++h) m += at(ve.value, b, h, j, d) / H;
        rho += std::abs(m);
      }
      if (p[n] > 0) e -= p[n] * std::log(p[n]);
      double score = std::exp(log_A[n]) * rho;
      if (t.has_cls) score = (p[n] + (t.semantic ? p_sem[n] : 0.0)) * rho;
      cum[c0 + n] = t.with_prev ? 0.5 * prev[c0 + n] + 0.5 * score : score;
      attn[c0 + n] = std::exp(log_A[n]);
    }
    ent[b] = N > 1 ? e / std::log(double(N)) : 0.0;
  }

  flowcut::cuda::FlowScoresArgs a;
  a.B = B, a.H = H, a.S = *std::max_element(lens.begin(), lens.end()), a.D = D;
  if (packed) a.cu_seqlens = to_device(cu.data(), cu.size()), a.rows = T;
  a.q = to_device(qe.bits.data(), qe.bits.size()), a.q_dtype = DType::kFloat32;
  a.q_stride[0] = H * D, a.q_stride[1] = D, a.q_stride[2] = 1;
  a.k = to_device(ke.bits.data(), ke.bits.size()), a.v = to_device(ve.bits.data(), ve.bits.size());
  a.kv_dtype = t.dtype;
  for (int i = 0; i < 4; ++i) a.k_stride[i] = a.v_stride[i] = st[i];
  if (t.with_prev) {
    a.prev = to_device(prev.data(), prev.size());
    a.prev_stride[0] = packed ? 0 : t.S - first, a.prev_stride[1] = 1;
  }
  a.scale = float(scale), a.has_cls = t.has_cls, a.semantic = t.semantic;
  std::vector<float> poison(Tc, NAN);  // Tc >= B
  a.cum = to_device(poison.data(), poison.size()), a.attn = to_device(poison.data(), poison.size());
  a.entropy = to_device(poison.data(), size_t(B));
  const size_t bytes = flowcut::cuda::flow_scores_workspace_bytes(a);
  void* ws = nullptr;
  cuda_ok(cudaMalloc(&ws, bytes), "cudaMalloc workspace");
  std::string err;
  std::vector<float> first_cum;
  for (int rep = 0; rep < 2 && err.empty(); ++rep) {  // twice: the workspace is reusable, the result bitwise the same
    err = flowcut::cuda::launch_flow_scores(a, ws, bytes, nullptr);
    cuda_ok(cudaDeviceSynchronize(), "flow_scores");
    if (rep == 0) first_cum = to_host(a.cum, Tc);
  }
  cuda_ok(cudaDeviceSynchronize(), "flow_scores");
  const auto got_cum = to_host(a.cum, Tc), got_attn = to_host(a.attn, Tc), got_ent = to_host(a.entropy, B);
  const double e1 = max_rel_error(got_cum, cum), e2 = max_rel_error(got_attn, attn), e3 = max_rel_error(got_ent, ent);
  const char* layout = packed ? (t.heads_inner ? "(T,H,D)" : "(H,T,D)") : (t.heads_inner ? "(B,S,H,D)" : "(B,H,S,D)");
  const std::string shape = packed ? "lens=" + list(lens) : "B=" + std::to_string(B) + " S=" + std::to_string(t.S);
  char name[400];
  std::snprintf(name, sizeof name,
                "flow_scores %s H=%ld D=%ld dtype=%d %s cls=%d semantic=%d prev=%d tied=%d qk_sigma=%g v_norm=%g: "
                "rel err %.2e %.2e %.2e",
                shape.c_str(), long(H), long(D), int(t.dtype), layout, int(t.has_cls), int(t.semantic),
                int(t.with_prev), int(t.tied), double(t.qk_sigma), double(t.v_norm), e1, e2, e3);
  // NaN errors fail the comparisons.
  const bool same = std::memcmp(first_cum.data(), got_cum.data(), size_t(Tc) * 4) == 0;
  expect(err.empty() && same && e1 < t.tol && e2 < t.tol && e3 < t.tol,
         err.empty() ? name + std::string(same ? "" : " (not reproducible)") : name + (" " + err));
  cudaFree(const_cast<void*>(a.q)), cudaFree(const_cast<void*>(a.k)), cudaFree(const_cast<void*>(a.v));
  cudaFree(const_cast<float*>(a.prev)), cudaFree(a.cum), cudaFree(a.attn), cudaFree(a.entropy), cudaFree(ws);
  cudaFree(const_cast<int64_t*>(a.cu_seqlens));
}

// A NaN in one key of image 1 (dense B = 2): image 1's softmaxes, and so all its outputs, are NaN; image 0's are
// untouched (bitwise those of a run without the NaN).
void test_flow_scores_nan(std::mt19937& rng) {
  const int64_t B = 2, H = 16, S = 300, D = 64, N = S - 1;
  std::normal_distribution<float> normal;
  std::vector<float> q(B * H * D), k(B * H * S * D), v(B * H * S * D);
  for (auto& x : q) x = normal(rng);
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  flowcut::cuda::FlowScoresArgs a;
  a.B = B, a.H = H, a.S = S, a.D = D;
  a.q = to_device(q.data(), q.size()), a.q_stride[0] = H * D, a.q_stride[1] = D, a.q_stride[2] = 1;
  a.v = to_device(v.data(), v.size()), a.kv_dtype = DType::kFloat32;
  const int64_t st[4] = {H * S * D, S * D, D, 1};
  for (int i = 0; i < 4; ++i) a.k_stride[i] = a.v_stride[i] = st[i];
  a.scale = 0.125f;
  std::vector<float> poison(B * N, 7.0f);
  a.cum = to_device(poison.data(), poison.size()), a.attn = to_device(poison.data(), poison.size());
  a.entropy = to_device(poison.data(), B);
  const size_t bytes = flowcut::cuda::flow_scores_workspace_bytes(a);
  void* ws = nullptr;
  cuda_ok(cudaMalloc(&ws, bytes), "cudaMalloc workspace");
  std::vector<std::vector<float>> runs;
  std::string err;
  for (int nan = 0; nan < 2; ++nan) {
    if (nan) k[st[0] + 3 * st[1] + 17 * st[2] + 5] = NAN;  // image 1, head 3, token 17
    a.k = to_device(k.data(), k.size());
    err += flowcut::cuda::launch_flow_scores(a, ws, bytes, nullptr);
    cuda_ok(cudaDeviceSynchronize(), "flow_scores, NaN key");
    std::vector<float> out = to_host(a.cum, B * N), attn = to_host(a.attn, B * N), ent = to_host(a.entropy, B);
    out.insert(out.end(), attn.begin(), attn.end());
    out.insert(out.end(), ent.begin(), ent.end());
    runs.push_back(out);
    cudaFree(const_cast<void*>(a.k));
  }
  bool ok = err.empty() && std::memcmp(runs[0].data(), runs[1].data(), N * 4) == 0;  // image 0's cum
  ok = ok && std::memcmp(runs[0].data() + B * N, runs[1].data() + B * N, N * 4) == 0;  // its attn
  ok = ok && runs[0][2 * B * N] == runs[1][2 * B * N] && std::isnan(runs[1][2 * B * N + 1]);  // entropies
  for (int64_t n = 0; n < N; ++n) ok = ok && std::isnan(runs[1][N + n]) && std::isnan(runs[1][B * N + N + n]);
  expect(ok, "flow_scores with a NaN key in image 1: image 1 all NaN, image 0 untouched " + err);
  cudaFree(ws), cudaFree(const_cast<void*>(a.q)), cudaFree(const_cast<void*>(a.v));
  cudaFree(a.cum), cudaFree(a.attn), cudaFree(a.entropy);
}

// ---- select_gather ----------------------------------------------------------------------------------

// Images of lengths lens keeping keeps rows each: a packed batch, or a dense one (equal lengths and keeps).
void test_select_gather(const std::vector<int64_t>& lens, const std::vector<int64_t>& keeps, bool packed, int64_t C,
                        bool has_cls, size_t elem, std::mt19937& rng, bool constant = false) {
  const std::vector<int64_t> cu = offsets(lens), cu_out = offsets(keeps);
  const int64_t B = int64_t(lens.size()), first = has_cls ? 1 : 0, T = cu[B], Tc = T - B * first;
  const int64_t rows_out = cu_out[B], kept_total = rows_out - B * first;
  // Few distinct scores (many ties), signed zeros, infinities and NaNs of both signs and several payloads.
  const uint32_t special_bits[] = {0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00000u, 0x7fc00001u};
  std::uniform_int_distribution<int> level(0, 15);
  std::vector<float> cum(Tc);
  for (auto& x : cum) {
    const int l = constant ? 8 : level(rng);  // constant: every score the same (all candidates tie)
    if (l < 6) std::memcpy(&x, &special_bits[l], 4);
    else x = float(l - 6) / 7.0f;
  }
  std::vector<int64_t> index(Tc);
  for (int64_t i = 0; i < Tc; ++i) index[i] = 1000 + i;
  std::vector<unsigned char> hidden(size_t(T * C) * elem);  // (T, C), or (B, S, C) when dense
  for (auto& x : hidden) x = static_cast<unsigned char>(rng());

  // Oracle: order by score descending, NaN above every number (-0.0 == 0.0), ties by lower index; keep K; ascending.
  std::vector<int64_t> want_rows;  // rows of hidden, image after image
  std::vector<float> want_cum;
  std::vector<int64_t> want_index;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t N = lens[b] - first, K = keeps[b] - first, c0 = cu[b] - b * first;
    std::vector<int64_t> order(N);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
      const float x = cum[c0 + i], y = cum[c0 + j];
      return std::isnan(x) ? !std::isnan(y) : x > y;  // NaN first (x > NaN is false)
    });
    std::vector<int64_t> kept(order.begin(), order.begin() + K);
    std::sort(kept.begin(), kept.end());
    if (has_cls) want_rows.push_back(cu[b]);
    for (int64_t j : kept) {
      want_rows.push_back(cu[b] + j + first);
      want_cum.push_back(cum[c0 + j]);
      want_index.push_back(index[c0 + j]);
    }
  }

  flowcut::cuda::SelectGatherArgs a;
  a.B = B, a.C = C, a.has_cls = has_cls, a.elem_size = elem;
  if (packed) {
    a.cu_seqlens = to_device(cu.data(), cu.size());
    a.cu_seqlens_out = to_device(cu_out.data(), cu_out.size());
    a.rows = T, a.rows_out = rows_out;
  } else {
    a.S = lens[0], a.keep = keeps[0];
  }
  a.hidden = to_device(hidden.data(), hidden.size());
  a.hidden_stride[0] = packed ? 0 : lens[0] * C, a.hidden_stride[1] = C, a.hidden_stride[2] = 1;
  a.cum = to_device(cum.data(), cum.size()), a.cum_stride[0] = packed ? 0 : lens[0] - first, a.cum_stride[1] = 1;
  a.index_map = to_device(index.data(), index.size());
  a.index_stride[0] = a.cum_stride[0], a.index_stride[1] = 1;
  std::vector<unsigned char> poison(size_t(rows_out * C) * elem, 0xff);
  a.hidden_out = to_device(poison.data(), poison.size());
  std::vector<float> poison_f(kept_total, NAN);
  std::vector<int64_t> poison_i(kept_total, -1);
  a.cum_out = to_device(poison_f.data(), poison_f.size()), a.index_out = to_device(poison_i.data(), poison_i.size());
  const size_t bytes = flowcut::cuda::select_gather_workspace_bytes(a);
  void* ws = nullptr;
  cuda_ok(cudaMalloc(&ws, std::max<size_t>(bytes, 16)), "cudaMalloc workspace");
  const std::string err = flowcut::cuda::launch_select_gather(a, ws, bytes, nullptr);
  cuda_ok(cudaDeviceSynchronize(), "select_gather");
  const auto got_hidden = to_host(static_cast<unsigned char*>(a.hidden_out), poison.size());
  const auto got_cum = to_host(a.cum_out, kept_total);
  const auto got_index = to_host(a.index_out, kept_total);
  bool ok = err.empty() && got_index == want_index;
  ok = ok && std::memcmp(got_cum.data(), want_cum.data(), want_cum.size() * 4) == 0;  // bit for bit (NaN)
  for (int64_t r = 0; ok && r < rows_out; ++r)
    ok = std::memcmp(got_hidden.data() + r * C * elem, hidden.data() + want_rows[r] * C * elem, C * elem) == 0;
  const std::string shape = (packed ? "lens=" : "dense lens=") + list(lens) + " keep=" + list(keeps);
  char name[400];
  std::snprintf(name, sizeof name, "select_gather %s C=%ld cls=%d elem=%zu%s %s", shape.c_str(), long(C),
                int(has_cls), elem, constant ? " constant scores" : "", err.c_str());
  expect(ok, name);
  cudaFree(const_cast<void*>(a.hidden)), cudaFree(const_cast<float*>(a.cum));
  cudaFree(const_cast<int64_t*>(a.index_map)), cudaFree(a.hidden_out), cudaFree(a.cum_out), cudaFree(a.index_out);
  cudaFree(const_cast<int64_t*>(a.cu_seqlens)), cudaFree(const_cast<int64_t*>(a.cu_seqlens_out)), cudaFree(ws);
}

void test_select_gather(int64_t B, int64_t S, int64_t C, int64_t keep, bool has_cls, size_t elem, std::mt19937& rng,
                        bool constant = false) {
  test_select_gather(std::vector<int64_t>(B, S), std::vector<int64_t>(B, keep), false, C, has_cls, elem, rng, constant);
}

// ---- packed offsets the host never checked --------------------------------------------------------------

// Offsets that decrease or overrun T (the CUDA ops never read them on the host): both launches must stay inside
// their tensors (compute-sanitizer's memcheck is the judge) and report no error. select_gather's image 0 keeps more
// rows than it has: the rows past its candidates are zeros, their scores NaN and indices -1.
void test_bad_offsets() {
  const int64_t H = 2, D = 8, T = 12, C = 4;
  const std::vector<int64_t> cu = {0, 7, 3, 30};  // decreasing, then past T
  std::vector<float> q(3 * H * D, 0.5f), kv(T * H * D, 0.25f), out(T, NAN);
  flowcut::cuda::FlowScoresArgs f;
  f.B = 3, f.H = H, f.D = D, f.cu_seqlens = to_device(cu.data(), cu.size()), f.rows = T;
  f.q = to_device(q.data(), q.size()), f.q_stride[0] = H * D, f.q_stride[1] = D, f.q_stride[2] = 1;
  f.k = f.v = to_device(kv.data(), kv.size()), f.kv_dtype = DType::kFloat32;
  f.k_stride[1] = f.v_stride[1] = D, f.k_stride[2] = f.v_stride[2] = H * D, f.k_stride[3] = f.v_stride[3] = 1;
  f.scale = 1.0f;
  f.cum = to_device(out.data(), out.size()), f.attn = to_device(out.data(), out.size());
  f.entropy = to_device(out.data(), 3);
  const size_t bytes = flowcut::cuda::flow_scores_workspace_bytes(f);
  void* ws = nullptr;
  cuda_ok(cudaMalloc(&ws, bytes), "cudaMalloc workspace");
  std::string err = flowcut::cuda::launch_flow_scores(f, ws, bytes, nullptr);
  cuda_ok(cudaDeviceSynchronize(), "flow_scores, bad offsets");
  expect(err.empty(), "flow_scores with offsets that decrease and overrun T " + err);
  cudaFree(ws), cudaFree(const_cast<int64_t*>(f.cu_seqlens)), cudaFree(const_cast<void*>(f.q));
  cudaFree(const_cast<void*>(f.k)), cudaFree(f.cum), cudaFree(f.attn), cudaFree(f.entropy);

  // select_gather: lens {3, 4} (T = 7), keeps {5, 2}: image 0 has 2 candidates and keeps 4; image 1 keeps its best
  // candidate, its third (index 4).
  const std::vector<int64_t> in = {0, 3, 7}, kept = {0, 5, 7};
  std::vector<float> hidden(7 * C, 1.0f), cum = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f};
  std::vector<int64_t> index = {0, 1, 2, 3, 4};
  flowcut::cuda::SelectGatherArgs a;
  a.B = 2, a.C = C, a.has_cls = true, a.elem_size = 4, a.rows = 7, a.rows_out = 7;
  a.cu_seqlens = to_device(in.data(), in.size()), a.cu_seqlens_out = to_device(kept.data(), kept.size());
  a.hidden = to_device(hidden.data(), hidden.size()), a.hidden_stride[1] = C, a.hidden_stride[2] = 1;
  a.cum = to_device(cum.data(), cum.size()), a.cum_stride[1] = 1;
  a.index_map = to_device(index.data(), index.size()), a.index_stride[1] = 1;
  std::vector<float> poison(7 * C, 7.0f);
  a.hidden_out = to_device(poison.data(), poison.size());
  a.cum_out = to_device(poison.data(), 5);
  std::vector<int64_t> poison_i(5, 7);
  a.index_out = to_device(poison_i.data(), 5);
  const size_t sg_bytes = flowcut::cuda::select_gather_workspace_bytes(a);
  cuda_ok(cudaMalloc(&ws, sg_bytes), "cudaMalloc workspace");
  err = flowcut::cuda::launch_select_gather(a, ws, sg_bytes, nullptr);
  cuda_ok(cudaDeviceSynchronize(), "select_gather, bad offsets");
  const auto got = to_host(static_cast<float*>(a.hidden_out), 7 * C);
  const auto got_cum = to_host(a.cum_out, 5);
  const auto got_index = to_host(a.index_out, 5);
  bool ok = err.empty() && got_index[0] == 0 && got_index[1] == 1 && got_index[2] == -1 && got_index[3] == -1;
  ok = ok && std::isnan(got_cum[2]) && std::isnan(got_cum[3]) && got_index[4] == 4;
  for (int64_t x = 0; x < 7 * C; ++x) ok = ok && got[x] == ((x / C == 3 || x / C == 4) ? 0.0f : 1.0f);
  expect(ok, "select_gather keeping more rows than an image has: zero rows, NaN scores, index -1 " + err);
  cudaFree(ws), cudaFree(const_cast<int64_t*>(a.cu_seqlens)), cudaFree(const_cast<int64_t*>(a.cu_seqlens_out));
  cudaFree(const_cast<void*>(a.hidden)), cudaFree(const_cast<float*>(a.cum));
  cudaFree(const_cast<int64_t*>(a.index_map)), cudaFree(a.hidden_out), cudaFree(a.cum_out), cudaFree(a.index_out);
}

// Whether a case of these images is run: every case, or with --small only the small ones.
bool wanted(bool small, const std::vector<int64_t>& lens) {
  return !small || (lens.size() <= 8 && *std::max_element(lens.begin(), lens.end()) <= 1024);
}

}  // namespace

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: nothing to test\n");
    return 77;  // ctest's conventional "skipped"
  }
  std::mt19937 rng(1234);
  const ScoreCase score_cases[] = {
      {2, 4, 37, 16, DType::kFloat32, true, true, true, true},      // 16-byte loads, CLS variant
      {3, 16, 577, 64, DType::kFloat16, true, true, true, false},   // CLIP-L/336 shape
      {2, 16, 300, 80, DType::kBFloat16, true, false, true, true},  // Qwen2-VL head dim, mean variant
      {2, 6, 41, 72, DType::kFloat16, false, true, false, true},    // SigLIP head dim, contiguous, no semantic
      {2, 3, 29, 5, DType::kFloat32, true, true, true, true},       // odd head dim: element loads
      {1, 16, 4097, 64, DType::kFloat16, true, false, true, false}, // long sequence, many chunks
      {1, 2, 2, 8, DType::kFloat32, true, true, true, true},        // a single candidate
      {2, 4, 37, 16, DType::kFloat64, true, true, true, true},      // float64: 16-byte loads
      {2, 3, 29, 5, DType::kFloat64, false, false, true, false},    // float64: element loads, mean variant
      // Large norms: q, k ~ N(0, 9), |v| = 100: v_0.v_0 = 1e4 beats every v_0.v_j by over 5e3, so the CLS row
      // takes all of every head's value softmax and the candidates' Sm underflows, also in double. (Larger |v|
      // only adds the float32 rounding of logits ~|v|^2, which blurs heads of near-equal candidate mass.)
      {2, 16, 577, 64, DType::kFloat32, true, true, true, true, 3.0f, 100.0f, 1e-3},
      {2, 16, 577, 64, DType::kBFloat16, true, true, true, false, 3.0f, 100.0f, 1e-3},
      // Packed batches (B and S unused): ragged lengths, a two-row CLS image, idle blocks of the shorter images.
      {0, 4, 0, 16, DType::kFloat16, true, true, true, true, 2.0f, 0.0f, 1e-4, {37, 2, 100, 9}},
      {0, 16, 0, 64, DType::kFloat32, true, true, false, true, 2.0f, 0.0f, 1e-4, {577, 65, 5000}},
      {0, 16, 0, 80, DType::kBFloat16, false, false, true, false, 2.0f, 0.0f, 1e-4, {1, 300, 17}},  // (H, T, D)
      {0, 3, 0, 5, DType::kFloat64, true, true, true, true, 2.0f, 0.0f, 1e-4, {29, 3}},
      {0, 16, 0, 64, DType::kBFloat16, true, true, true, true, 3.0f, 100.0f, 1e-3, {577, 2, 200}},
      // 16k tokens (N = 16384: many chunks, the last one partial), dense and packed beside short images.
      {1, 16, 16385, 64, DType::kFloat16, true, true, true, true},
      {0, 16, 0, 64, DType::kBFloat16, true, true, true, false, 2.0f, 0.0f, 1e-4, {16385, 3, 700}},
      // Ties: every k row of an image the same, so every head's logits tie (uniform attention, entropy 1).
      {2, 16, 577, 64, DType::kFloat32, true, true, true, true, 2.0f, 0.0f, 1e-4, {}, true},
      {0, 12, 0, 64, DType::kFloat16, true, false, true, false, 2.0f, 0.0f, 1e-4, {130, 2, 33}, true},
      // H = 12 and H = 40: lanes per head 2 with idle lanes, and several passes of one lane per head.
      {2, 12, 100, 64, DType::kFloat32, true, true, true, true},
      {1, 40, 50, 32, DType::kFloat16, true, true, true, true},
  };
  for (const ScoreCase& t : score_cases)
    if (wanted(small, t.lens.empty() ? std::vector<int64_t>(size_t(t.B), t.S) : t.lens)) test_flow_scores(t, rng);
  test_flow_scores_nan(rng);
  for (bool cls : {true, false})
    for (int64_t keep : {1, 2, 17, 100}) {
      test_select_gather(3, 100, 40, keep, cls, 4, rng);  // 16-byte copies
      test_select_gather(2, 100, 33, keep, cls, 2, rng);  // element copies
    }
  if (!small) {
    test_select_gather(2, 16385, 64, 4000, true, 2, rng);  // large N: several radix levels, many row groups
    test_select_gather(70, 577, 128, 65, true, 8, rng);    // many images
  }
  // Packed batches: each image its own length and keep (1 to all), the relay row alone, several row groups.
  for (bool cls : {true, false}) {
    test_select_gather({100, 2, 40, 17}, {17, 1, 40, 2}, true, 40, cls, 4, rng);  // 16-byte copies
    test_select_gather({2, 50, 9, 100}, {2, 50, 3, 1}, true, 33, cls, 2, rng);    // element copies
  }
  test_select_gather({1, 7, 3}, {1, 5, 3}, true, 8, false, 8, rng);               // one-row images (mean)
  // Constant scores (every candidate ties: keep the lowest indices), long and short, N not a multiple of the block.
  if (!small) {
    test_select_gather({16385, 10, 600}, {4000, 10, 2}, true, 64, true, 2, rng);  // one long image
    test_select_gather(2, 16385, 64, 4000, true, 2, rng, true);
    test_select_gather({16385, 1000, 3}, {300, 999, 2}, true, 32, false, 4, rng, true);
  }
  test_select_gather({2, 2}, {1, 2}, true, 16, true, 4, rng);  // N = 1: the relay alone, and everything kept
  test_bad_offsets();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
