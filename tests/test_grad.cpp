// Training kernels (ops/grad.h). Two layers of checks:
//   GradCheck.*  every double backward against central differences of its double forward;
//   GradFloat.*  every float kernel against the double reference on the same inputs (values drawn
//                representable in float), over odd sizes, with tolerances derived from float rounding.
#include <gtest/gtest.h>
#include <lapacke.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/threads.h"
#include "ops/grad.h"
#include "ops/ops.h"

namespace dk {
namespace {

using Vec = std::vector<double>;
using VecF = std::vector<float>;

// Gaussian values rounded through float, so the float kernels see exactly the double inputs.
Vec Randn(size_t n, std::mt19937& rng, double sd = 1.0) {
  std::normal_distribution<double> nd(0.0, sd);
  Vec v(n);
  for (double& x : v) x = static_cast<float>(nd(rng));
  return v;
}

Vec Uniform(size_t n, std::mt19937& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  Vec v(n);
  for (double& x : v) x = static_cast<float>(u(rng));
  return v;
}

VecF ToF(const Vec& v) { return VecF(v.begin(), v.end()); }
Vec ToD(const VecF& v) { return Vec(v.begin(), v.end()); }
Vec Abs(Vec v) {
  for (double& x : v) x = std::fabs(x);
  return v;
}

// L = sum_i r_i out_i: a random scalar objective whose gradient w.r.t. out is r.
double Objective(const Vec& r, const Vec& out) {
  double s = 0.0;
  for (size_t i = 0; i < r.size(); ++i) s += r[i] * out[i];
  return s;
}

// Random orthonormal D x D matrix: Q of the QR factorization of a Gaussian matrix.
Vec RandomOrthonormal(int D, std::mt19937& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  Vec a(static_cast<size_t>(D) * D), tau(D);
  for (double& x : a) x = nd(rng);
  EXPECT_EQ(LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, D, D, a.data(), D, tau.data()), 0);
  EXPECT_EQ(LAPACKE_dorgqr(LAPACK_ROW_MAJOR, D, D, D, a.data(), D, tau.data()), 0);
  return a;
}

// ---- Central differences (double) ---------------------------------------------------------------
// fd = (L(x+h) - L(x-h)) / 2h = L'(x) + h^2/6 L'''(xi) + (e+ - e-) / 2h, e+- the rounding errors of
// the two evaluations of L. Inputs here are O(1), and third derivatives of these kernels at O(1)
// inputs are at most ~10^2 (softmaxes sharpened by 1/tau, rms norm, attention), so with h = 1e-5
// truncation is <= 1e-10 / 6 * 1e2 ~ 2e-9. Each L sums at most a few hundred O(1) terms through
// <= ~30 roundings, so |e| <= 30 * 1.1e-16 * 300 ~ 1e-12, ~1e-7 after dividing by 2h. Hence
// tol = 1e-6 * (1 + |g|): a 10x margin over their sum, while a wrong gradient errs by O(|g|).
// (Measured: <= 2e-10 here; a 1e-5 relative error in a backward fails.)
constexpr double kH = 1e-5;
constexpr double kFdRel = 1e-6;
constexpr size_t kMaxChecks = 60;  // larger inputs: this many random elements

void CheckGrad(const std::string& what, Vec& x, const Vec& grad, const std::function<double()>& loss) {
  ASSERT_EQ(x.size(), grad.size()) << what;
  std::vector<size_t> idx(x.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  if (idx.size() > kMaxChecks) {
    std::mt19937 rng(static_cast<uint32_t>(idx.size()));
    std::shuffle(idx.begin(), idx.end(), rng);
    idx.resize(kMaxChecks);
  }
  int misses = 0;
  for (size_t i : idx) {
    const double x0 = x[i];
    x[i] = x0 + kH;
    const double lp = loss();
    x[i] = x0 - kH;
    const double lm = loss();
    x[i] = x0;
    const double fd = (lp - lm) / (2 * kH);
    if (std::fabs(fd - grad[i]) > kFdRel * (1.0 + std::fabs(grad[i])) && ++misses <= 5)
      ADD_FAILURE() << what << " [" << i << "]: analytic " << grad[i] << " vs central difference " << fd;
  }
}

// ---- Float against double -------------------------------------------------------------------------
// Gamma(k) bounds the relative error of k float roundings: a value built by sums and products
// through at most k roundings per path errs by at most gamma_k = k u / (1 - k u) (u = FLT_EPSILON / 2)
// times the same computation on absolute values (Higham, Accuracy and Stability, ch. 3).
// k * FLT_EPSILON = 2 k u is gamma_k with a 2x margin, and also covers FMA contraction (fewer roundings).
double Gamma(int k) { return k * static_cast<double>(FLT_EPSILON); }

// Expects |got - ref| <= tol element-wise; reports the first few misses, naming the case.
void ExpectClose(const VecF& got, const Vec& ref, const Vec& tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  int misses = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    if (!(std::fabs(got[i] - ref[i]) <= tol[i]) && ++misses <= 5)
      ADD_FAILURE() << what << " [" << i << "]: float " << got[i] << " vs double " << ref[i] << " (tol " << tol[i]
                    << ")";
}

Vec Scaled(Vec v, double k) {
  for (double& x : v) x *= k;
  return v;
}

// " name k=v k=v ...": the case, appended to a failure message.
std::string Case(const std::string& name, std::initializer_list<std::pair<const char*, int>> dims) {
  std::string s = name.empty() ? "" : " " + name;
  for (const auto& [k, v] : dims) s += " " + std::string(k) + "=" + std::to_string(v);
  return s;
}

const int kRows[] = {1, 3, 7, 17};

// ==== Linear maps =====================================================================================

TEST(GradCheck, MatMulWIsTheInputGradientOfMatMulWT) {
  std::mt19937 rng(1);
  const int n = 3, in = 5, out = 4;
  Vec x = Randn(n * in, rng), w = Randn(out * in, rng), r = Randn(n * out, rng), y(n * out), dx(n * in);
  MatMulW(r.data(), w.data(), dx.data(), n, out, in, false);
  const auto loss = [&] {
    MatMulWT(x.data(), w.data(), y.data(), n, in, out);
    return Objective(r, y);
  };
  CheckGrad("MatMulW dx", x, dx, loss);
  Vec acc = Randn(n * in, rng), expect = acc;  // accumulate adds exactly the same sums
  for (int i = 0; i < n * in; ++i) expect[i] += dx[i];
  MatMulW(r.data(), w.data(), acc.data(), n, out, in, true);
  for (int i = 0; i < n * in; ++i) EXPECT_EQ(acc[i], expect[i]) << i;
}

TEST(GradCheck, LinearDxDwDb) {
  std::mt19937 rng(2);
  const int n = 4, in = 5, out = 3;
  Vec x = Randn(n * in, rng), w = Randn(out * in, rng), b = Randn(out, rng), r = Randn(n * out, rng), y(n * out);
  Vec dx(n * in), dw(out * in, 0.0), db(out, 0.0);
  LinearBackward(x.data(), w.data(), r.data(), dx.data(), dw.data(), db.data(), n, in, out, false);
  const auto loss = [&] {
    LinearForward(x.data(), w.data(), b.data(), y.data(), n, in, out);
    return Objective(r, y);
  };
  CheckGrad("Linear dx", x, dx, loss);
  CheckGrad("Linear dw", w, dw, loss);
  CheckGrad("Linear db", b, db, loss);
  // dW, db accumulate; dx accumulates only when asked; a null db and dx are skipped.
  Vec dw2 = Randn(out * in, rng), db2 = Randn(out, rng), dx2 = Randn(n * in, rng);
  const Vec dw0 = dw2, db0 = db2, dx0 = dx2;
  LinearBackward(x.data(), w.data(), r.data(), dx2.data(), dw2.data(), db2.data(), n, in, out, true);
  for (int i = 0; i < out * in; ++i) EXPECT_EQ(dw2[i], dw0[i] + dw[i]) << i;
  for (int i = 0; i < out; ++i) EXPECT_NEAR(db2[i], db0[i] + db[i], 1e-14) << i;
  for (int i = 0; i < n * in; ++i) EXPECT_EQ(dx2[i], dx0[i] + dx[i]) << i;
  LinearBackward(x.data(), w.data(), r.data(), nullptr, dw2.data(), nullptr, n, in, out, false);
  Vec y0(n * out);  // no bias: y = x W^T
  LinearForward(x.data(), w.data(), nullptr, y0.data(), n, in, out);
  MatMulWT(x.data(), w.data(), y.data(), n, in, out);
  for (int i = 0; i < n * out; ++i) EXPECT_EQ(y0[i], y[i]) << i;
}

TEST(GradFloat, MatMulWAndLinearMatchDouble) {
  std::mt19937 rng(3);
  for (int n : kRows)
    for (int in : {1, 5, 19})
      for (int out : {3, 13}) {
        const std::string c = Case("", {{"n", n}, {"in", in}, {"out", out}});
        Vec x = Randn(n * in, rng), w = Randn(out * in, rng), b = Randn(out, rng), dy = Randn(n * out, rng);
        Vec dx0 = Randn(n * in, rng), dw0 = Randn(out * in, rng), db0 = Randn(out, rng);
        // Forward: dot products of length in, plus the bias: in + 1 roundings.
        Vec y(n * out), ya(n * out);
        LinearForward(x.data(), w.data(), b.data(), y.data(), n, in, out);
        LinearForward(Abs(x).data(), Abs(w).data(), Abs(b).data(), ya.data(), n, in, out);
        VecF yf(n * out);
        LinearForward(ToF(x).data(), ToF(w).data(), ToF(b).data(), yf.data(), n, in, out);
        ExpectClose(yf, y, Scaled(ya, Gamma(in + 1)), "LinearForward" + c);
        LinearForward(x.data(), w.data(), nullptr, y.data(), n, in, out);
        LinearForward(ToF(x).data(), ToF(w).data(), nullptr, yf.data(), n, in, out);
        ExpectClose(yf, y, Scaled(ya, Gamma(in + 1)), "LinearForward no bias" + c);  // ya bounds it too
        // MatMulW overwriting: length-out dot products.
        Vec dx(n * in), dxa(n * in);
        MatMulW(dy.data(), w.data(), dx.data(), n, out, in, false);
        MatMulW(Abs(dy).data(), Abs(w).data(), dxa.data(), n, out, in, false);
        VecF dxf(n * in);
        MatMulW(ToF(dy).data(), ToF(w).data(), dxf.data(), n, out, in, false);
        ExpectClose(dxf, dx, Scaled(dxa, Gamma(out)), "MatMulW" + c);
        // LinearBackward accumulating into all three: one more rounding each (sums over out, n, n).
        Vec gx = dx0, gw = dw0, gb = db0, ax = Abs(dx0), aw = Abs(dw0), ab = Abs(db0);
        LinearBackward(x.data(), w.data(), dy.data(), gx.data(), gw.data(), gb.data(), n, in, out, true);
        LinearBackward(Abs(x).data(), Abs(w).data(), Abs(dy).data(), ax.data(), aw.data(), ab.data(), n, in, out,
                       true);
        VecF fx = ToF(dx0), fw = ToF(dw0), fb = ToF(db0);
        LinearBackward(ToF(x).data(), ToF(w).data(), ToF(dy).data(), fx.data(), fw.data(), fb.data(), n, in, out, true);
        ExpectClose(fx, gx, Scaled(ax, Gamma(out + 1)), "LinearBackward dx" + c);
        ExpectClose(fw, gw, Scaled(aw, Gamma(n + 1)), "LinearBackward dw" + c);
        ExpectClose(fb, gb, Scaled(ab, Gamma(n + 1)), "LinearBackward db" + c);
      }
}

// ==== Element-wise and per-row ==========================================================================

TEST(GradCheck, SiluAndSwiGlu) {
  std::mt19937 rng(4);
  const int n = 40;
  Vec x = Randn(n, rng, 2.0), up = Randn(n, rng), r = Randn(n, rng), y(n), dx(n), dup(n);
  SiluBackward(x.data(), r.data(), dx.data(), n);
  CheckGrad("Silu", x, dx, [&] {
    Silu(x.data(), y.data(), n);
    return Objective(r, y);
  });
  SwiGluBackward(x.data(), up.data(), r.data(), dx.data(), dup.data(), n);
  const auto loss = [&] {
    SwiGlu(x.data(), up.data(), y.data(), n);
    return Objective(r, y);
  };
  CheckGrad("SwiGlu dgate", x, dx, loss);
  CheckGrad("SwiGlu dup", up, dup, loss);
}

TEST(GradFloat, SiluAndSwiGluMatchDouble) {
  std::mt19937 rng(5);
  for (int n : {1, 7, 33}) {
    const std::string c = Case("", {{"n", n}});
    Vec x = Randn(n, rng, 3.0), up = Randn(n, rng), dy = Randn(n, rng), y(n), dx(n), dup(n), ys(n);
    VecF yf(n), dxf(n), dupf(n);
    // silu(x) = x / (1 + exp(-x)), up to 5 roundings (expf within 1 ulp): Gamma(4) relative.
    Silu(x.data(), y.data(), n);
    Silu(ToF(x).data(), yf.data(), n);
    ExpectClose(yf, y, Scaled(Abs(y), Gamma(4)), "Silu" + c);
    SwiGlu(x.data(), up.data(), ys.data(), n);
    SwiGlu(ToF(x).data(), ToF(up).data(), yf.data(), n);
    ExpectClose(yf, ys, Scaled(Abs(ys), Gamma(4)), "SwiGlu forward" + c);
    // silu'(x) = s (1 + x (1 - s)): 1 - s cancels, so the bound is on the absolute-value expression
    // s (1 + |x| (1 + s)), through ~8 roundings.
    Vec tol(n), tol_gate(n);
    for (int i = 0; i < n; ++i) {
      const double s = 1.0 / (1.0 + std::exp(-x[i])), a = s * (1.0 + std::fabs(x[i]) * (1.0 + s));
      tol[i] = Gamma(8) * std::fabs(dy[i]) * a;
      tol_gate[i] = Gamma(8) * std::fabs(dy[i] * up[i]) * a;
    }
    SiluBackward(x.data(), dy.data(), dx.data(), n);
    SiluBackward(ToF(x).data(), ToF(dy).data(), dxf.data(), n);
    ExpectClose(dxf, dx, tol, "SiluBackward" + c);
    SwiGluBackward(x.data(), up.data(), dy.data(), dx.data(), dup.data(), n);
    SwiGluBackward(ToF(x).data(), ToF(up).data(), ToF(dy).data(), dxf.data(), dupf.data(), n);
    ExpectClose(dxf, dx, tol_gate, "SwiGluBackward dgate" + c);
    ExpectClose(dupf, dup, Scaled(Abs(dup), Gamma(6)), "SwiGluBackward dup" + c);
  }
}

TEST(GradCheck, RmsNorm) {
  std::mt19937 rng(6);
  const int n = 3, dim = 7;
  Vec x = Randn(n * dim, rng), w = Randn(dim, rng), r = Randn(n * dim, rng), y(n * dim), dx(n * dim);
  RmsNormBackward(x.data(), w.data(), r.data(), dx.data(), n, dim, 1e-5);
  CheckGrad("RmsNorm dx", x, dx, [&] {
    RmsNorm(x.data(), w.data(), y.data(), n, dim, 1e-5);
    return Objective(r, y);
  });
}

TEST(GradFloat, RmsNormMatchesDouble) {
  std::mt19937 rng(7);
  const double eps = 1e-5;
  for (int n : kRows)
    for (int dim : {1, 5, 13, 67}) {
      const std::string c = Case("", {{"n", n}, {"dim", dim}});
      Vec x = Randn(n * dim, rng), w = Randn(dim, rng), dy = Randn(n * dim, rng), y(n * dim), dx(n * dim);
      VecF yf(n * dim), dxf(n * dim);
      // Forward: r = (sum x^2 / dim + eps)^(-1/2) errs by (dim + 3) u / 2 + 2u (the sqrt halves
      // the error of its argument), times x and w: (dim + 11) u / 2 < Gamma(dim + 8) / 4.
      RmsNorm(x.data(), w.data(), y.data(), n, dim, eps);
      RmsNorm(ToF(x).data(), ToF(w).data(), yf.data(), n, dim, static_cast<float>(eps));
      ExpectClose(yf, y, Scaled(Abs(y), Gamma(dim + 8)), "RmsNorm" + c);
      // Backward dx = r w dy - x r^3 dot / dim: r^3 triples r's error, dot errs by gamma_dim on
      // sum |dy w x|; about (2.5 dim + 20) u in all on the absolute-value expression.
      Vec tol(n * dim);
      for (int t = 0; t < n; ++t) {
        double ss = 0.0, dabs = 0.0;
        for (int i = 0; i < dim; ++i) {
          ss += x[t * dim + i] * x[t * dim + i];
          dabs += std::fabs(dy[t * dim + i] * w[i] * x[t * dim + i]);
        }
        const double rr = 1.0 / std::sqrt(ss / dim + eps);
        for (int i = 0; i < dim; ++i)
          tol[t * dim + i] = Gamma(2 * dim + 16) * (rr * std::fabs(w[i] * dy[t * dim + i]) +
                                                    std::fabs(x[t * dim + i]) * rr * rr * rr * dabs / dim);
      }
      RmsNormBackward(x.data(), w.data(), dy.data(), dx.data(), n, dim, eps);
      RmsNormBackward(ToF(x).data(), ToF(w).data(), ToF(dy).data(), dxf.data(), n, dim, static_cast<float>(eps));
      ExpectClose(dxf, dx, tol, "RmsNormBackward" + c);
    }
}

// ==== RoPE ================================================================================================

struct RopeCase {
  int n_heads, head_dim, n_rot;
  bool neox;
  std::string Name(int n) const {
    return Case(neox ? "neox" : "llama", {{"n", n}, {"heads", n_heads}, {"head_dim", head_dim}, {"n_rot", n_rot}});
  }
};

TEST(GradCheck, RopeBackwardIsTheGradientOfRope) {
  std::mt19937 rng(8);
  const int n = 3;
  const int32_t pos[n] = {0, 7, 123};
  for (const RopeCase& rc : {RopeCase{2, 6, 4, false}, RopeCase{2, 6, 4, true}, RopeCase{1, 8, 8, true}}) {
    const int width = rc.n_heads * rc.head_dim;
    Vec x = Randn(n * width, rng), r = Randn(n * width, rng), dx = r, y;
    RopeBackward(dx.data(), pos, n, rc.n_heads, rc.head_dim, rc.n_rot, 10000.0f, rc.neox);
    CheckGrad("Rope" + rc.Name(n), x, dx, [&] {
      y = x;
      Rope(y.data(), pos, n, rc.n_heads, rc.head_dim, rc.n_rot, 10000.0f, rc.neox);
      return Objective(r, y);
    });
  }
}

TEST(GradFloat, RopeMatchesDoubleWithTheSameAngles) {
  std::mt19937 rng(9);
  const int32_t pos[7] = {0, 1, 5, 77, 301, 1000, 4095};
  for (const RopeCase& rc : {RopeCase{3, 10, 10, false}, RopeCase{3, 10, 6, true}, RopeCase{2, 14, 10, false}})
    for (int n : {1, 3, 7}) {
      const int width = rc.n_heads * rc.head_dim;
      const std::string c = rc.Name(n);
      Vec x = Randn(n * width, rng);
      // Each output is x0 cos - x1 sin with cos/sin of the same float angle (float within 1 ulp of
      // double) and two roundings: <= Gamma(4) (|x0| + |x1|) <= Gamma(8) max |x|. Angles computed
      // independently in double would differ by ~pos * i * u radians: 1e-5 at pos 1000, far above.
      const Vec ax = Abs(x);
      const Vec tol(x.size(), Gamma(8) * *std::max_element(ax.begin(), ax.end()));
      Vec y = x;
      VecF yf = ToF(x);
      Rope(y.data(), pos, n, rc.n_heads, rc.head_dim, rc.n_rot, 10000.0f, rc.neox);
      Rope(yf.data(), pos, n, rc.n_heads, rc.head_dim, rc.n_rot, 10000.0f, rc.neox);
      ExpectClose(yf, y, tol, "Rope" + c);
      Vec g = x;
      VecF gf = ToF(x);
      RopeBackward(g.data(), pos, n, rc.n_heads, rc.head_dim, rc.n_rot, 10000.0f, rc.neox);
      RopeBackward(gf.data(), pos, n, rc.n_heads, rc.head_dim, rc.n_rot, 10000.0f, rc.neox);
      ExpectClose(gf, g, tol, "RopeBackward" + c);
      // The inverse rotation undoes the float forward (cos^2 + sin^2 = 1 within a few u).
      RopeBackward(yf.data(), pos, n, rc.n_heads, rc.head_dim, rc.n_rot, 10000.0f, rc.neox);
      ExpectClose(yf, x, tol, "Rope then RopeBackward" + c);
    }
}

// ==== Causal attention ======================================================================================

struct Attn {
  int B, T, Hq, Hkv, d;
  int group() const { return Hq / Hkv; }
  int64_t Q(int b, int i, int h) const { return ((static_cast<int64_t>(b) * T + i) * Hq + h) * d; }
  int64_t KV(int b, int j, int g) const { return ((static_cast<int64_t>(b) * T + j) * Hkv + g) * d; }
  int64_t P(int b, int h, int i) const { return ((static_cast<int64_t>(b) * Hq + h) * T + i) * T; }
  size_t q_size() const { return static_cast<size_t>(B) * T * Hq * d; }
  size_t kv_size() const { return static_cast<size_t>(B) * T * Hkv * d; }
  size_t p_size() const { return static_cast<size_t>(B) * Hq * T * T; }
  std::string Name() const { return Case("", {{"B", B}, {"T", T}, {"Hq", Hq}, {"Hkv", Hkv}, {"d", d}}); }
};

TEST(GradCheck, CausalAttentionGqa) {
  std::mt19937 rng(10);
  ThreadPool pool(1);
  const Attn a{2, 5, 4, 2, 3};
  Vec q = Randn(a.q_size(), rng), k = Randn(a.kv_size(), rng), v = Randn(a.kv_size(), rng);
  Vec r = Randn(a.q_size(), rng), out(a.q_size()), probs(a.p_size());
  Vec dq(a.q_size()), dk(a.kv_size()), dv(a.kv_size());
  CausalAttentionForward(q.data(), k.data(), v.data(), out.data(), probs.data(), a.B, a.T, a.Hq, a.Hkv, a.d, pool);
  CausalAttentionBackward(q.data(), k.data(), v.data(), probs.data(), r.data(), dq.data(), dk.data(), dv.data(), a.B,
                          a.T, a.Hq, a.Hkv, a.d, pool);
  for (int b = 0; b < a.B; ++b)  // rows sum to 1, zeros above the diagonal
    for (int h = 0; h < a.Hq; ++h)
      for (int i = 0; i < a.T; ++i) {
        double s = 0.0;
        for (int j = 0; j < a.T; ++j) s += probs[a.P(b, h, i) + j];
        EXPECT_NEAR(s, 1.0, 1e-14);
        for (int j = i + 1; j < a.T; ++j) EXPECT_EQ(probs[a.P(b, h, i) + j], 0.0);
      }
  const auto loss = [&] {
    Vec o(a.q_size()), p(a.p_size());
    CausalAttentionForward(q.data(), k.data(), v.data(), o.data(), p.data(), a.B, a.T, a.Hq, a.Hkv, a.d, pool);
    return Objective(r, o);
  };
  CheckGrad("attention dq" + a.Name(), q, dq, loss);
  CheckGrad("attention dk" + a.Name(), k, dk, loss);
  CheckGrad("attention dv" + a.Name(), v, dv, loss);
}

// Float forward bounds per query row i (double values of the same inputs):
//   S_ij = scale q_i.k_j errs by dS_ij <= Gamma(d + 2) scale sum |q||k| (d-term dot, scale, float scale);
//   the softmax of S errs relatively by 2 max_j dS_ij (d p_j / p_j = dS_j - sum p dS) plus its own
//   rounding: u |S_ij - max| on the exp argument (in p_j and in the sum), 2 ulp of exp, gamma_T of
//   the sum, 2 more: rel_i = 2 max_j dS_ij + FLT_EPSILON (range_i + T + 6);
//   out_i = sum_j p_ij v_j errs by (rel_i + Gamma(T)) sum_j p_ij |v_j|.
// Both with a further 2x margin.
void AttnForwardTol(const Attn& a, const Vec& q, const Vec& k, const Vec& v, const Vec& probs, Vec& tp, Vec& to) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(a.d));
  tp.assign(a.p_size(), 0.0);
  to.assign(a.q_size(), 0.0);
  for (int b = 0; b < a.B; ++b)
    for (int h = 0; h < a.Hq; ++h)
      for (int i = 0; i < a.T; ++i) {
        const int g = h / a.group();
        double max_ds = 0.0, hi = -INFINITY, lo = INFINITY;
        for (int j = 0; j <= i; ++j) {
          double s = 0.0, sa = 0.0;
          for (int c = 0; c < a.d; ++c) {
            s += q[a.Q(b, i, h) + c] * k[a.KV(b, j, g) + c];
            sa += std::fabs(q[a.Q(b, i, h) + c] * k[a.KV(b, j, g) + c]);
          }
          max_ds = std::max(max_ds, Gamma(a.d + 2) * scale * sa);
          hi = std::max(hi, s * scale);
          lo = std::min(lo, s * scale);
        }
        const double rel = 2 * max_ds + FLT_EPSILON * (hi - lo + a.T + 6);
        for (int j = 0; j <= i; ++j) {
          const double p = probs[a.P(b, h, i) + j];
          tp[a.P(b, h, i) + j] = 2 * rel * p;
          for (int c = 0; c < a.d; ++c)
            to[a.Q(b, i, h) + c] += 2 * (rel + Gamma(a.T)) * p * std::fabs(v[a.KV(b, j, g) + c]);
        }
      }
}

