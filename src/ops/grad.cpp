// Training kernels (see grad.h). The double versions are plain scalar loops written for clarity:
// they are the reference the tests check by central differences. The float versions are the fast
// ones: OpenBLAS for the matrix products, simple vectorizable loops elsewhere, the ThreadPool for
// row-wise work. Where the fast loop would be the same code as the plain one (element-wise and
// small per-row kernels), one template serves both precisions.
// Float results never depend on timing: every output element is written by one thread, GEMMs run
// on the calling thread (OpenBLAS threads them itself), and cross-thread sums are added in
// thread-index order.
#include "ops/grad.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/threads.h"
#include "ops/ops.h"
#include "ops/simd.h"

namespace dk {
namespace {

inline int64_t At(int64_t row, int64_t cols) { return row * cols; }

template <typename T>
inline T Sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Index of the first maximum of x[n] (ties: the lowest index).
template <typename T>
int ArgMax(const T* x, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

// y[L] = softmax(x[L]), max-subtracted; y may alias x.
template <typename T>
void SoftmaxRow(const T* x, T* y, int L) {
  T mx = x[0];
  for (int j = 1; j < L; ++j) mx = std::max(mx, x[j]);
  T sum = 0;
  for (int j = 0; j < L; ++j) {
    y[j] = std::exp(x[j] - mx);
    sum += y[j];
  }
  const T inv = T(1) / sum;
  for (int j = 0; j < L; ++j) y[j] *= inv;
}

}  // namespace

// ---- Forward kernels in double ------------------------------------------------------------------

void MatMulWTAdd(const double* x, const double* w, double* y, int n, int in, int out) {
  for (int t = 0; t < n; ++t)
    for (int o = 0; o < out; ++o) {
      double s = 0.0;
      for (int i = 0; i < in; ++i) s += x[At(t, in) + i] * w[At(o, in) + i];
      y[At(t, out) + o] += s;
    }
}

void MatMulWT(const double* x, const double* w, double* y, int n, int in, int out) {
  std::fill(y, y + At(n, out), 0.0);
  MatMulWTAdd(x, w, y, n, in, out);
}

void RmsNorm(const double* x, const double* weight, double* out, int n, int dim, double eps) {
  for (int t = 0; t < n; ++t) {
    const double* xr = x + At(t, dim);
    double ss = 0.0;
    for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const double r = 1.0 / std::sqrt(ss / dim + eps);
    for (int i = 0; i < dim; ++i) out[At(t, dim) + i] = xr[i] * r * weight[i];
  }
}

void SwiGlu(const double* gate, const double* up, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * Sigmoid(gate[i]) * up[i];
}

// ---- RoPE ----------------------------------------------------------------------------------------

namespace {

// Rotates the first n_rot dims of every head of x [n][n_heads * head_dim] by the angles of the
// float Rope in ops.cpp, bit for bit: theta starts at pos and is multiplied in float by
// base^(-2/n_rot) per pair (llama.cpp). cos/sin are then taken in T, so the double path rotates by
// the same angles as the float one. inverse negates sin: the transpose rotation.
template <typename T>
void RotatePairs(T* x, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox,
                 bool inverse) {
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(n_rot));
  const int half = n_rot / 2;
  std::vector<T> cs(half), sn(half);
  for (int t = 0; t < n; ++t) {
    float theta = static_cast<float>(pos[t]);
    for (int i = 0; i < half; ++i) {
      cs[i] = std::cos(static_cast<T>(theta));
      sn[i] = inverse ? -std::sin(static_cast<T>(theta)) : std::sin(static_cast<T>(theta));
      theta *= theta_scale;
    }
    for (int h = 0; h < n_heads; ++h) {
      T* v = x + (static_cast<int64_t>(t) * n_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const int a = neox ? i : 2 * i;
        const int b = neox ? i + half : 2 * i + 1;
        const T x0 = v[a], x1 = v[b];
        v[a] = x0 * cs[i] - x1 * sn[i];
        v[b] = x0 * sn[i] + x1 * cs[i];
      }
    }
  }
}

}  // namespace

void Rope(double* x, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox) {
  RotatePairs(x, pos, n, n_heads, head_dim, n_rot, base, neox, false);
}

void RopeBackward(float* dx, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox) {
  RotatePairs(dx, pos, n, n_heads, head_dim, n_rot, base, neox, true);
}

void RopeBackward(double* dx, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base,
                  bool neox) {
  RotatePairs(dx, pos, n, n_heads, head_dim, n_rot, base, neox, true);
}

// ---- Linear maps ---------------------------------------------------------------------------------

void MatMulW(const float* dy, const float* w, float* dx, int n, int out, int in, bool accumulate) {
  if (n <= 0) return;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasTrans, out, in, 1.0f, w, in, dy, 1, beta, dx, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, out, 1.0f, dy, out, w, in, beta, dx, in);
  }
}

