// Uniform rank policy: every token keeps the same (r_K, r_V): the PCA / MatryoshkaKV baseline.
#include "kv/rank_policy.h"

namespace dk {

namespace {

class UniformRankPolicy final : public RankPolicy {
 public:
  UniformRankPolicy(int r_k, int r_v) : ranks_{r_k, r_v} {}
  std::string name() const override {
    return "uniform(r_K=" + std::to_string(ranks_.r_k) + ", r_V=" + std::to_string(ranks_.r_v) + ")";
  }
  void Choose(int /*layer*/, int n, const float* /*c_k*/, const float* /*c_v*/, const float* /*x*/,
              TokenRanks* out) override {
    for (int i = 0; i < n; ++i) out[i] = ranks_;
  }
  double ExpectedElemsPerToken() const override { return ranks_.r_k + ranks_.r_v; }

 private:
  TokenRanks ranks_;
};

}  // namespace

std::unique_ptr<RankPolicy> MakeUniformRankPolicy(int r_k, int r_v) {
  return std::make_unique<UniformRankPolicy>(r_k, r_v);
}

}  // namespace dk