// Float backward bounds, given the same probs P. With dPa_ij = sum_c |dO_ic||v_jc| (dP errs by
// Gamma(d) dPa), the row sum rho_i = sum_j P_ij dP_ij errs by Gamma(d + T) sum_j P_ij dPa_ij =: Gamma RDa_i,
// so dS_ij = P_ij (dP_ij - rho_i) errs by Gamma(d + T + 2) dSa_ij, dSa_ij = P_ij (dPa_ij + RDa_i). Then
//   dQ_i = scale sum_j dS_ij k_j:        Gamma(d + 2T + 3) scale sum_j dSa_ij |k_j|
//   dK_j = scale sum_h sum_i dS_ij q_i:  Gamma(d + 2T + 3 + group) scale sum_h sum_i dSa_ij |q_i|
//   dV_j = sum_h sum_i P_ij dO_i:        Gamma(T + group + 1) sum_h sum_i P_ij |dO_i|
// (the group's heads add into dK, dV one GEMM at a time), each with a further 2x margin.
void AttnBackwardTol(const Attn& a, const Vec& q, const Vec& k, const Vec& v, const Vec& probs, const Vec& dout,
                     Vec& tq, Vec& tk, Vec& tv) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(a.d));
  tq.assign(a.q_size(), 0.0);
  tk.assign(a.kv_size(), 0.0);
  tv.assign(a.kv_size(), 0.0);
  Vec dpa(a.T);
  for (int b = 0; b < a.B; ++b)
    for (int h = 0; h < a.Hq; ++h)
      for (int i = 0; i < a.T; ++i) {
        const int g = h / a.group();
        const double* p = probs.data() + a.P(b, h, i);
        double rda = 0.0;
        for (int j = 0; j <= i; ++j) {
          dpa[j] = 0.0;
          for (int c = 0; c < a.d; ++c) dpa[j] += std::fabs(dout[a.Q(b, i, h) + c] * v[a.KV(b, j, g) + c]);
          rda += p[j] * dpa[j];
        }
        for (int j = 0; j <= i; ++j) {
          const double dsa = p[j] * (dpa[j] + rda);
          for (int c = 0; c < a.d; ++c) {
            tq[a.Q(b, i, h) + c] += scale * dsa * std::fabs(k[a.KV(b, j, g) + c]);
            tk[a.KV(b, j, g) + c] += scale * dsa * std::fabs(q[a.Q(b, i, h) + c]);
            tv[a.KV(b, j, g) + c] += p[j] * std::fabs(dout[a.Q(b, i, h) + c]);
          }
        }
      }
  tq = Scaled(tq, 2 * Gamma(a.d + 2 * a.T + 3));
  tk = Scaled(tk, 2 * Gamma(a.d + 2 * a.T + 3 + a.group()));
  tv = Scaled(tv, 2 * Gamma(a.T + a.group() + 1));
}

