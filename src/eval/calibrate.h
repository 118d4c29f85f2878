// DynaKV calibration: runs calibration text through the model with a full fp32 KV cache and fits,
// per layer, a joint PCA basis over all KV heads for the post-RoPE keys and, separately, the values
// (method.md, decisions 1-3). The chunking is the perplexity tool's: chunks of n_ctx tokens, each
// chunk's first token replaced by BOS, each chunk from an empty cache. Every token is counted,
// the BOS included, because the cache stores every token.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/status.h"
#include "kv/kv_cache.h"
#include "kv/profile.h"
#include "model/llama.h"

namespace dk {

class ThreadPool;

struct CalibrateOptions {
  int n_ctx = 512;
  int n_batch = 512;    // tokens per forward pass (capped at n_ctx)
  int max_chunks = -1;  // -1: every whole chunk of the text
  std::vector<int> levels;  // rank levels; empty = DefaultLevels(D)
};

using CalibrateProgress = std::function<void(int chunk, int n_chunks)>;

// Per-layer first and second moments of the rows a cache is handed, accumulated in double:
// count, sum (shifted) and sum of outer products (shifted). Public so tests can reuse it.
class MomentAccumulator {
 public:
  explicit MomentAccumulator(int D);
  // rows: [n][D]
  void Add(const float* rows, int n);
  int64_t count() const { return count_; }
  // mean: [D]; cov: [D][D] full symmetric, population covariance (divided by count).
  void Finish(std::vector<double>* mean, std::vector<double>* cov) const;

 private:
  int D_;
  int64_t count_ = 0;
  bool has_shift_ = false;
  std::vector<double> shift_;  // [D] mean of the first batch: keeps E[xx^T] - mu mu^T well conditioned
  std::vector<double> sum_;    // [D] sum of (x - shift)
  std::vector<double> outer_;  // [D][D] upper triangle of sum of (x - shift)(x - shift)^T
  std::vector<double> batch_;  // [n][D] scratch: the batch in double, shifted
};

// Eigendecomposition of a symmetric covariance [D][D] into a BasisSet: eigenvalues decreasing (tiny
// negatives from rounding clamped to 0), basis columns = eigenvectors in that order, each with its
// largest-magnitude component made positive so that runs are reproducible.
StatusOr<BasisSet> PcaBasis(const std::vector<double>& mean, std::vector<double> cov, int D);

// Needs at least one chunk of n_ctx tokens.
StatusOr<DynaKvProfile> Calibrate(const Model& model, const std::vector<int32_t>& tokens,
                                  const CalibrateOptions& options, ThreadPool& pool,
                                  const CalibrateProgress& progress = nullptr);

}  // namespace dk
