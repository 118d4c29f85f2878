#include "train/relaxed_cache.h"

#include <algorithm>
#include <cmath>
#include <random>

#include <cblas.h>

#include "ops/grad.h"
#include "train/cayley.h"

namespace dk {

double Uniform01(uint64_t key, uint64_t index) {
  const uint64_t bits = Mix64(key ^ Mix64(index)) >> 11;  // 53 random bits
  return (static_cast<double>(bits) + 0.5) / 9007199254740992.0;  // (0, 1), never 0 or 1
}

double GumbelNoise(uint64_t key, uint64_t index) { return -std::log(-std::log(Uniform01(key, index))); }

namespace {

// c[D][D] = a[D][D] b[D][D] (transpose_a: a^T b). D is the KV width: small, plain loops.
template <typename T>
void SquareMatMul(const T* a, const T* b, T* c, int D, bool transpose_a) {
  const size_t n = static_cast<size_t>(D);
  std::fill(c, c + n * n, T(0));
  for (size_t i = 0; i < n; ++i)
    for (size_t k = 0; k < n; ++k) {
      const T aik = transpose_a ? a[k * n + i] : a[i * n + k];
      for (size_t j = 0; j < n; ++j) c[i * n + j] += aik * b[k * n + j];
    }
}

}  // namespace

template <typename T>
RelaxedDynaKvCache<T>::RelaxedDynaKvCache(const DynaKvProfile& profile, int n_embd, const RecordCost& cost,
                                          const RelaxedCacheOptions& options, ParamStore<T>& params)
    : n_layer_(profile.n_layer),
      D_(profile.kv_dim()),
      E_(n_embd),
      H_(options.hidden),
      L_(static_cast<int>(profile.levels.size())),
      levels_(profile.levels),
      cost_(cost),
      opt_(options),
      params_(params),
      lp_(profile.n_layer),
      ls_(profile.n_layer) {
  level_cost_.assign(levels_.begin(), levels_.end());
  const size_t E = E_, H = H_, L = L_, D = D_;
  for (int l = 0; l < n_layer_; ++l) {
    const std::string p = "layer" + std::to_string(l) + ".";
    LayerParams& q = lp_[l];
    q.w1 = params.Add(p + "router.w1", H * E, true);
    q.b1 = params.Add(p + "router.b1", H, false);
    q.w2k = params.Add(p + "router.w2k", L * H, true);
    q.b2k = params.Add(p + "router.b2k", L, false);
    q.w2v = params.Add(p + "router.w2v", L * H, true);
    q.b2v = params.Add(p + "router.b2v", L, false);
    if (opt_.train_bases) {
      const double s = opt_.bases_lr_scale;
      q.ak = params.Add(p + "basis_k.cayley", D * D, false, s);
      q.av = params.Add(p + "basis_v.cayley", D * D, false, s);
      q.muk = params.Add(p + "mean_k", D, false, s);
      q.muv = params.Add(p + "mean_v", D, false, s);
    }
    LayerState& s = ls_[l];
    s.u0k.assign(profile.k[l].basis.begin(), profile.k[l].basis.end());
    s.u0v.assign(profile.v[l].basis.begin(), profile.v[l].basis.end());
    s.uk = s.u0k;
    s.uv = s.u0v;
    s.muk.assign(profile.k[l].mean.begin(), profile.k[l].mean.end());
    s.muv.assign(profile.v[l].mean.begin(), profile.v[l].mean.end());
    if (opt_.train_bases) {
      for (auto* m : {&s.qk, &s.qv, &s.mik, &s.miv}) m->assign(D * D, T(0));
    }
    if (opt_.tc) {
      tck_.push_back(MakeTcCodebook(profile.k[l], D_));
      tcv_.push_back(MakeTcCodebook(profile.v[l], D_));
      covk_.emplace_back();
      covv_.emplace_back();
      for (int r : levels_) {
        covk_.back().push_back(tck_.back().ladder[r - 1].coords);
        covv_.back().push_back(tcv_.back().ladder[r - 1].coords);
      }
    }
  }
}

namespace {

// c[n][D] (+)= a[n][D] b[D][D] (b transposed when trans_b), in T's precision through BLAS.
void Gemm(int n, int D, const float* a, const float* b, bool trans_b, float beta, float* c) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, n, D, D, 1.0f, a, D, b, D, beta, c, D);
}
void Gemm(int n, int D, const double* a, const double* b, bool trans_b, double beta, double* c) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, n, D, D, 1.0, a, D, b, D, beta, c, D);
}

}  // namespace

