// H2O (Zhang et al., 2023): heavy hitters plus recent tokens. Every query's attention weights are
// accumulated per stored token (per KV head where the storage allows, else summed over all heads).
// At the end of the prompt each layer keeps the most recent r = round(recent * B) tokens and the
// B - r earlier ones with the largest accumulated attention; then, for every decoded token, the
// earlier token with the least accumulated attention goes.
#include <algorithm>
#include <cmath>

#include "kv/eviction.h"

namespace dk {

namespace {

class H2oCache final : public EvictingKvCache {
 public:
  H2oCache(std::unique_ptr<KvCache> inner, double keep, bool global, double recent)
      : EvictingKvCache(std::move(inner), keep, global), recent_(recent), acc_(shape_.n_layer) {}

 protected:
  std::string method() const override { return "h2o(recent=" + std::to_string(recent_).substr(0, 4) + ")"; }

  void Observe(int layer, const KvPlan& plan, const float* q) override {
    const int T = Stored(layer);
    probs_.resize(static_cast<size_t>(plan.n) * shape_.n_head * T);
    Scores(layer, q, plan.n, probs_.data());
    AccumulateVotes(probs_, plan.n, shape_.n_head, shape_.n_head_kv, T, per_head_, &acc_[layer]);
  }

  std::vector<std::vector<int>> Choose(int layer, int budget, bool /*at_prompt_end*/) override {
    const int T = Stored(layer);
    const int recent = std::min(budget, static_cast<int>(std::lround(recent_ * budget)));
    std::vector<std::vector<int>> keep(acc_[layer].size());
    for (size_t s = 0; s < keep.size(); ++s) {
      keep[s] = TopK(acc_[layer][s], T - recent, budget - recent);
      for (int t = T - recent; t < T; ++t) keep[s].push_back(t);
    }
    return keep;
  }

  void OnRetain(int layer, const std::vector<std::vector<int>>& keep) override {
    for (size_t s = 0; s < acc_[layer].size(); ++s) {
      const std::vector<int>& k = keep.size() == 1 ? keep[0] : keep[s];
      std::vector<double>& a = acc_[layer][s];
      for (size_t i = 0; i < k.size(); ++i) a[i] = a[k[i]];
      a.resize(k.size());
    }
  }

  void OnClear() override {
    EvictingKvCache::OnClear();
    for (auto& a : acc_) a.clear();
  }

 private:
  double recent_;
  std::vector<std::vector<std::vector<double>>> acc_;  // [layer][set][stored] accumulated attention
  std::vector<float> probs_;                           // scratch [n][H_q][T]
};

StatusOr<std::unique_ptr<KvCache>> WrapH2o(const KvConfig& config, std::unique_ptr<KvCache> inner,
                                           const KvModelInfo& /*model*/) {
  double keep, recent;
  DK_ASSIGN_OR_RETURN(keep, EvictKeep(config));
  DK_ASSIGN_OR_RETURN(recent, config.options.Double("--h2o-recent", 0.5, 0.0, 1.0));
  return std::unique_ptr<KvCache>(new H2oCache(std::move(inner), keep, EvictGlobal(config), recent));
}

}  // namespace

const KvMethod& H2oMethod() {
  static const KvMethod m{"h2o", "H2O: heavy hitters (accumulated attention) plus recent tokens",
                          EvictFlags({{"--h2o-recent", "F", "h2o: share of the budget for the most recent tokens (0.5)"}}),
                          nullptr, &WrapH2o};
  return m;
}

}  // namespace dk