// Runs the float forward and backward; the backward is fed `probs_in` so both precisions see the same P.
struct AttnFloat {
  VecF out, probs, dq, dk, dv;
};
AttnFloat RunAttnFloat(const Attn& a, const Vec& q, const Vec& k, const Vec& v, const Vec& probs_in, const Vec& dout,
                       ThreadPool& pool) {
  AttnFloat f{VecF(a.q_size()), VecF(a.p_size()), VecF(a.q_size()), VecF(a.kv_size()), VecF(a.kv_size())};
  const VecF qf = ToF(q), kf = ToF(k), vf = ToF(v), pf = ToF(probs_in), gf = ToF(dout);
  CausalAttentionForward(qf.data(), kf.data(), vf.data(), f.out.data(), f.probs.data(), a.B, a.T, a.Hq, a.Hkv, a.d,
                         pool);
  CausalAttentionBackward(qf.data(), kf.data(), vf.data(), pf.data(), gf.data(), f.dq.data(), f.dk.data(), f.dv.data(),
                          a.B, a.T, a.Hq, a.Hkv, a.d, pool);
  return f;
}

void CheckAttnFloat(const Attn& a, ThreadPool& pool, std::mt19937& rng) {
  const std::string c = a.Name() + " threads=" + std::to_string(pool.size());
  Vec q = Randn(a.q_size(), rng), k = Randn(a.kv_size(), rng), v = Randn(a.kv_size(), rng);
  Vec dout = Randn(a.q_size(), rng), out(a.q_size()), probs(a.p_size());
  CausalAttentionForward(q.data(), k.data(), v.data(), out.data(), probs.data(), a.B, a.T, a.Hq, a.Hkv, a.d, pool);
  const Vec probs_in = ToD(ToF(probs));  // P rounded to float: the backward's common input
  Vec dq(a.q_size()), dk(a.kv_size()), dv(a.kv_size()), tp, to, tq, tk, tv;
  CausalAttentionBackward(q.data(), k.data(), v.data(), probs_in.data(), dout.data(), dq.data(), dk.data(), dv.data(),
                          a.B, a.T, a.Hq, a.Hkv, a.d, pool);
  AttnForwardTol(a, q, k, v, probs, tp, to);
  AttnBackwardTol(a, q, k, v, probs_in, dout, tq, tk, tv);
  const AttnFloat f = RunAttnFloat(a, q, k, v, probs_in, dout, pool);
  ExpectClose(f.probs, probs, tp, "attention probs" + c);
  ExpectClose(f.out, out, to, "attention out" + c);
  ExpectClose(f.dq, dq, tq, "attention dq" + c);
  ExpectClose(f.dk, dk, tk, "attention dk" + c);
  ExpectClose(f.dv, dv, tv, "attention dv" + c);
  if (pool.size() > 1) {  // same thread count, same bits
    const AttnFloat again = RunAttnFloat(a, q, k, v, probs_in, dout, pool);
    EXPECT_EQ(again.out, f.out) << c;
    EXPECT_EQ(again.probs, f.probs) << c;
    EXPECT_EQ(again.dq, f.dq) << c;
    EXPECT_EQ(again.dk, f.dk) << c;
    EXPECT_EQ(again.dv, f.dv) << c;
  }
}