template <typename T>
void RelaxedDynaKvCache<T>::CoverageMask(const T* p, const std::vector<int>& cov, T* m, int n) const {
  for (int t = 0; t < n; ++t) {
    T* mr = m + static_cast<size_t>(t) * D_;
    std::fill(mr, mr + D_, T(0));
    for (int j = 0; j < L_; ++j) {
      const T pj = p[static_cast<size_t>(t) * L_ + j];
      if (pj != T(0))
        for (int i = 0; i < cov[j]; ++i) mr[i] += pj;
    }
  }
}

template <typename T>
void RelaxedDynaKvCache<T>::CoverageMaskBackward(const T* dm, const std::vector<int>& cov, T* dp, int n) {
  std::vector<T> prefix(static_cast<size_t>(D_) + 1, T(0));
  for (int t = 0; t < n; ++t) {
    const T* d = dm + static_cast<size_t>(t) * D_;
    for (int i = 0; i < D_; ++i) prefix[i + 1] = prefix[i] + d[i];
    for (int j = 0; j < L_; ++j) dp[static_cast<size_t>(t) * L_ + j] = prefix[cov[j]];
  }
}

template <typename T>
void RelaxedDynaKvCache<T>::CodeError(const TcCodebook& cb, int rank, const T* c, T* e) {
  const TcAllocation& a = cb.ladder[rank - 1];
  zq_.resize(2 * static_cast<size_t>(D_));
  rec_.resize(static_cast<size_t>(a.bytes) + 8);
  float* z = zq_.data();
  float* zhat = z + D_;
  for (int i = 0; i < a.coords; ++i) z[i] = static_cast<float>(c[i]) * cb.inv_sigma[i];
  TcEncode(z, a, D_, rec_.data());
  TcDecode(rec_.data(), a, D_, zhat);
  for (int i = 0; i < a.coords; ++i) e[i] = static_cast<T>(cb.sigma[i] * zhat[i]) - c[i];
  std::fill(e + a.coords, e + D_, T(0));
}

template <typename T>
void RelaxedDynaKvCache<T>::AddCodeError(int layer, int which, int n, const T* p, const T* c, T* xhat) {
  const TcCodebook& cb = which == 0 ? tck_[layer] : tcv_[layer];
  emix_.assign(static_cast<size_t>(n) * D_, T(0));
  err_.resize(D_);
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < L_; ++j) {
      const T pj = p[static_cast<size_t>(t) * L_ + j];
      if (pj == T(0)) continue;
      CodeError(cb, levels_[j], c + static_cast<size_t>(t) * D_, err_.data());
      T* et = emix_.data() + static_cast<size_t>(t) * D_;
      for (int i = 0; i < D_; ++i) et[i] += pj * err_[i];
    }
  const std::vector<T>& u = which == 0 ? ls_[layer].uk : ls_[layer].uv;
  Gemm(n, D_, emix_.data(), u.data(), true, T(1), xhat);  // xhat += E U^T
}