void MatMulW(const double* dy, const double* w, double* dx, int n, int out, int in, bool accumulate) {
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < in; ++i) {
      double s = 0.0;
      for (int o = 0; o < out; ++o) s += dy[At(t, out) + o] * w[At(o, in) + i];
      dx[At(t, in) + i] = accumulate ? dx[At(t, in) + i] + s : s;
    }
}

void LinearForward(const float* x, const float* w, const float* b, float* y, int n, int in, int out) {
  if (n <= 0) return;
  if (b == nullptr) {
    MatMulWT(x, w, y, n, in, out);
    return;
  }
  for (int t = 0; t < n; ++t) std::memcpy(y + At(t, out), b, sizeof(float) * out);
  MatMulWTAdd(x, w, y, n, in, out);
}

void LinearForward(const double* x, const double* w, const double* b, double* y, int n, int in, int out) {
  for (int t = 0; t < n; ++t)
    for (int o = 0; o < out; ++o) y[At(t, out) + o] = b ? b[o] : 0.0;
  MatMulWTAdd(x, w, y, n, in, out);
}

void LinearBackward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n, int in,
                    int out, bool accumulate_dx) {
  if (n <= 0) return;
  if (dx != nullptr) MatMulW(dy, w, dx, n, out, in, accumulate_dx);
  // dW[out][in] += dy^T x: one GEMM over all rows.
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, n, 1.0f, dy, out, x, in, 1.0f, dw, in);
  if (db != nullptr)
    for (int t = 0; t < n; ++t) {
      const float* g = dy + At(t, out);
#pragma omp simd
      for (int o = 0; o < out; ++o) db[o] += g[o];
    }
}

void LinearBackward(const double* x, const double* w, const double* dy, double* dx, double* dw, double* db, int n,
                    int in, int out, bool accumulate_dx) {
  if (dx != nullptr) MatMulW(dy, w, dx, n, out, in, accumulate_dx);
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i) {
      double s = 0.0;
      for (int t = 0; t < n; ++t) s += dy[At(t, out) + o] * x[At(t, in) + i];
      dw[At(o, in) + i] += s;
    }
  if (db != nullptr)
    for (int t = 0; t < n; ++t)
      for (int o = 0; o < out; ++o) db[o] += dy[At(t, out) + o];
}

// ---- Element-wise and per-row --------------------------------------------------------------------

namespace {

template <typename T>
void SiluT(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * Sigmoid(x[i]);
}

// silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x); exp(-x) overflowing to inf gives s = 0, not NaN.
template <typename T>
inline T SiluGrad(T x) {
  const T s = Sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

template <typename T>
void SiluBackwardT(const T* x, const T* dy, T* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * SiluGrad(x[i]);
}

template <typename T>
void SwiGluBackwardT(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i], d = dout[i];
    dup[i] = d * g * Sigmoid(g);
    dgate[i] = d * up[i] * SiluGrad(g);
  }
}

