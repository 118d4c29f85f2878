// The Cayley map, to train an orthonormal basis (MatryoshkaKV's way of keeping U orthonormal):
//   A = W - W^T (skew-symmetric; W [D][D] unconstrained)     Q(W) = (I - A)(I + A)^{-1}
// Q is orthogonal with det +1 for every W, and Q(0) = I. A trained basis is U = U_PCA Q(W), so it
// starts at the calibrated PCA basis whatever the sign of det(U_PCA): no determinant-sign correction
// is needed, since the rotation multiplies the PCA basis instead of having to reach it.
#pragma once

#include <vector>

#include "core/status.h"

namespace dk {

// q [D][D] = Q(w); minv [D][D] = (I + A)^{-1} (kept for the backward).
Status CayleyForward(const float* w, int D, float* q, float* minv);
Status CayleyForward(const double* w, int D, double* q, double* minv);
// dw [D][D] += dL/dW from dq = dL/dQ:  dL/dA = -(I + Q)^T dQ M^T,  dL/dW = dL/dA - (dL/dA)^T.
void CayleyBackward(const float* q, const float* minv, const float* dq, int D, float* dw);
void CayleyBackward(const double* q, const double* minv, const double* dq, int D, double* dw);

}  // namespace dk
