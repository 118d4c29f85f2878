// Quantization kernels for compressed KV caches: the quantizers, their dequantizers, and the
// attention inner loops (dot with a query, axpy into an output) that run on the codes without
// materializing fp32 rows. Like ops/simd.h, each hot kernel has an AVX2/FMA version and a plain
// scalar reference of the same name in namespace scalar (tests compare the two).
//
// Four families:
//   q8_0, q4_0      llama.cpp's 32-value blocks, bit-compatible with ggml (GGUF weights use them too);
//   asym b-bit      KIVI's min/max quantization of one strided group (b = 2, 4, 8);
//   FWHT            the normalized Walsh-Hadamard rotation that spreads outliers before quantizing;
//   sym latent      per-group symmetric int8/int4 codes for DynaKV's low-rank latents.
// Error bounds are derived beside each quantizer; u16 = 2^-11 is fp16's unit roundoff and 2^-25
// half its smallest subnormal, so an fp16-rounded value v16 of v satisfies
// |v - v16| <= max(u16 |v|, 2^-25) as long as |v| < 65504 (fp16's largest finite value). All
// quantizers require their stored scales and mins to be in that range (true of KV activations).
#pragma once

#include <cstddef>
#include <cstdint>

namespace dk {

// ---- ggml q8_0 / q4_0 --------------------------------------------------------------------------
constexpr int kQuantBlock = 32;  // values per q8_0 / q4_0 block (ggml's QK8_0 = QK4_0)

// x[j] = d * qs[j], d an fp16 bit pattern.
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQuantBlock];
};
// x[j] = d * (q_j - 8), q_j in [0, 15]: q_j is the low nibble of qs[j] for j < 16, and the high
// nibble of qs[j - 16] for j >= 16.
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQuantBlock / 2];
};
static_assert(sizeof(BlockQ8_0) == 34, "ggml block_q8_0 is 34 bytes");
static_assert(sizeof(BlockQ4_0) == 18, "ggml block_q4_0 is 18 bytes");

// n (a multiple of 32) values into n / 32 blocks, exactly as ggml's quantize_row_q8_0_ref:
// d = amax / 127, q = roundf(x * (1/d)) with the fp32 d (not the stored d16), d16 = fp16(d).
// Error: |q| <= 127 and |x - d q| <= d/2, so |x - d16 q| <= d/2 + 127 |d - d16|
//        <= d/2 + 127 max(u16 d, 2^-25) = amax (1/254 + u16) for a normal fp16 d (plus fp32 rounding).
void QuantizeRowQ8_0(const float* x, BlockQ8_0* y, int64_t n);
// As ggml's quantize_row_q4_0_ref: max = the first value of largest magnitude, with its sign;
// d = max / -8, q = min(15, (int8)(x * (1/d) + 8.5f)) (truncation of a positive value: round half
// up). The extreme maps to q = 0, i.e. exactly -8 d = max; where x/d <= 7.5 the error is <= |d|/2,
// and the opposite end (x/d up to +8, clamped to q - 8 = 7) errs by up to |d|. Plus 8 |d - d16|.
void QuantizeRowQ4_0(const float* x, BlockQ4_0* y, int64_t n);
void DequantizeRowQ8_0(const BlockQ8_0* x, float* y, int64_t n);
void DequantizeRowQ4_0(const BlockQ4_0* x, float* y, int64_t n);

// sum_i q[i] * dequant(x)[i] over n values (a multiple of 32): a query against a quantized key.
float DotQ8_0(const float* q, const BlockQ8_0* x, int n);
float DotQ4_0(const float* q, const BlockQ4_0* x, int n);
// y[i] += a * dequant(x)[i]: a probability times a quantized value row, into the output.
void AxpyQ8_0(float a, const BlockQ8_0* x, float* y, int n);
void AxpyQ4_0(float a, const BlockQ4_0* x, float* y, int n);

// ---- Asymmetric b-bit groups (KIVI) ------------------------------------------------------------
// Bytes holding n codes of b bits: ceil(n * b / 8). Codes are packed little-endian inside each
// byte (2-bit: code i at bits 2*(i%4) of byte i/4; 4-bit: low nibble first); padding bits are 0.
size_t AsymCodeBytes(int n, int bits);

// Quantizes the group x[0], x[stride], ..., x[(n-1)*stride] (n >= 1, bits in {2, 4, 8}): a
// per-channel key group strided across tokens, or a per-token value group with stride 1.
// Stores min16 = fp16(min) and scale16 = fp16((max - min) / L), L = 2^b - 1, and
// code_i = clamp(round((x_i - min16) / scale16), 0, L) from the ROUNDED min16 and scale16, so the
// bound below is about dequantization with the stored values. A group with scale16 = 0 (constant,
// or a range below L * 2^-25) stores code 0 everywhere and reproduces min16.
//
// Error bound. Write x_i = min16 + t_i scale16 (exact reals), s = (max - min) / L.
//   0 <= t_i <= L:  the code is round(t_i), so |x_i - x^_i| <= scale16 / 2.
//   t_i < 0:        only when min16 > min; code 0, error = min16 - x_i <= |min - min16|.
//   t_i > L:        only when min16 + L scale16 < max; code L,
//                   error <= max - min16 - L scale16 <= |min - min16| + L |s - scale16|.
// Hence |x_i - x^_i| <= max(scale16 / 2, |min - min16| + L |s - scale16|), where
//   |min - min16| <= max(u16 |min|, 2^-25),
//   |s - scale16| <= (u16 + 2^-23) s + 2^-25 (fp32 max - min and division, then fp16 rounding).
// The clamp term grows with |min| relative to the range: storing the min in fp16 costs up to
// u16 |min| on the group's lowest values, which no choice of codes can recover.
void QuantizeAsym(const float* x, int n, int64_t stride, int bits, uint8_t* codes, uint16_t* min_f16,
                  uint16_t* scale_f16);
