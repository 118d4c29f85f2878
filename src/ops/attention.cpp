#include "ops/attention.h"

#include <cmath>

#include "ops/ops.h"
#include "ops/simd.h"

namespace dk {

void AttendOne(const float* q, const float* k, const float* v, int64_t stride, int T, int d, float scale,
               float* out, float* scores) {
  float mx = -INFINITY;
  for (int t = 0; t < T; ++t) {
    scores[t] = Dot(q, k + t * stride, d) * scale;
    mx = scores[t] > mx ? scores[t] : mx;
  }
  const float inv = 1.0f / ExpShiftSum(scores, T, mx);
  for (int i = 0; i < d; ++i) out[i] = 0.0f;
  for (int t = 0; t < T; ++t) Axpy(scores[t] * inv, v + t * stride, out, d);
}

}  // namespace dk