TEST(GradFloat, CausalAttentionMatchesDouble) {
  std::mt19937 rng(11);
  ThreadPool pool1(1), pool2(2);
  for (int T : {1, 5, 17, 33})
    for (const Attn& a : {Attn{1, T, 1, 1, 5}, Attn{2, T, 4, 2, 3}, Attn{1, T, 6, 2, 13}})
      CheckAttnFloat(a, pool1, rng);
  CheckAttnFloat(Attn{2, 33, 4, 2, 13}, pool2, rng);
  CheckAttnFloat(Attn{3, 7, 2, 1, 5}, pool2, rng);
}

// ==== DynaKV's relaxed low-rank cache =========================================================================

TEST(GradCheck, LevelMask) {
  std::mt19937 rng(12);
  const int n = 3, L = 3, D = 7;
  const int levels[L] = {1, 4, 6};  // the last level < D: dims 6.. are never kept
  Vec p = Uniform(n * L, rng, 0.0, 1.0), r = Randn(n * D, rng), m(n * D), dp(n * L);
  LevelMask(p.data(), levels, L, m.data(), n, D);
  for (int t = 0; t < n; ++t) {
    EXPECT_DOUBLE_EQ(m[t * D + 0], p[t * L] + p[t * L + 1] + p[t * L + 2]);
    EXPECT_DOUBLE_EQ(m[t * D + 4], p[t * L + 2]);
    EXPECT_EQ(m[t * D + 6], 0.0);
  }
  LevelMaskBackward(r.data(), levels, L, dp.data(), n, D);
  CheckGrad("LevelMask dp", p, dp, [&] {
    LevelMask(p.data(), levels, L, m.data(), n, D);
    return Objective(r, m);
  });
}

