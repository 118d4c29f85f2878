#include "train/cayley.h"

#include <lapacke.h>

#include <string>
#include <vector>

namespace dk {

namespace {

// LAPACK in the precision of T.
lapack_int Getrf(int D, float* a, lapack_int* ipiv) { return LAPACKE_sgetrf(LAPACK_ROW_MAJOR, D, D, a, D, ipiv); }
lapack_int Getrf(int D, double* a, lapack_int* ipiv) { return LAPACKE_dgetrf(LAPACK_ROW_MAJOR, D, D, a, D, ipiv); }
lapack_int Getri(int D, float* a, const lapack_int* ipiv) {
  return LAPACKE_sgetri(LAPACK_ROW_MAJOR, D, a, D, ipiv);
}
lapack_int Getri(int D, double* a, const lapack_int* ipiv) {
  return LAPACKE_dgetri(LAPACK_ROW_MAJOR, D, a, D, ipiv);
}

template <typename T>
Status Forward(const T* w, int D, T* q, T* minv) {
  const size_t n = static_cast<size_t>(D);
  // minv = I + A, then inverted in place.
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j) minv[i * n + j] = (i == j ? T(1) : T(0)) + (w[i * n + j] - w[j * n + i]);
  std::vector<lapack_int> ipiv(n);
  if (lapack_int info = Getrf(D, minv, ipiv.data()); info != 0)
    return Internal("Cayley map: LU of I + A failed (info " + std::to_string(info) + ")");
  if (lapack_int info = Getri(D, minv, ipiv.data()); info != 0)
    return Internal("Cayley map: inverse of I + A failed (info " + std::to_string(info) + ")");
  // q = (I - A) minv: small D (the KV width), a plain triple loop in the precision of T.
  for (size_t i = 0; i < n; ++i) {
    T* qi = q + i * n;
    for (size_t j = 0; j < n; ++j) qi[j] = minv[i * n + j];
    for (size_t k = 0; k < n; ++k) {
      const T a_ik = w[i * n + k] - w[k * n + i];
      if (a_ik == T(0)) continue;
      const T* mk = minv + k * n;
      for (size_t j = 0; j < n; ++j) qi[j] -= a_ik * mk[j];
    }
  }
  return Status::Ok();
}

template <typename T>
void Backward(const T* q, const T* minv, const T* dq, int D, T* dw) {
  const size_t n = static_cast<size_t>(D);
  // g = (I + Q)^T dQ, then dA = -g M^T.
  std::vector<T> g(n * n, T(0)), da(n * n, T(0));
  for (size_t i = 0; i < n; ++i)
    for (size_t k = 0; k < n; ++k) {
      const T a = (i == k ? T(1) : T(0)) + q[k * n + i];  // (I + Q)^T[i][k]
      if (a == T(0)) continue;
      for (size_t j = 0; j < n; ++j) g[i * n + j] += a * dq[k * n + j];
    }
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j) {
      T s = T(0);
      for (size_t k = 0; k < n; ++k) s += g[i * n + k] * minv[j * n + k];  // (g M^T)[i][j]
      da[i * n + j] = -s;
    }
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < n; ++j) dw[i * n + j] += da[i * n + j] - da[j * n + i];
}

}  // namespace

Status CayleyForward(const float* w, int D, float* q, float* minv) { return Forward(w, D, q, minv); }
Status CayleyForward(const double* w, int D, double* q, double* minv) { return Forward(w, D, q, minv); }
void CayleyBackward(const float* q, const float* minv, const float* dq, int D, float* dw) {
  Backward(q, minv, dq, D, dw);
}
void CayleyBackward(const double* q, const double* minv, const double* dq, int D, double* dw) {
  Backward(q, minv, dq, D, dw);
}

}  // namespace dk
