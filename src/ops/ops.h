// Model-agnostic kernels on row-major fp32 buffers. Ops know nothing of models or caches.
// Shapes are written [rows][cols]; "row" = one token.
#pragma once

#include <cstdint>

namespace dk {

class ThreadPool;

// y[n][out] = x[n][in] * W^T, W stored [out][in] (ggml's ne0 = in). Uses OpenBLAS.
void MatMulWT(const float* x, const float* w, float* y, int n, int in, int out);
// Same, accumulating: y += x * W^T.
void MatMulWTAdd(const float* x, const float* w, float* y, int n, int in, int out);

// out[i] = x[i] / sqrt(mean(x^2) + eps) * weight[i], for each of n rows of width dim.
void RmsNorm(const float* x, const float* weight, float* out, int n, int dim, float eps);

// Rotary embedding in place on x[n][n_heads * head_dim] for token positions pos[n].
// Only the first n_rot dims of each head rotate. neox=false: adjacent pairs (2i, 2i+1) (llama);
// neox=true: pairs (i, i + n_rot/2) (GPT-NeoX, qwen2).
void Rope(float* x, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox);

// out[i] = silu(gate[i]) * up[i].
void SwiGlu(const float* gate, const float* up, float* out, int64_t n);

// In-place softmax of x[n] (max-subtracted, vectorized exp).
void Softmax(float* x, int n);

// Adds bias[dim] to each of n rows.
void AddBias(float* x, const float* bias, int n, int dim);

// Index of the first NaN or infinity in x[n], or -1 when every value is finite. Branch-free over
// blocks (one pass at memory speed), so a forward pass can check its activations for free.
int64_t FirstNonFinite(const float* x, int64_t n);

float Dot(const float* a, const float* b, int n);
// y += a * x
void Axpy(float a, const float* x, float* y, int n);

}  // namespace dk