// y = x r w with r = (mean(x^2) + eps)^(-1/2), so dr/dx_j = -r^3 x_j / dim and
// dx_j = r w_j dy_j - x_j r^3 / dim * sum_i dy_i w_i x_i.
template <typename T>
void RmsNormBackwardT(const T* x, const T* weight, const T* dy, T* dx, int n, int dim, T eps) {
  for (int t = 0; t < n; ++t) {
    const T* xr = x + At(t, dim);
    const T* g = dy + At(t, dim);
    T ss = 0, dot = 0;
#pragma omp simd reduction(+ : ss, dot)
    for (int i = 0; i < dim; ++i) {
      ss += xr[i] * xr[i];
      dot += g[i] * weight[i] * xr[i];
    }
    const T r = T(1) / std::sqrt(ss / static_cast<T>(dim) + eps);
    const T k = r * r * r * dot / static_cast<T>(dim);
    T* o = dx + At(t, dim);
#pragma omp simd
    for (int i = 0; i < dim; ++i) o[i] = r * weight[i] * g[i] - k * xr[i];
  }
}

}  // namespace

void Silu(const float* x, float* y, int64_t n) { SiluT(x, y, n); }
void Silu(const double* x, double* y, int64_t n) { SiluT(x, y, n); }
void SiluBackward(const float* x, const float* dy, float* dx, int64_t n) { SiluBackwardT(x, dy, dx, n); }
void SiluBackward(const double* x, const double* dy, double* dx, int64_t n) { SiluBackwardT(x, dy, dx, n); }

void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) {
  SwiGluBackwardT(gate, up, dout, dgate, dup, n);
}
void SwiGluBackward(const double* gate, const double* up, const double* dout, double* dgate, double* dup, int64_t n) {
  SwiGluBackwardT(gate, up, dout, dgate, dup, n);
}

void RmsNormBackward(const float* x, const float* weight, const float* dy, float* dx, int n, int dim, float eps) {
  RmsNormBackwardT(x, weight, dy, dx, n, dim, eps);
}
void RmsNormBackward(const double* x, const double* weight, const double* dy, double* dx, int n, int dim,
                     double eps) {
  RmsNormBackwardT(x, weight, dy, dx, n, dim, eps);
}

// ---- Causal softmax attention: double reference ----------------------------------------------------

namespace {

// Strides of the [B*T][H*d] activation layouts.
struct AttnDims {
  int B, T, Hq, Hkv, d;
  int group() const { return Hq / Hkv; }
  int64_t Q(int b, int i, int h) const { return ((static_cast<int64_t>(b) * T + i) * Hq + h) * d; }
  int64_t KV(int b, int j, int g) const { return ((static_cast<int64_t>(b) * T + j) * Hkv + g) * d; }
  int64_t P(int b, int h) const { return (static_cast<int64_t>(b) * Hq + h) * T * T; }
};

double DotD(const double* a, const double* b, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void CausalAttentionForward(const double* q, const double* k, const double* v, double* out, double* probs, int B,
                            int T, int Hq, int Hkv, int d, ThreadPool& pool) {
  const AttnDims a{B, T, Hq, Hkv, d};
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int g = h / a.group();
      for (int i = 0; i < T; ++i) {
        double* p = probs + a.P(b, h) + At(i, T);
        std::fill(p, p + T, 0.0);
        for (int j = 0; j <= i; ++j) p[j] = DotD(q + a.Q(b, i, h), k + a.KV(b, j, g), d) * scale;
        SoftmaxRow(p, p, i + 1);
        double* o = out + a.Q(b, i, h);
        std::fill(o, o + d, 0.0);
        for (int j = 0; j <= i; ++j)
          for (int c = 0; c < d; ++c) o[c] += p[j] * v[a.KV(b, j, g) + c];
      }
    }
}

// dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K * scale, dK = dS^T Q * scale, dV = P^T dO.
void CausalAttentionBackward(const double* q, const double* k, const double* v, const double* probs,
                             const double* dout, double* dq, double* dk, double* dv, int B, int T, int Hq, int Hkv,
                             int d, ThreadPool& pool) {
  const AttnDims a{B, T, Hq, Hkv, d};
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::fill(dk, dk + a.KV(B, 0, 0), 0.0);
  std::fill(dv, dv + a.KV(B, 0, 0), 0.0);
  std::vector<double> ds(T);  // [T]: one row of dS
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int g = h / a.group();
      for (int i = 0; i < T; ++i) {
        const double* p = probs + a.P(b, h) + At(i, T);
        const double* go = dout + a.Q(b, i, h);
        double rowdot = 0.0;
        for (int j = 0; j <= i; ++j) {
          ds[j] = DotD(go, v + a.KV(b, j, g), d);  // dP
          rowdot += ds[j] * p[j];
        }
        double* gq = dq + a.Q(b, i, h);
        std::fill(gq, gq + d, 0.0);
        for (int j = 0; j <= i; ++j) {
          ds[j] = p[j] * (ds[j] - rowdot);
          for (int c = 0; c < d; ++c) {
            gq[c] += ds[j] * k[a.KV(b, j, g) + c] * scale;
            dk[a.KV(b, j, g) + c] += ds[j] * q[a.Q(b, i, h) + c] * scale;
            dv[a.KV(b, j, g) + c] += p[j] * go[c];
          }
        }
      }
    }
}

