// Energy rank policy (training-free, token-adaptive): a token keeps the smallest profile level whose
// prefix holds at least tau of its own latent energy sum_j c_j^2, separately for K and V. Because
// the basis is ordered by decreasing variance and the levels are nested, a larger tau never gives
// a smaller rank, so cache bytes are monotone in tau and a byte budget can be met by bisection.
//
// Budget mode (--kv-budget F), per layer, one tau shared by K and V (they keep the same fraction of
// their energy; how bytes split between K and V then follows the data):
//   target bytes per token  b* = F * 2 * D * 2        debt = bytes stored - b* x tokens stored
//   a batch of n tokens is sampled together with the layer's last W - n tokens (W = 64), and tau is
//   bisected so the sample's mean bytes per token come closest to b* - debt / max(n, H) (H = 8):
//   a prefill batch (n >= H) repays all the debt at once; a decode token keeps (nearly) the layer's
//   last tau, so ranks still follow each token's content, while the debt is repaid over ~H tokens.
#include <algorithm>
#include <cmath>

#include "kv/rank_policy.h"

namespace dk {

namespace {

// Fraction of the token's latent energy kept by each level: f[l] = sum_{j < levels[l]} c_j^2 / sum c_j^2.
// Non-decreasing in l; the last is exactly 1. A zero latent keeps everything at every level.
void LevelFractions(const float* c, int D, const std::vector<int>& levels, double* f) {
  double total = 0.0;
  for (int j = 0; j < D; ++j) total += static_cast<double>(c[j]) * c[j];
  double prefix = 0.0;
  int j = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    for (; j < levels[l]; ++j) prefix += static_cast<double>(c[j]) * c[j];
    f[l] = total > 0.0 ? std::min(1.0, prefix / total) : 1.0;
  }
  f[levels.size() - 1] = 1.0;
}

// Index of the smallest level with fraction >= tau.
int LevelAt(const double* f, int n_levels, double tau) {
  return static_cast<int>(std::lower_bound(f, f + n_levels - 1, tau) - f);
}

class EnergyRankPolicy final : public RankPolicy {
 public:
  EnergyRankPolicy(const RankPolicyContext& ctx, double tau) : levels_(ctx.levels), D_(ctx.kv_dim), tau_(tau) {}
  std::string name() const override { return "energy(tau=" + std::to_string(tau_) + ")"; }
  void Choose(int /*layer*/, int n, const float* c_k, const float* c_v, const float* /*x*/,
              TokenRanks* out) override {
    for (int i = 0; i < n; ++i) {
      out[i].r_k = EnergyRank(c_k + static_cast<int64_t>(i) * D_, D_, levels_, tau_);
      out[i].r_v = EnergyRank(c_v + static_cast<int64_t>(i) * D_, D_, levels_, tau_);
    }
  }
  double ExpectedElemsPerToken() const override { return D_; }  // a guess; the cache grows if needed

 private:
  std::vector<int> levels_;
  int D_;
  double tau_;
};

class EnergyBudgetRankPolicy final : public RankPolicy {
 public:
  static constexpr int kWindow = 64;   // W: tokens a small batch's tau is estimated over
  static constexpr int kHorizon = 8;   // H: tokens a decode debt is repaid over
  static constexpr int kBisectSteps = 40;

  EnergyBudgetRankPolicy(const RankPolicyContext& ctx, double budget)
      : ctx_(ctx), n_levels_(static_cast<int>(ctx.levels.size())), budget_(budget), layers_(ctx.n_layer) {}

  std::string name() const override { return "energy(kv-budget=" + std::to_string(budget_) + ")"; }
  double ExpectedElemsPerToken() const override {
    return std::max(2.0, (budget_ * 4.0 * ctx_.kv_dim - ctx_.cost.meta_bytes) / ctx_.cost.elem_bytes);
  }
  void Reset() override { layers_.assign(ctx_.n_layer, LayerState{}); }
  bool BatchInvariant() const override { return false; }  // one tau per batch

