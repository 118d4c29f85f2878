// The seam that decides each token's latent ranks (r_K, r_V) in the DynaKV cache.
//
// A policy sees one layer's batch at a time: the full-rank latents (to score energy) and the
// attention input x (what a learned router reads). It returns one TokenRanks per token. Policies:
//   uniform  every token the same (r_K, r_V)                       rank_policy_uniform.cpp
//   energy   per token, the smallest level keeping fraction tau     rank_policy_energy.cpp
//            of the token's own latent energy (training-free)
//   router   the profile's learned router: a per-layer MLP on x scoring the levels,   rank_policy_router.cpp
//            argmax per token (trained by dynakv train-router)
// With a byte budget (--kv-budget F) a policy also steers its choices so the cache holds
// F x the fp16 full-cache bytes; RecordCost says what a token costs (docs/kv_layout.md).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace dk {

struct KvConfig;
struct DynaKvProfile;

struct TokenRanks {
  int r_k = 0;  // in [1, D]
  int r_v = 0;  // in [1, D]
};

// Bytes one token costs in one layer of the cache, as BytesUsed counts them.
struct RecordCost {
  double elem_bytes = 2;          // one latent number (f16: 2, f32: 4, int8 1, int4 0.5, + grouped scales)
  double meta_bytes = 2;          // per-token metadata (the two ranks, per-latent scales and padding)
  double index_bytes_per_token = 0.0;  // offset index, amortized (4 bytes every B tokens)
  double Bytes(int64_t latent_elems, int64_t n_tokens) const {
    return static_cast<double>(latent_elems) * elem_bytes +
           static_cast<double>(n_tokens) * (meta_bytes + index_bytes_per_token);
  }
};

// What a policy learns when it is built.
struct RankPolicyContext {
  int n_layer = 0;
  int kv_dim = 0;            // D
  int n_embd = 0;            // width of x
  std::vector<int> levels;   // increasing ranks from the profile, last == D
  RecordCost cost;
  std::shared_ptr<const DynaKvProfile> profile;  // the cache's profile (the router reads its weights)
  std::string origin;        // where the profile came from, for messages
};

class RankPolicy {
 public:
  virtual ~RankPolicy() = default;
  virtual std::string name() const = 0;
  // Chooses ranks for a batch of n tokens of one layer. Called once per layer per batch, in
  // token order (stateful budget controllers rely on that).
  //   c_k, c_v: [n][D] full-rank latents (coefficients on the basis, by decreasing variance)
  //   x:        [n][n_embd] attention input after RMSNorm      out: [n]
  virtual void Choose(int layer, int n, const float* c_k, const float* c_v, const float* x, TokenRanks* out) = 0;
  // Forgets running state (budget controllers) when the cache is cleared.
  virtual void Reset() {}
  // True when a token's ranks depend on the tokens up to it alone, not on how they were batched
  // (KvCache::BatchInvariant).
  virtual bool BatchInvariant() const { return true; }
  // Expected latent numbers (r_K + r_V) per token per layer: sizes the cache's first reservation.
  virtual double ExpectedElemsPerToken() const = 0;
};

// Uniform: every token (r_k, r_v). Ranks in [1, D].
std::unique_ptr<RankPolicy> MakeUniformRankPolicy(int r_k, int r_v);
// Uniform ranks that fill `budget` (fraction of fp16 full-cache bytes) as closely as integers allow:
// r_k + r_v = round((budget * 4D - metadata) / elem_bytes), r_k = ceil(half), r_v = floor(half);
// with k_share != 0.5, r_k = round(k_share x the total) (--k-share).
TokenRanks UniformRanksForBudget(double budget, const RankPolicyContext& ctx, double k_share = 0.5);

// Energy: per token, the smallest level whose prefix keeps >= tau of the token's latent energy,
// separately for K and V. tau <= 0: the lowest level; tau >= 1: D.
std::unique_ptr<RankPolicy> MakeEnergyRankPolicy(const RankPolicyContext& ctx, double tau);
// Energy with a byte budget: tau bisected per layer and batch (see rank_policy_energy.cpp).
std::unique_ptr<RankPolicy> MakeEnergyBudgetRankPolicy(const RankPolicyContext& ctx, double budget);
// Rank of one token at tau: smallest level with prefix energy >= tau * total (c: [D]).
int EnergyRank(const float* c, int D, const std::vector<int>& levels, double tau);

// Router: the profile's router (ctx.profile->router must exist), argmax per token; budget > 0 steers
// it to that fraction with the profile's budget table (which must not be empty).
std::unique_ptr<RankPolicy> MakeRouterRankPolicy(const RankPolicyContext& ctx, double budget);

// Smallest cache fraction a budget can ask for: the lowest level for K and V plus metadata.
double MinBudgetFraction(const RankPolicyContext& ctx);

// Builds the policy config.rank_policy names and checks the flag combination
// (--rank / --tau / --kv-budget); every error names the flag.
StatusOr<std::unique_ptr<RankPolicy>> CreateRankPolicy(const KvConfig& config, const RankPolicyContext& ctx);

}  // namespace dk
