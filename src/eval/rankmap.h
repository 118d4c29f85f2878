// Rank maps: which tokens a DynaKV cache gives more room. Runs a text through the model with a
// DynaKV cache and records every token's key and value rank in every layer, then renders a
// self-contained HTML page (no network: inline CSS, SVG and a little JavaScript) with the text
// coloured by rank (K, V or both; one layer or the mean) and a histogram of ranks per layer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "kv/dynakv_cache.h"
#include "model/llama.h"

namespace dk {

class ThreadPool;

struct RankMap {
  std::string title;                // shown at the top (model, profile, policy)
  std::vector<std::string> pieces;  // [T] each token's text
  std::vector<int> levels;          // the profile's rank levels
  int D = 0;                        // full rank
  int n_layer = 0;
  std::vector<int> rk, rv;          // [n_layer][T] ranks
  double kv_fraction = 0.0;         // the cache's bytes / fp16 full-cache bytes

  double MeanRank(int t) const;     // over layers, K and V
};

// Runs `tokens` (BOS first, as the cache sees them) through the model with `cache` (cleared first),
// in batches of n_batch.
StatusOr<RankMap> CollectRankMap(const Model& model, const std::vector<int32_t>& tokens, DynaKvCache& cache,
                                 int n_batch, ThreadPool& pool);

// The page; every piece of text is escaped.
std::string RankMapHtml(const RankMap& map);

// A plain-text summary: mean rank per layer (K, V), and the tokens (seen at least min_count times)
// with the highest and lowest mean ranks.
std::string RankMapSummary(const RankMap& map, int min_count, int top);

}  // namespace dk
