// Router rank policy: DynaKV's learned, token-wise rank allocation. Per layer, the profile's router
// (kv/router.h) scores the rank levels from the token's attention input; the token keeps the
// level with the highest score, separately for K and V.
//
// Budget mode (--kv-budget F) shifts every score by beta * level (a larger beta favours larger
// ranks; the chosen rank never decreases as beta grows, so bytes are monotone in beta):
//   1. From the profile's budget table (the fraction each layer realised at each beta on
//      calibration sequences, written by train-router) take the beta* whose mean over layers is F,
//      and each layer's fraction F_l at beta* (linear interpolation between rows): per-layer
//      targets that keep the router's own allocation across layers and average exactly F.
//   2. At run time each layer steers causally toward F_l: token t uses
//        beta_l(t) = beta* - kappa_l * debt_l(t),   debt_l = (bytes stored - F_l x full bytes) / full bytes per token
//      with kappa_l = 1 / (H x dF_l/dbeta), so a debt is repaid over about H = 8 tokens. A token's
//      choice depends only on its own scores and the tokens before it, never on later ones.
#include <algorithm>
#include <cmath>

#include "kv/profile.h"
#include "kv/rank_policy.h"
#include "kv/router.h"

namespace dk {

namespace {

class RouterRankPolicy final : public RankPolicy {
 public:
  static constexpr double kHorizon = 8.0;  // H: tokens over which a debt is repaid

  RouterRankPolicy(const RankPolicyContext& ctx, double budget)
      : ctx_(ctx), router_(*ctx.profile->router), L_(static_cast<int>(ctx.levels.size())), budget_(budget) {
    if (budget_ > 0.0) SetUpBudget();
    Reset();
  }

  std::string name() const override {
    return budget_ > 0.0 ? "router(kv-budget=" + std::to_string(budget_) + ")" : "router";
  }
  double ExpectedElemsPerToken() const override {
    const double f = budget_ > 0.0 ? budget_ : router_.target;
    return std::max(2.0, (f * 4.0 * ctx_.kv_dim - ctx_.cost.meta_bytes) / ctx_.cost.elem_bytes);
  }
  void Reset() override {
    bytes_.assign(ctx_.n_layer, 0.0);
    tokens_.assign(ctx_.n_layer, 0);
  }

  void Choose(int layer, int n, const float* /*c_k*/, const float* /*c_v*/, const float* x, TokenRanks* out) override {
    const int H = router_.hidden, E = router_.n_embd, L = L_;
    pre_.resize(static_cast<size_t>(n) * H);
    h_.resize(static_cast<size_t>(n) * H);
    lk_.resize(static_cast<size_t>(n) * L);
    lv_.resize(static_cast<size_t>(n) * L);
    RouterForward(router_.layers[layer], E, H, L, x, n, pre_.data(), h_.data(), lk_.data(), lv_.data());
    const double full = 4.0 * ctx_.kv_dim;  // fp16 full-cache bytes of one token in one layer
    for (int i = 0; i < n; ++i) {
      double beta = 0.0;
      if (budget_ > 0.0) {
        const double debt = (bytes_[layer] - target_[layer] * full * tokens_[layer]) / full;
        beta = std::clamp(beta_star_ - kappa_[layer] * debt, beta_lo_, beta_hi_);
      }
      out[i].r_k = ctx_.levels[RouterChoice(&lk_[static_cast<size_t>(i) * L], ctx_.levels.data(), L, beta)];
      out[i].r_v = ctx_.levels[RouterChoice(&lv_[static_cast<size_t>(i) * L], ctx_.levels.data(), L, beta)];
      bytes_[layer] += ctx_.cost.Bytes(out[i].r_k + out[i].r_v, 1);
      ++tokens_[layer];
    }
  }

 private:
  // Interpolates the budget table at mean fraction budget_ (the table spans the whole range: the
  // caller checked that it is not empty).
  void SetUpBudget() {
    const std::vector<RouterBudgetRow>& rows = router_.budget;
    beta_lo_ = rows.front().beta;
    beta_hi_ = rows.back().beta;
    size_t i = 0;
    while (i + 2 < rows.size() && Router::MeanFraction(rows[i + 1]) < budget_) ++i;
    const RouterBudgetRow& a = rows[i];
    const RouterBudgetRow& b = rows[std::min(i + 1, rows.size() - 1)];
    const double fa = Router::MeanFraction(a), fb = Router::MeanFraction(b);
    const double t = fb > fa ? std::clamp((budget_ - fa) / (fb - fa), 0.0, 1.0) : 0.0;
    beta_star_ = a.beta + t * (b.beta - a.beta);
    target_.resize(ctx_.n_layer);
    kappa_.resize(ctx_.n_layer);
    // Per-layer targets, rescaled so that they average exactly the budget.
    double mean = 0.0;
    for (int l = 0; l < ctx_.n_layer; ++l) mean += target_[l] = a.fraction[l] + t * (b.fraction[l] - a.fraction[l]);
    mean /= ctx_.n_layer;
    for (int l = 0; l < ctx_.n_layer; ++l) {
      target_[l] = mean > 0.0 ? target_[l] * budget_ / mean : budget_;
      // Local slope dF_l/dbeta over the bracketing rows (widened where the table is flat).
      size_t lo = i, hi = std::min(i + 1, rows.size() - 1);
      auto slope = [&] {
        return rows[hi].beta > rows[lo].beta
                   ? (rows[hi].fraction[l] - rows[lo].fraction[l]) / (rows[hi].beta - rows[lo].beta)
                   : 0.0;
      };
      while (slope() <= 1e-9 && (lo > 0 || hi + 1 < rows.size())) {
        if (lo > 0) --lo;
        if (hi + 1 < rows.size()) ++hi;
      }
      kappa_[l] = 1.0 / (kHorizon * std::max(slope(), 1e-6));
    }
  }

  RankPolicyContext ctx_;
  const Router& router_;  // owned by ctx_.profile
  int L_;
  double budget_;
  double beta_star_ = 0.0, beta_lo_ = 0.0, beta_hi_ = 0.0;
  std::vector<double> target_, kappa_;  // [n_layer] budget mode
  std::vector<double> bytes_;           // [n_layer] bytes stored, as BytesUsed counts them
  std::vector<int64_t> tokens_;         // [n_layer]
  std::vector<float> pre_, h_, lk_, lv_;  // scratch [n][H], [n][H], [n][L], [n][L]
};

}  // namespace

std::unique_ptr<RankPolicy> MakeRouterRankPolicy(const RankPolicyContext& ctx, double budget) {
  return std::make_unique<RouterRankPolicy>(ctx, budget);
}

}  // namespace dk