// ---- Causal softmax attention: float, GEMMs per (sequence, head) -----------------------------------
// Computing the masked upper triangle in the GEMMs costs at most 2x the useful work, far less than
// scalar dot products lose (as in FullKvCache::AttendGemm).

void CausalAttentionForward(const float* q, const float* k, const float* v, float* out, float* probs, int B, int T,
                            int Hq, int Hkv, int d, ThreadPool& pool) {
  const AttnDims a{B, T, Hq, Hkv, d};
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int ldq = Hq * d, ldk = Hkv * d;
  for (int b = 0; b < B; ++b)  // S = scale Q K^T, written straight into probs
    for (int h = 0; h < Hq; ++h)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, d, scale, q + a.Q(b, 0, h), ldq,
                  k + a.KV(b, 0, h / a.group()), ldk, 0.0f, probs + a.P(b, h), T);
  // One pass over all B * Hq * T rows: causal softmax, zeros above the diagonal.
  pool.ParallelForChunked(static_cast<int64_t>(B) * Hq * T, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = probs + At(r, T);
      const int visible = static_cast<int>(r % T) + 1;
      Softmax(row, visible);
      std::fill(row + visible, row + T, 0.0f);
    }
  });
  for (int b = 0; b < B; ++b)  // O = P V
    for (int h = 0; h < Hq; ++h)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, d, T, 1.0f, probs + a.P(b, h), T,
                  v + a.KV(b, 0, h / a.group()), ldk, 0.0f, out + a.Q(b, 0, h), ldq);
}

void CausalAttentionBackward(const float* q, const float* k, const float* v, const float* probs, const float* dout,
                             float* dq, float* dk, float* dv, int B, int T, int Hq, int Hkv, int d, ThreadPool& pool) {
  const AttnDims a{B, T, Hq, Hkv, d};
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const int ldq = Hq * d, ldk = Hkv * d;
  std::vector<float> ds(static_cast<size_t>(T) * T);  // [T][T]: dP, then dS in place
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int g = h / a.group();
      const float beta = h % a.group() == 0 ? 0.0f : 1.0f;  // the group's first head overwrites dK, dV
      const float* P = probs + a.P(b, h);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, d, 1.0f, dout + a.Q(b, 0, h), ldq,
                  v + a.KV(b, 0, g), ldk, 0.0f, ds.data(), T);
      pool.ParallelForChunked(T, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const float* p = P + At(i, T);
          float* s = ds.data() + At(i, T);
          const int visible = static_cast<int>(i) + 1;
          float rowdot = 0.0f;
#pragma omp simd reduction(+ : rowdot)
          for (int j = 0; j < visible; ++j) rowdot += p[j] * s[j];
#pragma omp simd
          for (int j = 0; j < visible; ++j) s[j] = p[j] * (s[j] - rowdot);
          std::fill(s + visible, s + T, 0.0f);
        }
      });
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, d, T, scale, ds.data(), T, k + a.KV(b, 0, g), ldk,
                  0.0f, dq + a.Q(b, 0, h), ldq);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, d, T, scale, ds.data(), T, q + a.Q(b, 0, h), ldq, beta,
                  dk + a.KV(b, 0, g), ldk);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, d, T, 1.0f, P, T, dout + a.Q(b, 0, h), ldq, beta,
                  dv + a.KV(b, 0, g), ldk);
    }
}