  void Choose(int layer, int n, const float* c_k, const float* c_v, const float* /*x*/, TokenRanks* out) override {
    LayerState& st = layers_[layer];
    const int D = ctx_.kv_dim, L = n_levels_;
    // One row per token: [f_K (L)][f_V (L)].
    batch_.resize(static_cast<size_t>(n) * 2 * L);
    for (int i = 0; i < n; ++i) {
      LevelFractions(c_k + static_cast<int64_t>(i) * D, D, ctx_.levels, &batch_[static_cast<size_t>(i) * 2 * L]);
      LevelFractions(c_v + static_cast<int64_t>(i) * D, D, ctx_.levels, &batch_[static_cast<size_t>(i) * 2 * L + L]);
    }
    const double per_token = budget_ * 4.0 * D;
    const double debt = st.bytes_stored - st.bytes_target;
    const double mean_target = per_token - debt / std::max(n, kHorizon);
    const int n_hist = std::min(static_cast<int>(st.history.size()) / (2 * L), std::max(0, kWindow - n));
    const double* hist = st.history.data() + st.history.size() - static_cast<size_t>(n_hist) * 2 * L;
    const double tau = BisectTau(hist, n_hist, mean_target * (n_hist + n), n);

    int64_t elems = 0;
    for (int i = 0; i < n; ++i) {
      const double* f = &batch_[static_cast<size_t>(i) * 2 * L];
      out[i] = TokenRanks{ctx_.levels[LevelAt(f, L, tau)], ctx_.levels[LevelAt(f + L, L, tau)]};
      elems += out[i].r_k + out[i].r_v;
    }
    st.bytes_stored += ctx_.cost.Bytes(elems, n);
    st.bytes_target += per_token * n;
    st.tau = tau;
    // Keep the last W tokens' fractions.
    st.history.insert(st.history.end(), batch_.begin(), batch_.end());
    const size_t keep = static_cast<size_t>(kWindow) * 2 * L;
    if (st.history.size() > keep) st.history.erase(st.history.begin(), st.history.end() - keep);
  }

 private:
  struct LayerState {
    double tau = 1.0;           // last tau chosen (diagnostics)
    double bytes_stored = 0.0;  // this layer's bytes, as BytesUsed counts them (index amortized)
    double bytes_target = 0.0;  // budget x tokens stored
    std::vector<double> history;  // last <= W tokens' [f_K][f_V] rows
  };

  // Bytes of the sample (history rows, then the batch rows) at tau.
  double SampleBytes(const double* hist, int n_hist, int n, double tau) const {
    const int L = n_levels_;
    int64_t elems = 0;
    auto add = [&](const double* f) {
      elems += ctx_.levels[LevelAt(f, L, tau)] + ctx_.levels[LevelAt(f + L, L, tau)];
    };
    for (int i = 0; i < n_hist; ++i) add(hist + static_cast<size_t>(i) * 2 * L);
    for (int i = 0; i < n; ++i) add(&batch_[static_cast<size_t>(i) * 2 * L]);
    return ctx_.cost.Bytes(elems, n_hist + n);
  }

  // The tau whose sample bytes come closest to target (bytes are a non-decreasing step function).
  double BisectTau(const double* hist, int n_hist, double target, int n) const {
    double lo = 0.0, hi = 1.0;
    const double bytes_lo = SampleBytes(hist, n_hist, n, lo);
    if (bytes_lo >= target) return lo;
    if (SampleBytes(hist, n_hist, n, hi) <= target) return hi;
    double b_lo = bytes_lo, b_hi = 0.0;
    for (int it = 0; it < kBisectSteps; ++it) {
      const double mid = 0.5 * (lo + hi);
      const double b = SampleBytes(hist, n_hist, n, mid);
      if (b <= target) {
        lo = mid;
        b_lo = b;
      } else {
        hi = mid;
        b_hi = b;
      }
    }
    if (b_hi == 0.0) b_hi = SampleBytes(hist, n_hist, n, hi);
    return (target - b_lo) <= (b_hi - target) ? lo : hi;
  }

  RankPolicyContext ctx_;
  int n_levels_;
  double budget_;
  std::vector<LayerState> layers_;
  std::vector<double> batch_;  // [n][2 * n_levels] scratch
};

}  // namespace

int EnergyRank(const float* c, int D, const std::vector<int>& levels, double tau) {
  if (tau >= 1.0) return D;
  double total = 0.0;
  for (int j = 0; j < D; ++j) total += static_cast<double>(c[j]) * c[j];
  if (total <= 0.0) return levels.front();
  // Same comparison as LevelFractions + LevelAt, without the array.
  double prefix = 0.0;
  int j = 0;
  for (size_t l = 0; l + 1 < levels.size(); ++l) {
    for (; j < levels[l]; ++j) prefix += static_cast<double>(c[j]) * c[j];
    if (std::min(1.0, prefix / total) >= tau) return levels[l];
  }
  return levels.back();
}

std::unique_ptr<RankPolicy> MakeEnergyRankPolicy(const RankPolicyContext& ctx, double tau) {
  return std::make_unique<EnergyRankPolicy>(ctx, tau);
}

std::unique_ptr<RankPolicy> MakeEnergyBudgetRankPolicy(const RankPolicyContext& ctx, double budget) {
  return std::make_unique<EnergyBudgetRankPolicy>(ctx, budget);
}

}  // namespace dk
