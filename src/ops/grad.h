// Training kernels: each backward beside the forward it differentiates, for the router training
// stack (model weights frozen: gradients are taken w.r.t. activations, and w.r.t. the router's
// own small parameters). Every kernel exists twice under the same name:
//   float   the fast version used in training (OpenBLAS GEMMs, threads where it pays);
//   double  a plain scalar loop, the reference: tests check it by central differences in double,
//           and check the float version against it.
// The overloads let model/ and train/ write one templated graph for both precisions.
// Shapes are [rows][cols], row-major; "row" = one token. Gradients are overwritten unless the
// name or comment says they accumulate.
#pragma once

#include <cstdint>

namespace dk {

class ThreadPool;

// ---- Forward kernels in double (the float versions are in ops/ops.h) -------------------------
void MatMulWT(const double* x, const double* w, double* y, int n, int in, int out);
void MatMulWTAdd(const double* x, const double* w, double* y, int n, int in, int out);
void RmsNorm(const double* x, const double* weight, double* out, int n, int dim, double eps);
// Angles are computed exactly as the float Rope computes them (in float), then applied in double,
// so the double path rotates by the same angles as the float one.
void Rope(double* x, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox);
void SwiGlu(const double* gate, const double* up, double* out, int64_t n);

// ---- Linear maps -------------------------------------------------------------------------------
// dx[n][in] = dy[n][out] W[out][in], the input gradient of y = x W^T (accumulate: dx +=).
void MatMulW(const float* dy, const float* w, float* dx, int n, int out, int in, bool accumulate);
void MatMulW(const double* dy, const double* w, double* dx, int n, int out, int in, bool accumulate);

// Trainable linear layer: y[n][out] = x[n][in] W[out][in]^T + b[out] (b may be null).
void LinearForward(const float* x, const float* w, const float* b, float* y, int n, int in, int out);
void LinearForward(const double* x, const double* w, const double* b, double* y, int n, int in, int out);
// Accumulates dW[out][in] += dy^T x and db[out] += column sums of dy (db may be null); writes
// dx[n][in] = dy W (or adds to it when accumulate_dx; dx may be null to skip it).
void LinearBackward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n, int in,
                    int out, bool accumulate_dx);
void LinearBackward(const double* x, const double* w, const double* dy, double* dx, double* dw, double* db, int n,
                    int in, int out, bool accumulate_dx);

// ---- Element-wise and per-row --------------------------------------------------------------------
// y = silu(x) = x * sigmoid(x); dx = dy * silu'(x).
void Silu(const float* x, float* y, int64_t n);
void Silu(const double* x, double* y, int64_t n);
void SiluBackward(const float* x, const float* dy, float* dx, int64_t n);
void SiluBackward(const double* x, const double* dy, double* dx, int64_t n);

// out = silu(gate) * up  ->  dgate, dup.
void SwiGluBackward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n);
void SwiGluBackward(const double* gate, const double* up, const double* dout, double* dgate, double* dup, int64_t n);

// y = RmsNorm(x) * weight (weight frozen) -> dx[n][dim].
void RmsNormBackward(const float* x, const float* weight, const float* dy, float* dx, int n, int dim, float eps);
void RmsNormBackward(const double* x, const double* weight, const double* dy, double* dx, int n, int dim,
                     double eps);

// RoPE is a rotation per pair, so its backward is the inverse rotation, in place on dx
// [n][n_heads * head_dim]; same angles as the forward.
void RopeBackward(float* dx, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox);
void RopeBackward(double* dx, const int32_t* pos, int n, int n_heads, int head_dim, int n_rot, float base, bool neox);

// ---- Causal softmax attention (training: dense K/V, probabilities kept) ----------------------------
// B independent sequences of T tokens; query head h reads KV head h / (Hq / Hkv) (GQA); scores are
// scaled by 1/sqrt(d); query i of a sequence sees keys 0..i of the same sequence.
//   q [B*T][Hq*d]   k, v [B*T][Hkv*d]   out [B*T][Hq*d]
//   probs [B][Hq][T][T]: row i holds the softmax weights over keys 0..i, zeros above the diagonal.
void CausalAttentionForward(const float* q, const float* k, const float* v, float* out, float* probs, int B, int T,
                            int Hq, int Hkv, int d, ThreadPool& pool);
void CausalAttentionForward(const double* q, const double* k, const double* v, double* out, double* probs, int B,
                            int T, int Hq, int Hkv, int d, ThreadPool& pool);
// dq [B*T][Hq*d], dk, dv [B*T][Hkv*d] (all overwritten) from dout, given the forward's probs.
void CausalAttentionBackward(const float* q, const float* k, const float* v, const float* probs, const float* dout,
                             float* dq, float* dk, float* dv, int B, int T, int Hq, int Hkv, int d, ThreadPool& pool);