// out[i * stride] = min16 + scale16 * code_i.
void DequantizeAsym(const uint8_t* codes, int n, int bits, uint16_t min_f16, uint16_t scale_f16, float* out,
                    int64_t stride);

// Attention on asymmetric codes, without dequantizing. Since x^_i = min16 + scale16 * code_i:
//   per-token group (a value row, or a key row):  sum_i w_i x^_i = min16 * sum_i w_i
//       + scale16 * DotAsymCodes(w, ...), and p * x^ accumulates as AxpyAsymCodes(p * scale16)
//       plus p * min16 added to every output channel (sum those over tokens, add once);
//   per-channel key group (channel c over G tokens): the scores of the G tokens gain
//       q_c * min16_c + (q_c * scale16_c) * code_t, i.e. AxpyAsymCodes(q_c * scale16_c) into the
//       G scores plus a constant sum_c q_c * min16_c.
// sum_i w[i] * code_i over n codes.
float DotAsymCodes(const float* w, const uint8_t* codes, int n, int bits);
// y[i] += a * code_i over n codes.
void AxpyAsymCodes(float a, const uint8_t* codes, int n, int bits, float* y);

// ---- Walsh-Hadamard ----------------------------------------------------------------------------
// x <- H_n x / sqrt(n), H_n the Sylvester Hadamard matrix (H_1 = [1], H_2n = [[H, H], [H, -H]]),
// n a power of two. Orthogonal and symmetric, hence its own inverse. O(n log n) butterflies.
void FwhtInPlace(float* x, int n);

// ---- Symmetric per-group latents (DynaKV int8 / int4) -------------------------------------------
// A latent of r values (r >= 1) in groups of g values (g >= 1; the last group has r - g*(G-1)
// values, G = ceil(r / g)). Each group stores scale16 = fp16(amax / Q), Q = 2^(b-1) - 1 (127 for
// int8, 7 for int4), and codes clamp(round(x / scale16), -Q, Q). Codes are laid out over the
// whole latent, independent of the groups: int8 one two's-complement byte each; int4 two per byte,
// element i in byte i/2 (low nibble for even i), stored offset by 8 (nibble = code + 8, in
// [1, 15], as q4_0 stores its nibbles); a padding nibble is 0. A zero group has scale 0, codes 0.
//
// Error bound. With s = amax / Q: inside [-Q, Q] rounding errs by scale16 / 2; beyond it (only
// when scale16 < s) the clamp errs by amax - Q scale16 <= Q |s - scale16|. So
// |x - x^| <= max(scale16 / 2, Q |s - scale16|), and with |s - scale16| <= (u16 + 2^-24) s + 2^-25:
// Q (u16 + 2^-24) s < s (1 - u16) / 2 <= scale16 / 2 for Q <= 127, i.e. the fp16 rounding of the
// scale never beats the rounding of the codes while scale16 is a normal fp16 number. Only for
// tiny groups (amax < 2^-14 Q, a subnormal scale) does the absolute term Q 2^-25 show up.
size_t SymLatentBytes(int r, int bits, int group);  // codes + 2 bytes (fp16 scale) per group
size_t SymLatentCodeBytes(int r, int bits);         // the codes alone: r or ceil(r / 2)
int SymLatentGroups(int r, int group);              // ceil(r / group)

void QuantizeSymLatent(const float* x, int r, int bits, int group, uint8_t* codes, uint16_t* scales);
// out[i] = x^_i (AVX2 beside scalar::DequantizeSymLatent, bit-identical: one product per number).
// DynaKV's attention decodes a block of latents with it, then multiplies (ops/latent_block.h).
void DequantizeSymLatent(const uint8_t* codes, const uint16_t* scales, int r, int bits, int group, float* out);

namespace scalar {
float DotQ8_0(const float* q, const BlockQ8_0* x, int n);
float DotQ4_0(const float* q, const BlockQ4_0* x, int n);
void AxpyQ8_0(float a, const BlockQ8_0* x, float* y, int n);
void AxpyQ4_0(float a, const BlockQ4_0* x, float* y, int n);
float DotAsymCodes(const float* w, const uint8_t* codes, int n, int bits);
void AxpyAsymCodes(float a, const uint8_t* codes, int n, int bits, float* y);
// The explicit product with H_n in double, O(n^2): the reference the butterflies are tested against.
void FwhtInPlace(float* x, int n);
void DequantizeSymLatent(const uint8_t* codes, const uint16_t* scales, int r, int bits, int group, float* out);
}  // namespace scalar

}  // namespace dk