TEST(GradFloat, LevelMaskMatchesDouble) {
  std::mt19937 rng(13);
  const std::vector<std::vector<int>> level_sets = {{1}, {2, 5, 13}, {1, 3, 4, 9, 19}, {19}};
  for (int n : kRows)
    for (const auto& levels : level_sets) {
      const int L = static_cast<int>(levels.size()), D = 19;
      const std::string c = Case("", {{"n", n}, {"L", L}, {"top", levels.back()}});
      Vec p = Uniform(n * L, rng, 0.0, 1.0), dm = Randn(n * D, rng), m(n * D), ma(n * D), dp(n * L), dpa(n * L);
      VecF mf(n * D), dpf(n * L);
      // m sums at most L terms of p; dp at most D terms of dm.
      LevelMask(p.data(), levels.data(), L, m.data(), n, D);
      LevelMask(ToF(p).data(), levels.data(), L, mf.data(), n, D);
      LevelMask(Abs(p).data(), levels.data(), L, ma.data(), n, D);
      ExpectClose(mf, m, Scaled(ma, Gamma(L)), "LevelMask" + c);
      LevelMaskBackward(dm.data(), levels.data(), L, dp.data(), n, D);
      LevelMaskBackward(ToF(dm).data(), levels.data(), L, dpf.data(), n, D);
      LevelMaskBackward(Abs(dm).data(), levels.data(), L, dpa.data(), n, D);
      ExpectClose(dpf, dp, Scaled(dpa, Gamma(D)), "LevelMaskBackward" + c);
    }
}

TEST(GradCheck, LowRankMask) {
  std::mt19937 rng(14);
  const int n = 3, D = 5;
  Vec x = Randn(n * D, rng), u = RandomOrthonormal(D, rng), mu = Randn(D, rng), m = Uniform(n * D, rng, 0.0, 1.0);
  Vec r = Randn(n * D, rng), c(n * D), xhat(n * D), dx(n * D), dm(n * D);
  // du, dmu accumulate: start them nonzero and check the increments.
  const Vec du0 = Randn(D * D, rng), dmu0 = Randn(D, rng);
  Vec du = du0, dmu = dmu0;
  LowRankMaskForward(x.data(), u.data(), mu.data(), m.data(), c.data(), xhat.data(), n, D);
  LowRankMaskBackward(x.data(), u.data(), mu.data(), m.data(), c.data(), r.data(), dx.data(), dm.data(), du.data(),
                      dmu.data(), n, D);
  for (int i = 0; i < D * D; ++i) du[i] -= du0[i];
  for (int i = 0; i < D; ++i) dmu[i] -= dmu0[i];
  const auto loss = [&] {
    LowRankMaskForward(x.data(), u.data(), mu.data(), m.data(), c.data(), xhat.data(), n, D);
    return Objective(r, xhat);
  };
  CheckGrad("LowRankMask dx", x, dx, loss);
  CheckGrad("LowRankMask dm", m, dm, loss);
  CheckGrad("LowRankMask du", u, du, loss);
  CheckGrad("LowRankMask dmu", mu, dmu, loss);
  // With m = 1 the projection on a full orthonormal basis is the identity.
  Vec ones(n * D, 1.0);
  LowRankMaskForward(x.data(), u.data(), mu.data(), ones.data(), c.data(), xhat.data(), n, D);
  for (int i = 0; i < n * D; ++i) EXPECT_NEAR(xhat[i], x[i], 1e-13) << i;
  // Null du, dmu are skipped; dx, dm unchanged.
  Vec dx2(n * D), dm2(n * D);
  LowRankMaskForward(x.data(), u.data(), mu.data(), m.data(), c.data(), xhat.data(), n, D);
  LowRankMaskBackward(x.data(), u.data(), mu.data(), m.data(), c.data(), r.data(), dx2.data(), dm2.data(), nullptr,
                      nullptr, n, D);
  EXPECT_EQ(dx2, dx);
  EXPECT_EQ(dm2, dm);
}

