// Dense causal attention kernels on fp32 key/value rows (the full-cache path, and the
// reference that compressed backends are checked against).
#pragma once

#include <cstdint>

namespace dk {

// One query head against T cached rows.
//   q: [d]   k, v: row t at k + t * stride (d floats)   out: [d]   scores: scratch [T]
void AttendOne(const float* q, const float* k, const float* v, int64_t stride, int T, int d, float scale,
               float* out, float* scores);

}  // namespace dk