// ---- Level mask ------------------------------------------------------------------------------------

void LevelMask(const double* p, const int* levels, int L, double* m, int n, int D) {
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i) {
      double s = 0.0;
      for (int j = 0; j < L; ++j)
        if (i < levels[j]) s += p[At(t, L) + j];
      m[At(t, D) + i] = s;
    }
}

// Levels increase, so m is constant on each [levels[j-1], levels[j]): the suffix sum p[j..L-1].
void LevelMask(const float* p, const int* levels, int L, float* m, int n, int D) {
  for (int t = 0; t < n; ++t) {
    float* mr = m + At(t, D);
    std::fill(mr + levels[L - 1], mr + D, 0.0f);
    float suffix = 0.0f;
    for (int j = L - 1; j >= 0; --j) {
      suffix += p[At(t, L) + j];
      std::fill(mr + (j > 0 ? levels[j - 1] : 0), mr + levels[j], suffix);
    }
  }
}

void LevelMaskBackward(const double* dm, const int* levels, int L, double* dp, int n, int D) {
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < L; ++j) {
      double s = 0.0;
      for (int i = 0; i < levels[j]; ++i) s += dm[At(t, D) + i];
      dp[At(t, L) + j] = s;
    }
}

// dp[j] is the prefix sum of dm up to levels[j]: one running sum per row.
void LevelMaskBackward(const float* dm, const int* levels, int L, float* dp, int n, int D) {
  for (int t = 0; t < n; ++t) {
    const float* g = dm + At(t, D);
    float acc = 0.0f;
    int i = 0;
    for (int j = 0; j < L; ++j) {
      for (; i < levels[j]; ++i) acc += g[i];
      dp[At(t, L) + j] = acc;
    }
  }
}

// ---- Low-rank mask: double reference ---------------------------------------------------------------

void LowRankMaskForward(const double* x, const double* u, const double* mu, const double* m, double* c, double* xhat,
                        int n, int D) {
  for (int t = 0; t < n; ++t) {
    for (int j = 0; j < D; ++j) {  // c = (x - mu) U
      double s = 0.0;
      for (int i = 0; i < D; ++i) s += (x[At(t, D) + i] - mu[i]) * u[At(i, D) + j];
      c[At(t, D) + j] = s;
    }
    for (int i = 0; i < D; ++i) {  // xhat = (m * c) U^T + mu
      double s = mu[i];
      for (int j = 0; j < D; ++j) s += m[At(t, D) + j] * c[At(t, D) + j] * u[At(i, D) + j];
      xhat[At(t, D) + i] = s;
    }
  }
}

// g = dxhat U; dm = c * g; dx = (m * g) U^T; du += dxhat^T (m * c) + (x - mu)^T (m * g);
// dmu += sum_t (dxhat_t - dx_t): mu enters xhat directly and through c = (x - mu) U.
void LowRankMaskBackward(const double* x, const double* u, const double* mu, const double* m, const double* c,
                         const double* dxhat, double* dx, double* dm, double* du, double* dmu, int n, int D) {
  std::vector<double> g(D);  // [D]: dxhat U for one row
  for (int t = 0; t < n; ++t) {
    const int64_t r = At(t, D);
    for (int j = 0; j < D; ++j) {
      g[j] = 0.0;
      for (int i = 0; i < D; ++i) g[j] += dxhat[r + i] * u[At(i, D) + j];
      dm[r + j] = c[r + j] * g[j];
    }
    for (int i = 0; i < D; ++i) {
      dx[r + i] = 0.0;
      for (int j = 0; j < D; ++j) dx[r + i] += m[r + j] * g[j] * u[At(i, D) + j];
    }
    if (du != nullptr)
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < D; ++j)
          du[At(i, D) + j] += dxhat[r + i] * m[r + j] * c[r + j] + (x[r + i] - mu[i]) * m[r + j] * g[j];
    if (dmu != nullptr)
      for (int i = 0; i < D; ++i) dmu[i] += dxhat[r + i] - dx[r + i];
  }
}

// ---- Low-rank mask: float, GEMMs over all rows -----------------------------------------------------

