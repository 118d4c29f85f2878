// Hot inner loops of attention, vectorized with AVX2/F16C/FMA when the target has them, with a
// plain scalar version of each kept beside it as the reference (tests compare the two).
#pragma once

#include <cstdint>

namespace dk {

// sum_i a[i] * b[i], b stored as IEEE fp16.
float DotF16(const float* a, const uint16_t* b, int n);
// y[i] += alpha * x[i], x stored as fp16.
void AxpyF16(float alpha, const uint16_t* x, float* y, int n);
// x[i] = exp(x[i] - shift), returns the sum. Max relative error of the exp ~2 ulp in float.
float ExpShiftSum(float* x, int n, float shift);

namespace scalar {
float DotF16(const float* a, const uint16_t* b, int n);
void AxpyF16(float alpha, const uint16_t* x, float* y, int n);
float ExpShiftSum(float* x, int n, float shift);
}  // namespace scalar

}  // namespace dk
