// Token sampling: greedy, or temperature with top-k then top-p (nucleus) filtering, seeded.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace dk {

struct SamplerOptions {
  float temperature = 0.8f;  // <= 0: greedy
  int top_k = 40;            // <= 0: no top-k filter
  float top_p = 0.95f;       // >= 1: no top-p filter
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& options);
  int32_t Sample(const float* logits, int n_vocab);

 private:
  SamplerOptions opt_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

}  // namespace dk
