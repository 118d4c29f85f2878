// SnapKV (Li et al., 2024): at the end of the prompt, the last w prompt queries (the observation
// window) vote over the prompt's earlier tokens with their attention weights; the votes are
// smoothed by average pooling (kernel k, zero padding, as torch's avg_pool1d), and each layer keeps
// the window plus the top B - w earlier tokens. Per KV head on storage that allows it, one global
// set per layer over DynaKV's shared latents. Nothing is evicted while the answer is decoded.
#include <algorithm>

#include "kv/eviction.h"

namespace dk {

namespace {

class SnapKvCache final : public EvictingKvCache {
 public:
  SnapKvCache(std::unique_ptr<KvCache> inner, double keep, bool global, int window, int pool)
      : EvictingKvCache(std::move(inner), keep, global), window_(window), pool_(pool),
        obs_(shape_.n_layer), n_obs_(shape_.n_layer, 0) {}

 protected:
  std::string method() const override {
    return "snapkv(w=" + std::to_string(window_) + ", pool=" + std::to_string(pool_) + ")";
  }

  // Keeps the queries of the last `window_` tokens of each layer.
  void Observe(int layer, const KvPlan& plan, const float* q) override {
    const size_t qd = shape_.q_dim();
    std::vector<float>& o = obs_[layer];
    o.insert(o.end(), q, q + static_cast<size_t>(plan.n) * qd);
    const size_t keep = static_cast<size_t>(window_) * qd;
    if (o.size() > keep) o.erase(o.begin(), o.end() - static_cast<int64_t>(keep));
    n_obs_[layer] = static_cast<int>(o.size() / qd);
  }

  std::vector<std::vector<int>> Choose(int layer, int budget, bool at_prompt_end) override {
    if (!at_prompt_end) return {};
    const int T = Stored(layer), w = std::min(n_obs_[layer], T);
    std::vector<float> probs(static_cast<size_t>(w) * shape_.n_head * T);
    Scores(layer, obs_[layer].data() + obs_[layer].size() - static_cast<size_t>(w) * shape_.q_dim(), w, probs.data());
    std::vector<std::vector<double>> votes;
    AccumulateVotes(probs, w, shape_.n_head, shape_.n_head_kv, T, per_head_, &votes);
    const int prefix = T - w;  // tokens before the observation window
    std::vector<std::vector<int>> keep(votes.size());
    for (size_t s = 0; s < votes.size(); ++s) {
      if (budget <= w) {  // the budget does not even hold the window: its last tokens
        for (int t = T - budget; t < T; ++t) keep[s].push_back(t);
        continue;
      }
      keep[s] = TopK(Pool(votes[s], prefix), prefix, budget - w);
      for (int t = prefix; t < T; ++t) keep[s].push_back(t);
    }
    return keep;
  }

  void OnClear() override {
    EvictingKvCache::OnClear();
    for (auto& o : obs_) o.clear();
    std::fill(n_obs_.begin(), n_obs_.end(), 0);
  }

 private:
  // Average pooling over `pool_` neighbours of the first n votes, zeros outside (count_include_pad).
  std::vector<double> Pool(const std::vector<double>& v, int n) const {
    std::vector<double> out(n, 0.0);
    const int half = pool_ / 2;
    for (int t = 0; t < n; ++t) {
      double s = 0.0;
      for (int j = t - half; j <= t + half; ++j)
        if (j >= 0 && j < n) s += v[j];
      out[t] = s / pool_;
    }
    return out;
  }

  int window_, pool_;
  std::vector<std::vector<float>> obs_;  // [layer][n_obs][q_dim] the window's queries
  std::vector<int> n_obs_;
};

StatusOr<std::unique_ptr<KvCache>> WrapSnapKv(const KvConfig& config, std::unique_ptr<KvCache> inner,
                                              const KvModelInfo& /*model*/) {
  double keep;
  int window, pool;
  DK_ASSIGN_OR_RETURN(keep, EvictKeep(config));
  DK_ASSIGN_OR_RETURN(window, config.options.Int("--snapkv-window", 32, 1, 1 << 20));
  DK_ASSIGN_OR_RETURN(pool, config.options.Int("--snapkv-pool", 7, 1, 1 << 10));
  if (pool % 2 == 0) return InvalidArgument("--snapkv-pool: expected an odd kernel size, found " + std::to_string(pool));
  return std::unique_ptr<KvCache>(new SnapKvCache(std::move(inner), keep, EvictGlobal(config), window, pool));
}

}  // namespace

const KvMethod& SnapKvMethod() {
  static const KvMethod m{"snapkv",
                          "SnapKV: the prompt's last queries vote on which tokens to keep (at the end of the prompt)",
                          EvictFlags({{"--snapkv-window", "W", "snapkv: observation window, the last W prompt queries (32)"},
                                      {"--snapkv-pool", "K", "snapkv: average-pooling kernel over the votes, odd (7)"}}),
                          nullptr, &WrapSnapKv};
  return m;
}

}  // namespace dk