// Bounds from the absolute-value computation: c = (x - mu) U through D + 1 roundings;
// xhat = (m c) U^T + mu through 2D + 3. Backward: g = dxhat U (D), dm = c g (D + 1),
// dx = (m g) U^T (2D + 1), du += dxhat^T (m c) + (x - mu)^T (m g) (n + D + 4 with the two
// accumulations), dmu += sum_t dxhat - dx (2D + n + 3). The double backward run on |x|, |U|,
// -|mu|, |m|, |c|, |dxhat| computes exactly those absolute-value expressions, except dmu.
void CheckLowRankFloat(int n, int D, std::mt19937& rng) {
  const std::string cs = Case("", {{"n", n}, {"D", D}});
  Vec x = Randn(n * D, rng), u = ToD(ToF(RandomOrthonormal(D, rng))), mu = Randn(D, rng);
  Vec m = Uniform(n * D, rng, 0.0, 1.0), dxhat = Randn(n * D, rng), du0 = Randn(D * D, rng), dmu0 = Randn(D, rng);
  Vec c(n * D), xhat(n * D), ca(n * D), xa(n * D), cm(n * D);
  LowRankMaskForward(x.data(), u.data(), mu.data(), m.data(), c.data(), xhat.data(), n, D);
  Vec xc = Abs(x);  // |x - mu| <= |x| + |mu|
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i) xc[t * D + i] += std::fabs(mu[i]);
  MatMulW(xc.data(), Abs(u).data(), ca.data(), n, D, D, false);
  for (int i = 0; i < n * D; ++i) cm[i] = m[i] * ca[i];
  MatMulWT(cm.data(), Abs(u).data(), xa.data(), n, D, D);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i) xa[t * D + i] += std::fabs(mu[i]);
  VecF cf(n * D), xf(n * D);
  LowRankMaskForward(ToF(x).data(), ToF(u).data(), ToF(mu).data(), ToF(m).data(), cf.data(), xf.data(), n, D);
  ExpectClose(cf, c, Scaled(ca, Gamma(D + 1)), "LowRankMaskForward c" + cs);
  ExpectClose(xf, xhat, Scaled(xa, Gamma(2 * D + 3)), "LowRankMaskForward xhat" + cs);

  const Vec c_in = ToD(ToF(c));  // both backwards get the same c
  Vec dx(n * D), dm(n * D), du = du0, dmu = dmu0, dxa(n * D), dma(n * D), dua = Abs(du0);
  LowRankMaskBackward(x.data(), u.data(), mu.data(), m.data(), c_in.data(), dxhat.data(), dx.data(), dm.data(),
                      du.data(), dmu.data(), n, D);
  LowRankMaskBackward(Abs(x).data(), Abs(u).data(), Scaled(Abs(mu), -1).data(), m.data(), Abs(c_in).data(),
                      Abs(dxhat).data(), dxa.data(), dma.data(), dua.data(), nullptr, n, D);
  Vec dmua = Abs(dmu0);
  for (int t = 0; t < n; ++t)
    for (int i = 0; i < D; ++i) dmua[i] += std::fabs(dxhat[t * D + i]) + dxa[t * D + i];
  VecF dxf(n * D), dmf(n * D), duf = ToF(du0), dmuf = ToF(dmu0);
  LowRankMaskBackward(ToF(x).data(), ToF(u).data(), ToF(mu).data(), ToF(m).data(), ToF(c_in).data(),
                      ToF(dxhat).data(), dxf.data(), dmf.data(), duf.data(), dmuf.data(), n, D);
  ExpectClose(dxf, dx, Scaled(dxa, Gamma(2 * D + 1)), "LowRankMaskBackward dx" + cs);
  ExpectClose(dmf, dm, Scaled(dma, Gamma(D + 1)), "LowRankMaskBackward dm" + cs);
  ExpectClose(duf, du, Scaled(dua, Gamma(n + D + 4)), "LowRankMaskBackward du" + cs);
  ExpectClose(dmuf, dmu, Scaled(dmua, Gamma(2 * D + n + 3)), "LowRankMaskBackward dmu" + cs);
}

TEST(GradFloat, LowRankMaskMatchesDouble) {
  std::mt19937 rng(15);
  for (int n : kRows)
    for (int D : {1, 5, 13, 19}) CheckLowRankFloat(n, D, rng);
}

// ==== Gumbel-softmax and expected cost ==========================================================================

TEST(GradCheck, GumbelSoftmaxSoft) {
  std::mt19937 rng(16);
  const int n = 4, L = 5;
  const double tau = 0.7;
  Vec logits = Randn(n * L, rng), g = Randn(n * L, rng), r = Randn(n * L, rng), y(n * L), p(n * L), dl(n * L);
  GumbelSoftmaxForward(logits.data(), g.data(), tau, false, y.data(), p.data(), n, L);
  EXPECT_EQ(p, y);
  GumbelSoftmaxBackward(y.data(), r.data(), tau, dl.data(), n, L);
  CheckGrad("GumbelSoftmax dlogits", logits, dl, [&] {
    GumbelSoftmaxForward(logits.data(), g.data(), tau, false, y.data(), p.data(), n, L);
    return Objective(r, p);
  });
}

TEST(GradCheck, GumbelSoftmaxHardIsOneHotWithTheSoftGradient) {
  std::mt19937 rng(17);
  const int n = 5, L = 4;
  Vec logits = Randn(n * L, rng), g = Randn(n * L, rng), dp = Randn(n * L, rng);
  logits[3 * L + 1] = logits[3 * L + 2] = 9.0;  // row 3: a tie goes to the lowest index
  g[3 * L + 1] = g[3 * L + 2] = 0.0;
  Vec ys(n * L), ps(n * L), yh(n * L), ph(n * L), ds(n * L), dh(n * L);
  GumbelSoftmaxForward(logits.data(), g.data(), 0.5, false, ys.data(), ps.data(), n, L);
  GumbelSoftmaxForward(logits.data(), g.data(), 0.5, true, yh.data(), ph.data(), n, L);
  EXPECT_EQ(yh, ys);
  for (int t = 0; t < n; ++t) {
    const int best = static_cast<int>(std::max_element(ys.begin() + t * L, ys.begin() + (t + 1) * L) -
                                      (ys.begin() + t * L));  // the first maximum
    for (int j = 0; j < L; ++j) EXPECT_EQ(ph[t * L + j], j == best ? 1.0 : 0.0) << "row " << t << " j " << j;
  }
  EXPECT_EQ(ph[3 * L + 1], 1.0);
  GumbelSoftmaxBackward(ys.data(), dp.data(), 0.5, ds.data(), n, L);
  GumbelSoftmaxBackward(yh.data(), dp.data(), 0.5, dh.data(), n, L);
  EXPECT_EQ(dh, ds);
  // A null g means no noise.
  Vec y0(n * L), p0(n * L), zeros(n * L, 0.0), yz(n * L), pz(n * L);
  GumbelSoftmaxForward(logits.data(), nullptr, 0.5, false, y0.data(), p0.data(), n, L);
  GumbelSoftmaxForward(logits.data(), zeros.data(), 0.5, false, yz.data(), pz.data(), n, L);
  EXPECT_EQ(y0, yz);
}

// Softmax of z (exact inputs) in float: per element u |z_j - max| on the exp argument (in y_j and
// in the sum), exp within 1 ulp, gamma_L on the sum, two more: FLT_EPSILON (range + L + 4) relative.
double SoftmaxRel(const double* z, int L) {
  const double hi = *std::max_element(z, z + L), lo = *std::min_element(z, z + L);
  return FLT_EPSILON * (hi - lo + L + 4);
}