template <typename T>
void RelaxedDynaKvCache<T>::CodeErrorBackward(int layer, int which, int n, const T* y, const T* c, const T* dxhat,
                                              T* dp) {
  const TcCodebook& cb = which == 0 ? tck_[layer] : tcv_[layer];
  const std::vector<T>& u = which == 0 ? ls_[layer].uk : ls_[layer].uv;
  g_.resize(static_cast<size_t>(n) * D_);
  Gemm(n, D_, dxhat, u.data(), false, T(0), g_.data());  // g = dxhat U
  err_.resize(D_);
  for (int t = 0; t < n; ++t)
    for (int j = 0; j < L_; ++j) {
      // A level the soft sample gives no weight has no gradient through the Gumbel-softmax.
      if (!(y[static_cast<size_t>(t) * L_ + j] > T(1e-9))) continue;
      CodeError(cb, levels_[j], c + static_cast<size_t>(t) * D_, err_.data());
      const T* gt = g_.data() + static_cast<size_t>(t) * D_;
      T s = T(0);
      for (int i = 0; i < D_; ++i) s += gt[i] * err_[i];
      dp[static_cast<size_t>(t) * L_ + j] += s;
    }
}

template <typename T>
void RelaxedDynaKvCache<T>::InitParams(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  // The level nearest the rank a uniform cache would get at the target fraction.
  const double elems = (opt_.target * 4.0 * D_ - cost_.meta_bytes - cost_.index_bytes_per_token) / cost_.elem_bytes;
  const double r0 = std::clamp(elems / 2.0, 1.0, static_cast<double>(D_));
  for (int l = 0; l < n_layer_; ++l) {
    const LayerParams& q = lp_[l];
    auto fill = [&](size_t t, double scale) {
      T* w = params_.value(t);
      for (size_t i = 0; i < params_.tensors()[t].size; ++i) w[i] = static_cast<T>(nd(rng) * scale);
    };
    fill(q.w1, 1.0 / std::sqrt(static_cast<double>(E_)));
    std::fill(params_.value(q.b1), params_.value(q.b1) + H_, T(0));
    fill(q.w2k, 0.1 / std::sqrt(static_cast<double>(H_)));
    fill(q.w2v, 0.1 / std::sqrt(static_cast<double>(H_)));
    // Prior over levels: a Gaussian in log-rank around r0 (width 0.5 in natural log units).
    for (int j = 0; j < L_; ++j) {
      const double z = std::log(levels_[j] / r0) / 0.5;
      params_.value(q.b2k)[j] = params_.value(q.b2v)[j] = static_cast<T>(-0.5 * z * z);
    }
    if (opt_.train_bases) {
      std::fill(params_.value(q.ak), params_.value(q.ak) + static_cast<size_t>(D_) * D_, T(0));
      std::fill(params_.value(q.av), params_.value(q.av) + static_cast<size_t>(D_) * D_, T(0));
      std::copy(ls_[l].muk.begin(), ls_[l].muk.end(), params_.value(q.muk));
      std::copy(ls_[l].muv.begin(), ls_[l].muv.end(), params_.value(q.muv));
    }
  }
}

template <typename T>
void RelaxedDynaKvCache<T>::LoadParams(const DynaKvProfile& profile) {
  if (!profile.router) return;
  for (int l = 0; l < n_layer_; ++l) {
    const RouterLayer& r = profile.router->layers[l];
    const LayerParams& q = lp_[l];
    std::copy(r.w1.begin(), r.w1.end(), params_.value(q.w1));
    std::copy(r.b1.begin(), r.b1.end(), params_.value(q.b1));
    std::copy(r.w2k.begin(), r.w2k.end(), params_.value(q.w2k));
    std::copy(r.b2k.begin(), r.b2k.end(), params_.value(q.b2k));
    std::copy(r.w2v.begin(), r.w2v.end(), params_.value(q.w2v));
    std::copy(r.b2v.begin(), r.b2v.end(), params_.value(q.b2v));
  }
}

template <typename T>
void RelaxedDynaKvCache<T>::Prepare(RouterMode mode, double tau, uint64_t noise_key) {
  mode_ = mode;
  tau_ = tau;
  noise_key_ = noise_key;
  if (opt_.train_bases) UpdateBases();
}