namespace {

// out[n][D] = a * b element-wise.
void MulRows(const float* a, const float* b, float* out, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) out[i] = a[i] * b[i];
}

// out[n][D] = x - mu per row.
void Center(const float* x, const float* mu, float* out, int n, int D) {
  for (int t = 0; t < n; ++t)
#pragma omp simd
    for (int i = 0; i < D; ++i) out[At(t, D) + i] = x[At(t, D) + i] - mu[i];
}

}  // namespace

void LowRankMaskForward(const float* x, const float* u, const float* mu, const float* m, float* c, float* xhat, int n,
                        int D) {
  if (n <= 0) return;
  std::vector<float> tmp(static_cast<size_t>(n) * D);  // [n][D]: x - mu, then m * c
  Center(x, mu, tmp.data(), n, D);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, D, 1.0f, tmp.data(), D, u, D, 0.0f, c, D);
  MulRows(m, c, tmp.data(), At(n, D));
  for (int t = 0; t < n; ++t) std::memcpy(xhat + At(t, D), mu, sizeof(float) * D);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, D, D, 1.0f, tmp.data(), D, u, D, 1.0f, xhat, D);
}

void LowRankMaskBackward(const float* x, const float* u, const float* mu, const float* m, const float* c,
                         const float* dxhat, float* dx, float* dm, float* du, float* dmu, int n, int D) {
  if (n <= 0) return;
  const int64_t count = At(n, D);
  std::vector<float> g(count), mg(count);  // [n][D]: dxhat U, m * g
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, D, 1.0f, dxhat, D, u, D, 0.0f, g.data(), D);
  MulRows(c, g.data(), dm, count);
  MulRows(m, g.data(), mg.data(), count);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, D, D, 1.0f, mg.data(), D, u, D, 0.0f, dx, D);
  if (du != nullptr) {
    MulRows(m, c, g.data(), count);  // g is free now: m * c
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, D, D, n, 1.0f, dxhat, D, g.data(), D, 1.0f, du, D);
    Center(x, mu, g.data(), n, D);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, D, D, n, 1.0f, g.data(), D, mg.data(), D, 1.0f, du, D);
  }
  if (dmu != nullptr)
    for (int t = 0; t < n; ++t)
#pragma omp simd
      for (int i = 0; i < D; ++i) dmu[i] += dxhat[At(t, D) + i] - dx[At(t, D) + i];
}

// ---- Gumbel-softmax and expected cost (rows of a few levels: one template for both) ----------------

namespace {

// g may be null: no noise (evaluation, or a deterministic relaxation).
template <typename T>
void GumbelSoftmaxForwardT(const T* logits, const T* g, T tau, bool hard, T* y, T* p, int n, int L) {
  for (int t = 0; t < n; ++t) {
    T* yr = y + At(t, L);
    for (int j = 0; j < L; ++j) yr[j] = (logits[At(t, L) + j] + (g ? g[At(t, L) + j] : T(0))) / tau;
    SoftmaxRow(yr, yr, L);
    T* pr = p + At(t, L);
    if (hard) {
      const int best = ArgMax(yr, L);
      for (int j = 0; j < L; ++j) pr[j] = j == best ? T(1) : T(0);
    } else if (pr != yr) {
      std::copy(yr, yr + L, pr);
    }
  }
}

template <typename T>
void GumbelSoftmaxBackwardT(const T* y, const T* dp, T tau, T* dlogits, int n, int L) {
  for (int t = 0; t < n; ++t) {
    const T* yr = y + At(t, L);
    const T* g = dp + At(t, L);
    T dot = 0;
    for (int j = 0; j < L; ++j) dot += g[j] * yr[j];
    for (int j = 0; j < L; ++j) dlogits[At(t, L) + j] = yr[j] * (g[j] - dot) / tau;
  }
}

// q = softmax(logits row) into q[L]; returns e = sum_j q_j cost_j.
template <typename T>
T ExpectRow(const T* logits, const T* cost, T* q, int L) {
  SoftmaxRow(logits, q, L);
  T e = 0;
  for (int j = 0; j < L; ++j) e += q[j] * cost[j];
  return e;
}

template <typename T>
void SoftmaxExpectationT(const T* logits, const T* cost, T* e, int n, int L) {
  std::vector<T> q(L);
  for (int t = 0; t < n; ++t) e[t] = ExpectRow(logits + At(t, L), cost, q.data(), L);
}

template <typename T>
void SoftmaxExpectationBackwardT(const T* logits, const T* cost, const T* de, T* dlogits, int n, int L) {
  std::vector<T> q(L);
  for (int t = 0; t < n; ++t) {
    const T e = ExpectRow(logits + At(t, L), cost, q.data(), L);
    for (int j = 0; j < L; ++j) dlogits[At(t, L) + j] = de[t] * q[j] * (cost[j] - e);
  }
}

}  // namespace