void CausalAttentionBackward(const double* q, const double* k, const double* v, const double* probs,
                             const double* dout, double* dq, double* dk, double* dv, int B, int T, int Hq, int Hkv,
                             int d, ThreadPool& pool);

// ---- DynaKV's relaxed low-rank cache -----------------------------------------------------------------
// Soft keep-mask over latent dimensions from probabilities over rank levels:
//   m[t][i] = sum_j p[t][j] * [i < levels[j]]      p [n][L], m [n][D], levels increasing in [1, D]
void LevelMask(const float* p, const int* levels, int L, float* m, int n, int D);
void LevelMask(const double* p, const int* levels, int L, double* m, int n, int D);
// dp[t][j] = sum_{i < levels[j]} dm[t][i]
void LevelMaskBackward(const float* dm, const int* levels, int L, float* dp, int n, int D);
void LevelMaskBackward(const double* dm, const int* levels, int L, double* dp, int n, int D);

// Masked projection on an orthonormal basis U [D][D] (U[i*D + j] = component i of direction j):
//   c = (x - mu) U   (kept for the backward)      xhat = (m * c) U^T + mu        x, c, m, xhat [n][D]
void LowRankMaskForward(const float* x, const float* u, const float* mu, const float* m, float* c, float* xhat, int n,
                        int D);
void LowRankMaskForward(const double* x, const double* u, const double* mu, const double* m, double* c, double* xhat,
                        int n, int D);
// From dxhat: dx = (m * (dxhat U)) U^T and dm = c * (dxhat U) (both overwritten); when du / dmu are
// not null, the basis and mean gradients are accumulated into them (du [D][D], dmu [D]).
void LowRankMaskBackward(const float* x, const float* u, const float* mu, const float* m, const float* c,
                         const float* dxhat, float* dx, float* dm, float* du, float* dmu, int n, int D);
void LowRankMaskBackward(const double* x, const double* u, const double* mu, const double* m, const double* c,
                         const double* dxhat, double* dx, double* dm, double* du, double* dmu, int n, int D);

// Gumbel-softmax over L choices per row, straight-through:
//   y = softmax((logits + g) / tau)   [n][L], kept for the backward
//   p = one-hot of argmax(y) when hard (ties: the lowest index), else p = y
// The backward is the soft one either way: dlogits = (1 / tau) * y * (dp - sum_j dp_j y_j).
void GumbelSoftmaxForward(const float* logits, const float* g, float tau, bool hard, float* y, float* p, int n, int L);
void GumbelSoftmaxForward(const double* logits, const double* g, double tau, bool hard, double* y, double* p, int n,
                          int L);
void GumbelSoftmaxBackward(const float* y, const float* dp, float tau, float* dlogits, int n, int L);
void GumbelSoftmaxBackward(const double* y, const double* dp, double tau, double* dlogits, int n, int L);

// Expected cost under softmax(logits) per row: e[t] = sum_j softmax(logits[t])_j * cost[j].
// Backward: dlogits[t][j] = de[t] * q_j * (cost_j - e[t]) (overwritten).
void SoftmaxExpectation(const float* logits, const float* cost, float* e, int n, int L);
void SoftmaxExpectation(const double* logits, const double* cost, double* e, int n, int L);
void SoftmaxExpectationBackward(const float* logits, const float* cost, const float* de, float* dlogits, int n, int L);
void SoftmaxExpectationBackward(const double* logits, const double* cost, const double* de, double* dlogits, int n,
                                int L);

// ---- Distillation loss on the output logits ---------------------------------------------------------
// Per row t of student logits s [n][V]:
//   kl_t = KL(softmax(teacher_t) || softmax(s_t))        (0 when teacher is null)
//   ce_t = -log softmax(s_t)[target_t]                    (0 when target is null or target_t < 0)
// Returns the sums over rows (accumulated in double, per-thread partial sums added in thread order,
// so the result does not depend on timing). ds (overwritten) = d(scale * sum_t (w_kl kl_t + w_ce ce_t)) / ds.
struct DistillLossSums {
  double kl = 0.0;
  double ce = 0.0;
  int64_t top1_agree = 0;  // rows where argmax(s_t) == argmax(teacher_t) (0 without a teacher)
};
DistillLossSums DistillLoss(const float* s, const float* teacher, const int32_t* target, int n, int V, float w_kl,
                            float w_ce, float scale, float* ds, ThreadPool& pool);
DistillLossSums DistillLoss(const double* s, const double* teacher, const int32_t* target, int n, int V, double w_kl,
                            double w_ce, double scale, double* ds, ThreadPool& pool);

}  // namespace dk