template <typename T>
void RelaxedDynaKvCache<T>::UpdateBases() {
  const size_t D = D_;
  for (int l = 0; l < n_layer_; ++l) {
    LayerState& s = ls_[l];
    const LayerParams& q = lp_[l];
    // A skew generator of zeros cannot fail to invert; a failure here means non-finite parameters,
    // which the trainer checks for after every step.
    (void)CayleyForward(params_.value(q.ak), D_, s.qk.data(), s.mik.data());
    (void)CayleyForward(params_.value(q.av), D_, s.qv.data(), s.miv.data());
    SquareMatMul(s.u0k.data(), s.qk.data(), s.uk.data(), D_, false);
    SquareMatMul(s.u0v.data(), s.qv.data(), s.uv.data(), D_, false);
    std::copy(params_.value(q.muk), params_.value(q.muk) + D, s.muk.begin());
    std::copy(params_.value(q.muv), params_.value(q.muv) + D, s.muv.begin());
  }
}

template <typename T>
void RelaxedDynaKvCache<T>::ChooseLevels(int layer, int n, int which, const T* logits, T* y, T* p) {
  const int L = L_;
  if (mode_ == RouterMode::kArgmax) {
    for (int t = 0; t < n; ++t) {
      const T* lt = logits + static_cast<size_t>(t) * L;
      const int best = static_cast<int>(std::max_element(lt, lt + L) - lt);
      for (int j = 0; j < L; ++j) y[static_cast<size_t>(t) * L + j] = p[static_cast<size_t>(t) * L + j] = j == best;
    }
    return;
  }
  tmp_.resize(static_cast<size_t>(n) * L);
  const uint64_t base = (static_cast<uint64_t>(layer) * 2 + which) * static_cast<uint64_t>(n) * L;
  for (size_t i = 0; i < tmp_.size(); ++i) tmp_[i] = static_cast<T>(GumbelNoise(noise_key_, base + i));
  GumbelSoftmaxForward(logits, tmp_.data(), static_cast<T>(tau_), mode_ == RouterMode::kGumbelHard, y, p, n, L);
}

template <typename T>
void RelaxedDynaKvCache<T>::Forward(int layer, int n, const T* k, const T* v, const T* x, T* khat, T* vhat) {
  LayerState& s = ls_[layer];
  const LayerParams& q = lp_[layer];
  const size_t nE = static_cast<size_t>(n) * E_, nH = static_cast<size_t>(n) * H_, nL = static_cast<size_t>(n) * L_,
               nD = static_cast<size_t>(n) * D_;
  s.x.assign(x, x + nE);
  s.k.assign(k, k + nD);
  s.v.assign(v, v + nD);
  for (auto* b : {&s.pre, &s.h}) b->resize(nH);
  for (auto* b : {&s.lk, &s.lv, &s.yk, &s.yv, &s.pk, &s.pv}) b->resize(nL);
  for (auto* b : {&s.mk, &s.mv, &s.ck, &s.cv}) b->resize(nD);
  // Router: the same computation as RouterForward at inference, in the precision of T.
  LinearForward(x, params_.value(q.w1), params_.value(q.b1), s.pre.data(), n, E_, H_);
  Silu(s.pre.data(), s.h.data(), static_cast<int64_t>(nH));
  LinearForward(s.h.data(), params_.value(q.w2k), params_.value(q.b2k), s.lk.data(), n, H_, L_);
  LinearForward(s.h.data(), params_.value(q.w2v), params_.value(q.b2v), s.lv.data(), n, H_, L_);
  ChooseLevels(layer, n, 0, s.lk.data(), s.yk.data(), s.pk.data());
  ChooseLevels(layer, n, 1, s.lv.data(), s.yv.data(), s.pv.data());
  if (opt_.tc) {
    CoverageMask(s.pk.data(), covk_[layer], s.mk.data(), n);
    CoverageMask(s.pv.data(), covv_[layer], s.mv.data(), n);
  } else {
    LevelMask(s.pk.data(), levels_.data(), L_, s.mk.data(), n, D_);
    LevelMask(s.pv.data(), levels_.data(), L_, s.mv.data(), n, D_);
  }
  LowRankMaskForward(k, s.uk.data(), s.muk.data(), s.mk.data(), s.ck.data(), khat, n, D_);
  LowRankMaskForward(v, s.uv.data(), s.muv.data(), s.mv.data(), s.cv.data(), vhat, n, D_);
  if (opt_.tc) {
    AddCodeError(layer, 0, n, s.pk.data(), s.ck.data(), khat);
    AddCodeError(layer, 1, n, s.pv.data(), s.cv.data(), vhat);
  }
  // Fractions: expected under softmax(logits) (the sampling distribution of the hard choice) and
  // realised by the choices made.
  de_.resize(static_cast<size_t>(n) * 2);
  SoftmaxExpectation(s.lk.data(), level_cost_.data(), de_.data(), n, L_);
  SoftmaxExpectation(s.lv.data(), level_cost_.data(), de_.data() + n, n, L_);
  double expected = 0.0, realised = 0.0;
  for (int t = 0; t < n; ++t) {
    expected += static_cast<double>(de_[t]) + static_cast<double>(de_[n + t]);
    for (int j = 0; j < L_; ++j)
      realised += levels_[j] * static_cast<double>(s.pk[static_cast<size_t>(t) * L_ + j] +
                                                    s.pv[static_cast<size_t>(t) * L_ + j]);
  }
  const double full = 4.0 * D_, fixed = cost_.meta_bytes + cost_.index_bytes_per_token;
  s.expected = (expected / n * cost_.elem_bytes + fixed) / full;
  s.realised = (realised / n * cost_.elem_bytes + fixed) / full;
}