void GumbelSoftmaxForward(const float* logits, const float* g, float tau, bool hard, float* y, float* p, int n, int L) {
  GumbelSoftmaxForwardT(logits, g, tau, hard, y, p, n, L);
}
void GumbelSoftmaxForward(const double* logits, const double* g, double tau, bool hard, double* y, double* p, int n,
                          int L) {
  GumbelSoftmaxForwardT(logits, g, tau, hard, y, p, n, L);
}
void GumbelSoftmaxBackward(const float* y, const float* dp, float tau, float* dlogits, int n, int L) {
  GumbelSoftmaxBackwardT(y, dp, tau, dlogits, n, L);
}
void GumbelSoftmaxBackward(const double* y, const double* dp, double tau, double* dlogits, int n, int L) {
  GumbelSoftmaxBackwardT(y, dp, tau, dlogits, n, L);
}

void SoftmaxExpectation(const float* logits, const float* cost, float* e, int n, int L) {
  SoftmaxExpectationT(logits, cost, e, n, L);
}
void SoftmaxExpectation(const double* logits, const double* cost, double* e, int n, int L) {
  SoftmaxExpectationT(logits, cost, e, n, L);
}
void SoftmaxExpectationBackward(const float* logits, const float* cost, const float* de, float* dlogits, int n, int L) {
  SoftmaxExpectationBackwardT(logits, cost, de, dlogits, n, L);
}
void SoftmaxExpectationBackward(const double* logits, const double* cost, const double* de, double* dlogits, int n,
                                int L) {
  SoftmaxExpectationBackwardT(logits, cost, de, dlogits, n, L);
}

// ---- Distillation loss: double reference -------------------------------------------------------------

namespace {

// log sum_v exp(x_v), max-subtracted.
double LogSumExp(const double* x, int V) {
  double mx = x[0];
  for (int v = 1; v < V; ++v) mx = std::max(mx, x[v]);
  double sum = 0.0;
  for (int v = 0; v < V; ++v) sum += std::exp(x[v] - mx);
  return mx + std::log(sum);
}

}  // namespace

// kl = sum_v pt (log pt - log ps) has d/ds_v = ps_v - pt_v (sum pt = 1); ce = lse - s[target] has
// d/ds_v = ps_v - [v == target].
DistillLossSums DistillLoss(const double* s, const double* teacher, const int32_t* target, int n, int V, double w_kl,
                            double w_ce, double scale, double* ds, ThreadPool& pool) {
  DistillLossSums sums;
  for (int t = 0; t < n; ++t) {
    const double* sr = s + At(t, V);
    double* g = ds + At(t, V);
    const double lse = LogSumExp(sr, V);
    std::fill(g, g + V, 0.0);
    if (teacher != nullptr) {
      const double* tr = teacher + At(t, V);
      const double lse_t = LogSumExp(tr, V);
      for (int v = 0; v < V; ++v) {
        const double lt = tr[v] - lse_t, ls = sr[v] - lse;
        sums.kl += std::exp(lt) * (lt - ls);
        g[v] += scale * w_kl * (std::exp(ls) - std::exp(lt));
      }
      if (ArgMax(sr, V) == ArgMax(tr, V)) ++sums.top1_agree;
    }
    if (target != nullptr && target[t] >= 0) {
      sums.ce += lse - sr[target[t]];
      for (int v = 0; v < V; ++v) g[v] += scale * w_ce * (std::exp(sr[v] - lse) - (v == target[t] ? 1.0 : 0.0));
    }
  }
  return sums;
}

