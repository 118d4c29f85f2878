#include "ops/ops.h"

#include <cblas.h>

#include <cmath>

#include "ops/simd.h"
#include <vector>

namespace dk {

void MatMulWT(const float* x, const float* w, float* y, int n, int in, int out) {
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 0.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  }
}

void MatMulWTAdd(const float* x, const float* w, float* y, int n, int in, int out) {
  if (n == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, w, in, x, 1, 1.0f, y, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, out, in, 1.0f, x, in, w, in, 1.0f, y, out);
  }
}

void RmsNorm(const float* x, const float* weight, float* out, int n, int dim, float eps) {
  for (int r = 0; r < n; ++r) {
    const float* xr = x + static_cast<int64_t>(r) * dim;
    float* o = out + static_cast<int64_t>(r) * dim;
    float ss = 0.0f;
    for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int i = 0; i < dim; ++i) o[i] = xr[i] * scale * weight[i];
  }
}

void Rope(float* x, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox) {
  // theta_i = pos * base^(-2i/n_rot), computed as llama.cpp does (repeated float multiply).
  const float theta_scale = std::pow(base, -2.0f / static_cast<float>(n_rot));
  std::vector<float> cs(n_rot / 2), sn(n_rot / 2);
  for (int t = 0; t < n; ++t) {
    float theta = static_cast<float>(pos[t]);
    for (int i = 0; i < n_rot / 2; ++i) {
      cs[i] = std::cos(theta);
      sn[i] = std::sin(theta);
      theta *= theta_scale;
    }
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (static_cast<int64_t>(t) * n_heads + h) * head_dim;
      for (int i = 0; i < n_rot / 2; ++i) {
        const int a = neox ? i : 2 * i;
        const int b = neox ? i + n_rot / 2 : 2 * i + 1;
        const float x0 = v[a], x1 = v[b];
        v[a] = x0 * cs[i] - x1 * sn[i];
        v[b] = x0 * sn[i] + x1 * cs[i];
      }
    }
  }
}

void SwiGlu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void Softmax(float* x, int n) {
  float mx = x[0];
  for (int i = 1; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  const float inv = 1.0f / ExpShiftSum(x, n, mx);
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

void AddBias(float* x, const float* bias, int n, int dim) {
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < dim; ++i) x[static_cast<int64_t>(r) * dim + i] += bias[i];
}

int64_t FirstNonFinite(const float* x, int64_t n) {
  constexpr int64_t kBlock = 1024;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = n - b < kBlock ? n - b : kBlock;
    const float* p = x + b;
    // x - x is 0 for a finite x and NaN for NaN or infinity; NaN compares false, so `bad` counts them.
    int bad = 0;
#pragma omp simd reduction(+ : bad)
    for (int64_t i = 0; i < m; ++i) bad += !((p[i] - p[i]) == 0.0f);
    if (bad == 0) continue;
    for (int64_t i = 0; i < m; ++i)
      if (!std::isfinite(p[i])) return b + i;
  }
  return -1;
}

float Dot(const float* a, const float* b, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void Axpy(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace dk