template <typename T>
void RelaxedDynaKvCache<T>::Backward(int layer, int n, const T* dkhat, const T* dvhat, T* dk, T* dv, T* dx) {
  LayerState& s = ls_[layer];
  const LayerParams& q = lp_[layer];
  const size_t nD = static_cast<size_t>(n) * D_, nL = static_cast<size_t>(n) * L_, nH = static_cast<size_t>(n) * H_,
               DD = static_cast<size_t>(D_) * D_;
  dmask_.resize(nD);
  dp_.resize(nL);
  dl_.resize(2 * nL);
  de_.resize(n);
  tmp_.resize(nL);
  dh_.resize(nH);
  dpre_.resize(nH);
  // d(expected fraction) / d(expected rank of one row in this layer).
  const T de = static_cast<T>(fraction_grad_ * cost_.elem_bytes / (4.0 * D_) / (static_cast<double>(n) * n_layer_));
  std::fill(de_.begin(), de_.end(), de);
  for (int which = 0; which < 2; ++which) {
    const T* dxhat = which == 0 ? dkhat : dvhat;
    T* dxin = which == 0 ? dk : dv;
    const std::vector<T>& u = which == 0 ? s.uk : s.uv;
    const std::vector<T>& mu = which == 0 ? s.muk : s.muv;
    T* dl = dl_.data() + which * nL;
    T* du = nullptr;
    T* dmu = nullptr;
    if (opt_.train_bases) {
      du_.assign(DD, T(0));
      du = du_.data();
      dmu = params_.grad(which == 0 ? q.muk : q.muv);
    }
    LowRankMaskBackward((which == 0 ? s.k : s.v).data(), u.data(), mu.data(), (which == 0 ? s.mk : s.mv).data(),
                        (which == 0 ? s.ck : s.cv).data(), dxhat, dxin, dmask_.data(), du, dmu, n, D_);
    if (opt_.tc) {
      CoverageMaskBackward(dmask_.data(), which == 0 ? covk_[layer] : covv_[layer], dp_.data(), n);
      CodeErrorBackward(layer, which, n, (which == 0 ? s.yk : s.yv).data(), (which == 0 ? s.ck : s.cv).data(), dxhat,
                        dp_.data());
    } else {
      LevelMaskBackward(dmask_.data(), levels_.data(), L_, dp_.data(), n, D_);
    }
    GumbelSoftmaxBackward((which == 0 ? s.yk : s.yv).data(), dp_.data(), static_cast<T>(tau_), dl, n, L_);
    SoftmaxExpectationBackward((which == 0 ? s.lk : s.lv).data(), level_cost_.data(), de_.data(), tmp_.data(), n, L_);
    for (size_t i = 0; i < nL; ++i) dl[i] += tmp_[i];
    if (opt_.train_bases) {  // U = U0 Q(W): dQ = U0^T dU, then the Cayley backward into dW
      std::vector<T> dq(DD);
      SquareMatMul((which == 0 ? s.u0k : s.u0v).data(), du, dq.data(), D_, true);
      CayleyBackward((which == 0 ? s.qk : s.qv).data(), (which == 0 ? s.mik : s.miv).data(), dq.data(), D_,
                     params_.grad(which == 0 ? q.ak : q.av));
    }
  }
  LinearBackward(s.h.data(), params_.value(q.w2k), dl_.data(), dh_.data(), params_.grad(q.w2k), params_.grad(q.b2k),
                 n, H_, L_, false);
  LinearBackward(s.h.data(), params_.value(q.w2v), dl_.data() + nL, dh_.data(), params_.grad(q.w2v),
                 params_.grad(q.b2v), n, H_, L_, true);
  SiluBackward(s.pre.data(), dh_.data(), dpre_.data(), static_cast<int64_t>(nH));
  LinearBackward(s.x.data(), params_.value(q.w1), dpre_.data(), dx, params_.grad(q.w1), params_.grad(q.b1), n, E_, H_,
                 true);
}