// ---- Distillation loss: float, rows on the pool ------------------------------------------------------

namespace {

float MaxOf(const float* x, int n) {
  float mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int i = 1; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  return mx;
}

// log sum_v exp(x_v) and its inverse partition sum, leaving e[V] = exp(x - max(x)) (vectorized
// exp, ~2 ulp); the sum runs in double so that 10^5 vocabulary terms lose nothing to float
// accumulation.
struct LogSum {
  double lse;
  float inv;  // 1 / sum_v e[v]: e[v] * inv is the softmax
  float max;
};
LogSum ExpAndLogSum(const float* x, float* e, int V) {
  const float mx = MaxOf(x, V);
  std::memcpy(e, x, sizeof(float) * V);
  ExpShiftSum(e, V, mx);
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int v = 0; v < V; ++v) sum += e[v];
  return {mx + std::log(sum), static_cast<float>(1.0 / sum), mx};
}

struct DistillRowArgs {
  const float* s;
  const float* teacher;
  const int32_t* target;
  int V;
  float w_kl, w_ce, scale;
};

// One row t into acc, ds row overwritten; et [V] is scratch for the teacher's exponentials.
void DistillRow(const DistillRowArgs& a, int64_t t, float* ds, float* et, DistillLossSums& acc) {
  const int V = a.V;
  const float* sr = a.s + At(t, V);
  float* g = ds + At(t, V);
  const bool kl = a.teacher != nullptr, ce = a.target != nullptr && a.target[t] >= 0;
  if (!kl && !ce) {
    std::fill(g, g + V, 0.0f);
    return;
  }
  const LogSum ls = ExpAndLogSum(sr, g, V);  // g = exp(s - max s) for now
  const float a_ps = a.scale * ((kl ? a.w_kl : 0.0f) + (ce ? a.w_ce : 0.0f));
  if (kl) {
    const float* tr = a.teacher + At(t, V);
    const LogSum lt = ExpAndLogSum(tr, et, V);
    const double shift = ls.lse - lt.lse;  // log pt - log ps = (t - s) + (lse_s - lse_t)
    const float a_pt = a.scale * a.w_kl;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int v = 0; v < V; ++v) {
      const float pt = et[v] * lt.inv;
      sum += pt * (static_cast<double>(tr[v]) - sr[v] + shift);
      g[v] = a_ps * (g[v] * ls.inv) - a_pt * pt;
    }
    acc.kl += sum;
    // First maxima, found from the maxima already known (a vectorized max beats a scalar argmax).
    if (std::find(sr, sr + V, ls.max) - sr == std::find(tr, tr + V, lt.max) - tr) ++acc.top1_agree;
  } else {
#pragma omp simd
    for (int v = 0; v < V; ++v) g[v] = a_ps * (g[v] * ls.inv);
  }
  if (ce) {
    acc.ce += ls.lse - sr[a.target[t]];
    g[a.target[t]] -= a.scale * a.w_ce;
  }
}

}  // namespace

DistillLossSums DistillLoss(const float* s, const float* teacher, const int32_t* target, int n, int V, float w_kl,
                            float w_ce, float scale, float* ds, ThreadPool& pool) {
  const DistillRowArgs args{s, teacher, target, V, w_kl, w_ce, scale};
  std::vector<DistillLossSums> partial(pool.size());  // one per part of the pool
  pool.ParallelFor(n, [&](int64_t begin, int64_t end, int tid) {
    std::vector<float> et(teacher != nullptr ? V : 0);  // [V]
    DistillLossSums acc;
    for (int64_t t = begin; t < end; ++t) DistillRow(args, t, ds, et.data(), acc);
    partial[tid] = acc;
  });
  DistillLossSums sums;
  for (const DistillLossSums& p : partial) {  // part order: independent of timing
    sums.kl += p.kl;
    sums.ce += p.ce;
    sums.top1_agree += p.top1_agree;
  }
  return sums;
}

}  // namespace dk
