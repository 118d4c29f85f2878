// Router rank policy: DynaKV's learned, token-wise rank allocation. Per layer, the profile's router
// (kv/router.h) scores the rank levels from the token's attention input; the token keeps the
// level with the highest score, separately for K and V.
//
// Budget mode (--kv-budget F) shifts every score by beta * level: a larger beta favours larger
// ranks, and the chosen rank never decreases as beta grows, so bytes are monotone in beta. The
// profile's budget table holds the fraction each layer realised at each beta on calibration
// sequences (train-router measures it); the policy takes the beta whose mean over layers is F
// (linear interpolation between rows) and uses it for every token of every layer. The router keeps
// its own allocation across layers and tokens, and a token's choice depends on its own scores
// alone. The fraction met on other text is F up to how the text differs from the calibration text
// (within 2 % on held-out text: tests/test_train.cpp). A feedback controller that steers the bytes
// stored so far back to F meets it exactly, but it was tried and rejected: it moves the offset with
// the history of the text, and the tokens it squeezes are the ones a later question needs (passkey
// retrieval at 25 % fell from 28 to 12 of 30, KL at 25 % rose from 0.09 to 0.16).
#include <algorithm>
#include <cmath>

#include "kv/dynakv_cache.h"
#include "kv/profile.h"
#include "kv/rank_policy.h"
#include "kv/router.h"

namespace dk {

namespace {

class RouterRankPolicy final : public RankPolicy {
 public:
  RouterRankPolicy(const RankPolicyContext& ctx, double budget)
      : ctx_(ctx), router_(*ctx.profile->router), L_(static_cast<int>(ctx.levels.size())), budget_(budget) {
    if (budget_ > 0.0) SetUpBudget();
  }

  std::string name() const override {
    return budget_ > 0.0 ? "router(kv-budget=" + std::to_string(budget_) + ")" : "router";
  }
  double ExpectedElemsPerToken() const override {
    const double f = budget_ > 0.0 ? budget_ : router_.target;
    return std::max(2.0, (f * 4.0 * ctx_.kv_dim - ctx_.cost.meta_bytes) / ctx_.cost.elem_bytes);
  }

  void Choose(int layer, int n, const float* /*c_k*/, const float* /*c_v*/, const float* x, TokenRanks* out) override {
    const int H = router_.hidden, E = router_.n_embd, L = L_;
    pre_.resize(static_cast<size_t>(n) * H);
    h_.resize(static_cast<size_t>(n) * H);
    lk_.resize(static_cast<size_t>(n) * L);
    lv_.resize(static_cast<size_t>(n) * L);
    RouterForward(router_.layers[layer], E, H, L, x, n, pre_.data(), h_.data(), lk_.data(), lv_.data());
    for (int i = 0; i < n; ++i) {
      out[i].r_k = ctx_.levels[RouterChoice(&lk_[static_cast<size_t>(i) * L], ctx_.levels.data(), L, beta_)];
      out[i].r_v = ctx_.levels[RouterChoice(&lv_[static_cast<size_t>(i) * L], ctx_.levels.data(), L, beta_)];
    }
  }

 private:
  // Interpolates the budget table at mean fraction budget_ (the caller checked that it has at least
  // two rows; the table spans every token at the lowest level to every token at D).
  void SetUpBudget() {
    const std::vector<RouterBudgetRow>& rows = router_.budget;
    // The table counts fp16 latents; for other formats, the fp16 fraction with as many numbers.
    const RecordCost f16 = DynaKvCache::CostFor(ctx_.kv_dim, KvDtype::kF16);
    const double full = 4.0 * ctx_.kv_dim;
    const double elems = (budget_ * full - ctx_.cost.meta_bytes - ctx_.cost.index_bytes_per_token) / ctx_.cost.elem_bytes;
    const double want = f16.Bytes(0, 1) / full + elems * f16.elem_bytes / full;
    size_t i = 0;
    while (i + 2 < rows.size() && Router::MeanFraction(rows[i + 1]) < want) ++i;
    const double fa = Router::MeanFraction(rows[i]), fb = Router::MeanFraction(rows[i + 1]);
    const double t = fb > fa ? std::clamp((want - fa) / (fb - fa), 0.0, 1.0) : 0.0;
    beta_ = rows[i].beta + t * (rows[i + 1].beta - rows[i].beta);
  }

  RankPolicyContext ctx_;
  const Router& router_;  // owned by ctx_.profile
  int L_;
  double budget_;
  double beta_ = 0.0;  // the logit offset per latent dimension (0 without a budget)
  std::vector<float> pre_, h_, lk_, lv_;  // scratch [n][H], [n][H], [n][L], [n][L]
};

}  // namespace

std::unique_ptr<RankPolicy> MakeRouterRankPolicy(const RankPolicyContext& ctx, double budget) {
  return std::make_unique<RouterRankPolicy>(ctx, budget);
}

}  // namespace dk