template <typename T>
double RelaxedDynaKvCache<T>::expected_fraction() const {
  double s = 0.0;
  for (const LayerState& l : ls_) s += l.expected;
  return s / n_layer_;
}

template <typename T>
double RelaxedDynaKvCache<T>::realised_fraction() const {
  double s = 0.0;
  for (const LayerState& l : ls_) s += l.realised;
  return s / n_layer_;
}

template <typename T>
double RelaxedDynaKvCache<T>::realised_fraction(int layer) const {
  return ls_[layer].realised;
}

template <typename T>
void RelaxedDynaKvCache<T>::ShiftOutputBiases(double beta) {
  for (const LayerParams& q : lp_)
    for (int j = 0; j < L_; ++j) {
      params_.value(q.b2k)[j] += static_cast<T>(beta * levels_[j]);
      params_.value(q.b2v)[j] += static_cast<T>(beta * levels_[j]);
    }
}

template <typename T>
void RelaxedDynaKvCache<T>::Export(DynaKvProfile* profile) const {
  Router r;
  r.n_embd = E_;
  r.hidden = H_;
  r.target = opt_.target;
  r.layers.resize(n_layer_);
  for (int l = 0; l < n_layer_; ++l) {
    const LayerParams& q = lp_[l];
    auto out = [&](size_t t) {
      const T* v = params_.value(t);
      return std::vector<float>(v, v + params_.tensors()[t].size);
    };
    r.layers[l] = RouterLayer{out(q.w1), out(q.b1), out(q.w2k), out(q.b2k), out(q.w2v), out(q.b2v)};
    if (opt_.train_bases) {
      const LayerState& s = ls_[l];
      profile->k[l].basis.assign(s.uk.begin(), s.uk.end());
      profile->v[l].basis.assign(s.uv.begin(), s.uv.end());
      profile->k[l].mean.assign(s.muk.begin(), s.muk.end());
      profile->v[l].mean.assign(s.muv.begin(), s.muv.end());
    }
  }
  if (opt_.train_bases) profile->flags |= DynaKvProfile::kFlagTrainedBases;
  if (opt_.tc) profile->flags |= DynaKvProfile::kFlagTcRouter;
  profile->router = std::move(r);
}

template class RelaxedDynaKvCache<float>;
template class RelaxedDynaKvCache<double>;

}  // namespace dk