TEST(GradFloat, GumbelSoftmaxMatchesDouble) {
  std::mt19937 rng(18);
  const double tau = 0.7;
  for (int n : kRows)
    for (int L : {1, 3, 5, 9}) {
      const std::string c = Case("", {{"n", n}, {"L", L}});
      Vec logits = Randn(n * L, rng, 2.0), g = Randn(n * L, rng), dp = Randn(n * L, rng);
      Vec y(n * L), p(n * L), ty(n * L), dl(n * L), tdl(n * L);
      VecF yf(n * L), pf(n * L), dlf(n * L);
      GumbelSoftmaxForward(logits.data(), g.data(), tau, true, y.data(), p.data(), n, L);
      GumbelSoftmaxForward(ToF(logits).data(), ToF(g).data(), static_cast<float>(tau), true, yf.data(), pf.data(), n,
                           L);
      for (int t = 0; t < n; ++t) {
        // z = (logits + g) / tau rounds twice: dz <= Gamma(2) |z|, moving y_j by 2 max dz relative.
        Vec z(L);
        double dz = 0.0;
        for (int j = 0; j < L; ++j) {
          z[j] = (logits[t * L + j] + g[t * L + j]) / tau;
          dz = std::max(dz, Gamma(2) * (std::fabs(logits[t * L + j]) + std::fabs(g[t * L + j])) / tau);
        }
        const double rel = 2 * dz + SoftmaxRel(z.data(), L) + Gamma(1);  // + float tau
        for (int j = 0; j < L; ++j) ty[t * L + j] = 2 * rel * y[t * L + j];
      }
      ExpectClose(yf, y, ty, "GumbelSoftmax y" + c);
      // Hard p: the same one-hot wherever the top two y are farther apart than their tolerances.
      for (int t = 0; t < n; ++t) {
        std::vector<int> order(L);
        for (int j = 0; j < L; ++j) order[j] = j;
        std::sort(order.begin(), order.end(), [&](int i, int j) { return y[t * L + i] > y[t * L + j]; });
        const int a = order[0], b = order[L > 1 ? 1 : 0];
        if (L > 1 && y[t * L + a] - y[t * L + b] <= ty[t * L + a] + ty[t * L + b]) continue;
        for (int j = 0; j < L; ++j)
          EXPECT_EQ(pf[t * L + j], p[t * L + j]) << "GumbelSoftmax hard p" << c << " row " << t;
      }
      // Backward on the same y: dl = y (dp - sum dp y) / tau, L + 3 roundings on |.| values.
      const Vec y_in = ToD(yf);
      GumbelSoftmaxBackward(y_in.data(), dp.data(), tau, dl.data(), n, L);
      GumbelSoftmaxBackward(yf.data(), ToF(dp).data(), static_cast<float>(tau), dlf.data(), n, L);
      for (int t = 0; t < n; ++t) {
        double dot = 0.0;
        for (int j = 0; j < L; ++j) dot += std::fabs(dp[t * L + j]) * y_in[t * L + j];
        for (int j = 0; j < L; ++j)
          tdl[t * L + j] = Gamma(L + 4) * y_in[t * L + j] * (std::fabs(dp[t * L + j]) + dot) / tau;
      }
      ExpectClose(dlf, dl, tdl, "GumbelSoftmaxBackward" + c);
    }
}

TEST(GradCheck, SoftmaxExpectation) {
  std::mt19937 rng(19);
  const int n = 4, L = 5;
  Vec logits = Randn(n * L, rng), cost = Uniform(L, rng, 0.0, 3.0), r = Randn(n, rng), e(n), dl(n * L);
  SoftmaxExpectationBackward(logits.data(), cost.data(), r.data(), dl.data(), n, L);
  CheckGrad("SoftmaxExpectation dlogits", logits, dl, [&] {
    SoftmaxExpectation(logits.data(), cost.data(), e.data(), n, L);
    return Objective(r, e);
  });
  const Vec flat(L, 0.0);  // uniform weights: the mean cost
  SoftmaxExpectation(flat.data(), cost.data(), e.data(), 1, L);
  double mean = 0.0;
  for (double v : cost) mean += v / L;
  EXPECT_NEAR(e[0], mean, 1e-15);
}

TEST(GradFloat, SoftmaxExpectationMatchesDouble) {
  std::mt19937 rng(20);
  for (int n : kRows)
    for (int L : {1, 3, 5, 9}) {
      const std::string c = Case("", {{"n", n}, {"L", L}});
      Vec logits = Randn(n * L, rng, 2.0), cost = Uniform(L, rng, -1.0, 3.0), de = Randn(n, rng);
      Vec e(n), dl(n * L), te(n), tdl(n * L);
      VecF ef(n), dlf(n * L);
      SoftmaxExpectation(logits.data(), cost.data(), e.data(), n, L);
      SoftmaxExpectationBackward(logits.data(), cost.data(), de.data(), dl.data(), n, L);
      SoftmaxExpectation(ToF(logits).data(), ToF(cost).data(), ef.data(), n, L);
      SoftmaxExpectationBackward(ToF(logits).data(), ToF(cost).data(), ToF(de).data(), dlf.data(), n, L);
      // e = sum q c: q errs by rel (SoftmaxRel), the sum adds Gamma(L): de_ <= (rel + Gamma(L)) sum q |c|.
      // dl = de q (c - e): rel on q, de_ on e, 3 roundings, on |de| q (|c| + |e|). 2x margin on both.
      for (int t = 0; t < n; ++t) {
        const double* z = logits.data() + t * L;
        const double rel = SoftmaxRel(z, L), mx = *std::max_element(z, z + L);
        double sum = 0.0, qc = 0.0;
        for (int j = 0; j < L; ++j) sum += std::exp(z[j] - mx);
        for (int j = 0; j < L; ++j) qc += std::exp(z[j] - mx) / sum * std::fabs(cost[j]);
        const double de_ = (rel + Gamma(L)) * qc;
        te[t] = 2 * de_;
        for (int j = 0; j < L; ++j) {
          const double q = std::exp(z[j] - mx) / sum;
          tdl[t * L + j] = 2 * std::fabs(de[t]) * q * ((rel + Gamma(3)) * (std::fabs(cost[j]) + std::fabs(e[t])) + de_);
        }
      }
      ExpectClose(ef, e, te, "SoftmaxExpectation" + c);
      ExpectClose(dlf, dl, tdl, "SoftmaxExpectationBackward" + c);
    }
}

// ==== Distillation loss ==============================================================================================

TEST(GradCheck, DistillLoss) {
  std::mt19937 rng(21);
  ThreadPool pool(1);
  const int n = 4, V = 7;
  const double w_kl = 0.7, w_ce = 0.4, scale = 0.5;
  Vec s = Randn(n * V, rng, 2.0), teacher = Randn(n * V, rng, 2.0), ds(n * V);
  const int32_t targets[n] = {2, -1, 0, 6};
  struct Variant {
    const char* name;
    const double* teacher;
    const int32_t* target;
  };
  for (const Variant& var : {Variant{"kl+ce", teacher.data(), targets}, Variant{"ce only", nullptr, targets},
                             Variant{"kl only", teacher.data(), nullptr}}) {
    const DistillLossSums sums =
        DistillLoss(s.data(), var.teacher, var.target, n, V, w_kl, w_ce, scale, ds.data(), pool);
    EXPECT_GE(sums.kl, 0.0) << var.name;
    if (var.teacher == nullptr) {
      EXPECT_EQ(sums.kl, 0.0);
      EXPECT_EQ(sums.top1_agree, 0);
      for (int v = 0; v < V; ++v) EXPECT_EQ(ds[1 * V + v], 0.0) << "row 1 has no target and no teacher";
    }
    if (var.target == nullptr) {
      EXPECT_EQ(sums.ce, 0.0);
    }
    Vec scratch(n * V);
    CheckGrad(std::string("DistillLoss ds ") + var.name, s, ds, [&] {
      const DistillLossSums l =
          DistillLoss(s.data(), var.teacher, var.target, n, V, w_kl, w_ce, scale, scratch.data(), pool);
      return scale * (w_kl * l.kl + w_ce * l.ce);
    });
  }
}

TEST(GradCheck, DistillLossValues) {
  ThreadPool pool(1);
  const int V = 4;
  // Row 0: uniform student, target 3: ce = log 4; teacher equal to the student: kl = 0, argmax 0 = 0
  // (ties go to the first maximum). Row 1: argmax(s) = 2, argmax(teacher) = 1.
  const Vec s = {0, 0, 0, 0, 1, 2, 5, 0}, teacher = {1, 1, 1, 1, 0, 3, 2, 0};
  const int32_t target[2] = {3, -5};
  Vec ds(2 * V);
  const DistillLossSums sums = DistillLoss(s.data(), teacher.data(), target, 2, V, 1.0, 1.0, 1.0, ds.data(), pool);
  EXPECT_NEAR(sums.ce, std::log(4.0), 1e-15);
  EXPECT_EQ(sums.top1_agree, 1);
  double kl1 = 0.0, zs = 0.0, zt = 0.0;
  for (int v = 0; v < V; ++v) zs += std::exp(s[V + v]), zt += std::exp(teacher[V + v]);
  for (int v = 0; v < V; ++v) {
    const double pt = std::exp(teacher[V + v]) / zt;
    kl1 += pt * (std::log(pt) - std::log(std::exp(s[V + v]) / zs));
  }
  EXPECT_NEAR(sums.kl, kl1, 1e-14);  // row 0 contributes 0
}

// Float bounds per row (double values of the same inputs). The exponentials err relatively by
// R = FLT_EPSILON (range / 2 + 2) (u |x - max| on the argument, 2 ulp of the vectorized exp); the
// double sum and log add nothing, so log-sum-exp errs by <= R and the probabilities by 2R + eps.
//   ds_v = a_s ps_v - a_t pt_v [- scale w_ce at the target], a_s = scale (w_kl + w_ce), a_t = scale w_kl:
//     |a_s| ps (rel_ps + 2 eps) + |a_t| pt (rel_pt + eps) + eps (|ds_v| + [target] |scale w_ce|)
//   kl_t = sum_v pt (t_v - s_v + lse_s - lse_t): rel_pt sum_v pt |log pt - log ps| + R_s + R_t
//   ce_t = lse_s - s_target: R_s
// Each with a 2x margin.
struct DistillTol {
  Vec ds;
  double kl = 0.0, ce = 0.0;
};

DistillTol DistillFloatTol(const Vec& s, const Vec& teacher, const std::vector<int32_t>& target, int n, int V,
                           double w_kl, double w_ce, double scale) {
  DistillTol tol;
  tol.ds.assign(static_cast<size_t>(n) * V, 0.0);
  for (int t = 0; t < n; ++t) {
    const double* sr = s.data() + t * V;
    const bool has_t = !teacher.empty(), has_ce = target[t] >= 0;
    const auto stats = [&](const double* x, double* lse) {
      const double hi = *std::max_element(x, x + V), lo = *std::min_element(x, x + V);
      double sum = 0.0;
      for (int v = 0; v < V; ++v) sum += std::exp(x[v] - hi);
      *lse = hi + std::log(sum);
      return FLT_EPSILON * ((hi - lo) / 2 + 2);
    };
    double lse_s = 0.0, lse_t = 0.0;
    const double rs = stats(sr, &lse_s);
    const double rt = has_t ? stats(teacher.data() + t * V, &lse_t) : 0.0;
    const double a_s = scale * ((has_t ? w_kl : 0.0) + (has_ce ? w_ce : 0.0)), a_t = has_t ? scale * w_kl : 0.0;
    double kl_terms = 0.0;
    for (int v = 0; v < V; ++v) {
      const double ps = std::exp(sr[v] - lse_s);
      const double lt = has_t ? teacher[t * V + v] - lse_t : 0.0, pt = has_t ? std::exp(lt) : 0.0;
      kl_terms += pt * std::fabs(lt - (sr[v] - lse_s));
      const double ds = a_s * ps - a_t * pt - (has_ce && v == target[t] ? scale * w_ce : 0.0);
      const double at_target = has_ce && v == target[t] ? std::fabs(scale * w_ce) : 0.0;
      tol.ds[t * V + v] = 2 * (std::fabs(a_s) * ps * (2 * rs + 3 * FLT_EPSILON) +
                               std::fabs(a_t) * pt * (2 * rt + 2 * FLT_EPSILON) +
                               FLT_EPSILON * (std::fabs(ds) + at_target));
    }
    if (has_t) tol.kl += 2 * ((2 * rt + FLT_EPSILON) * kl_terms + rs + rt);
    if (has_ce) tol.ce += 2 * rs;
  }
  return tol;
}

void CheckDistillFloat(int n, int V, bool with_teacher, ThreadPool& pool, std::mt19937& rng) {
  const std::string c = Case(with_teacher ? "" : "no teacher", {{"n", n}, {"V", V}, {"threads", pool.size()}});
  const double w_kl = 0.6, w_ce = 0.3, scale = 1.0 / 3;
  const Vec s = Randn(n * V, rng, 3.0), teacher = with_teacher ? Randn(n * V, rng, 3.0) : Vec();
  std::vector<int32_t> target(n);
  for (int t = 0; t < n; ++t) target[t] = t % 3 == 1 ? -1 : static_cast<int32_t>(rng() % V);
  Vec ds(n * V);
  const DistillLossSums ref = DistillLoss(s.data(), with_teacher ? teacher.data() : nullptr, target.data(), n, V,
                                          w_kl, w_ce, scale, ds.data(), pool);
  const VecF sf = ToF(s), tf = ToF(teacher);
  const auto run = [&](VecF& dsf) {
    return DistillLoss(sf.data(), with_teacher ? tf.data() : nullptr, target.data(), n, V, static_cast<float>(w_kl),
                       static_cast<float>(w_ce), static_cast<float>(scale), dsf.data(), pool);
  };
  VecF dsf(n * V), again(n * V);
  const DistillLossSums got = run(dsf);
  const DistillTol tol = DistillFloatTol(s, teacher, target, n, V, w_kl, w_ce, scale);
  ExpectClose(dsf, ds, tol.ds, "DistillLoss ds" + c);
  EXPECT_NEAR(got.kl, ref.kl, tol.kl) << c;
  EXPECT_NEAR(got.ce, ref.ce, tol.ce) << c;
  EXPECT_EQ(got.top1_agree, ref.top1_agree) << c;  // same float-representable logits: same argmax
  const DistillLossSums got2 = run(again);  // same thread count, same bits
  EXPECT_EQ(again, dsf) << c;
  EXPECT_EQ(got2.kl, got.kl) << c;
  EXPECT_EQ(got2.ce, got.ce) << c;
}

TEST(GradFloat, DistillLossMatchesDouble) {
  std::mt19937 rng(22);
  ThreadPool pool1(1), pool2(2);
  for (int n : kRows)
    for (int V : {1, 5, 37, 101}) {
      CheckDistillFloat(n, V, true, pool1, rng);
      CheckDistillFloat(n, V, false, pool1, rng);
    }
  CheckDistillFloat(17, 1001, true, pool2, rng);
  CheckDistillFloat(5, 37, false, pool2, rng);
}

}  // namespace
}  // namespace dk
