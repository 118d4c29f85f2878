// Flag checking and the factory for rank policies; the policies live in rank_policy_*.cpp.
#include "kv/rank_policy.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "kv/profile.h"
#include "kv/registry.h"

namespace dk {

namespace {

std::string Num(double x) {
  std::ostringstream s;
  s << x;
  return s.str();
}

bool IsSet(int rank) { return rank != -1; }
bool IsSet(double value) { return value != -1.0; }

// Cache fraction of a token whose latents have r_k + r_v numbers (metadata included).
double FractionFor(int latent_elems, const RankPolicyContext& ctx) {
  return ctx.cost.Bytes(latent_elems, 1) / (4.0 * ctx.kv_dim);
}

Status CheckBudget(double budget, int min_rank, const RankPolicyContext& ctx) {
  if (!(budget > 0.0 && budget <= 1.0))
    return InvalidArgument("--kv-budget: expected a fraction of the fp16 full cache in (0, 1], found " + Num(budget));
  const double lowest = FractionFor(2 * min_rank, ctx);
  if (budget < lowest) {
    return InvalidArgument("--kv-budget: " + Num(budget) + " is below the smallest fraction this cache can hold (" +
                           Num(lowest) + ": rank " + std::to_string(min_rank) + " for K and V plus " +
                           Num(ctx.cost.meta_bytes) + " bytes of metadata per token per layer)");
  }
  return Status::Ok();
}

}  // namespace

TokenRanks UniformRanksForBudget(double budget, const RankPolicyContext& ctx, double k_share) {
  const int D = ctx.kv_dim;
  const double per_token = budget * 4.0 * D;  // bytes per token per layer allowed
  const double latent_bytes = per_token - ctx.cost.meta_bytes - ctx.cost.index_bytes_per_token;
  int total = static_cast<int>(std::lround(latent_bytes / ctx.cost.elem_bytes));
  total = std::clamp(total, 2, 2 * D);
  // At the default k_share = 0.5 keys get the odd number (lround rounds the half up): scores are
  // more sensitive to key error than outputs to value error.
  const int rk = std::clamp(static_cast<int>(std::lround(total * k_share)), 1, D);
  return TokenRanks{rk, std::clamp(total - rk, 1, D)};
}

double MinBudgetFraction(const RankPolicyContext& ctx) {
  return FractionFor(2 * (ctx.levels.empty() ? 1 : ctx.levels.front()), ctx);
}

StatusOr<std::unique_ptr<RankPolicy>> CreateRankPolicy(const KvConfig& kv, const RankPolicyContext& ctx) {
  const int D = ctx.kv_dim;
  const std::string name = kv.options.String("--rank-policy", "uniform");
  if (name != "uniform" && name != "energy" && name != "router")
    return InvalidArgument("--rank-policy: unknown rank policy '" + name + "' (known: uniform, energy, router)");
  struct {
    int rank;
    double tau, kv_budget, k_share;
  } config;
  DK_ASSIGN_OR_RETURN(config.k_share, kv.options.Double("--k-share", 0.5, 0.01, 0.99));
  if ((name != "uniform" || !kv.options.Has("--kv-budget")) && kv.options.Has("--k-share"))
    return InvalidArgument("--k-share: only the uniform rank policy with --kv-budget splits its bytes by a fixed share");
  DK_ASSIGN_OR_RETURN(config.rank, kv.options.Int("--rank", -1, 1, 1 << 20));
  DK_ASSIGN_OR_RETURN(config.tau, kv.options.Double("--tau", -1.0, 0.0, 1.0));
  DK_ASSIGN_OR_RETURN(config.kv_budget, kv.options.Double("--kv-budget", -1.0, 1e-9, 1.0));
  const bool has_rank = IsSet(config.rank), has_tau = IsSet(config.tau), has_budget = IsSet(config.kv_budget);
  if (name == "uniform" && has_tau)
    return InvalidArgument("--tau: only the energy rank policy takes --tau (--rank-policy is uniform; use --rank)");
  if (name == "energy" && has_rank)
    return InvalidArgument("--rank: only the uniform rank policy takes --rank (--rank-policy is energy; use --tau)");
  if (name == "router") {
    if (has_rank || has_tau)
      return InvalidArgument(std::string(has_rank ? "--rank" : "--tau") +
                             ": the router rank policy chooses ranks itself (use --kv-budget to set the cache fraction)");
    if (ctx.profile == nullptr || !ctx.profile->router)
      return InvalidArgument("--rank-policy: router needs a profile with a trained router, and " + ctx.origin +
                             " has none (run 'dynakv train-router')");
    if (!has_budget) return MakeRouterRankPolicy(ctx, -1.0);
    DK_RETURN_IF_ERROR(CheckBudget(config.kv_budget, ctx.levels.front(), ctx));
    if (ctx.profile->router->budget.size() < 2)
      return InvalidArgument("--kv-budget: the router in " + ctx.origin +
                             " has no budget table (retrain it with 'dynakv train-router')");
    return MakeRouterRankPolicy(ctx, config.kv_budget);
  }
  if (has_budget && has_rank)
    return InvalidArgument("--rank: give --rank or --kv-budget, not both (--kv-budget chooses the ranks)");
  if (has_budget && has_tau)
    return InvalidArgument("--tau: give --tau or --kv-budget, not both (--kv-budget chooses tau)");

  if (name == "uniform") {
    if (has_budget) {
      DK_RETURN_IF_ERROR(CheckBudget(config.kv_budget, 1, ctx));
      const TokenRanks r = UniformRanksForBudget(config.kv_budget, ctx, config.k_share);
      return MakeUniformRankPolicy(r.r_k, r.r_v);
    }
    if (!has_rank)
      return InvalidArgument("--rank: the uniform rank policy needs --rank R (1.." + std::to_string(D) +
                             ") or --kv-budget F");
    if (config.rank < 1 || config.rank > D)
      return InvalidArgument("--rank: expected a rank in [1, " + std::to_string(D) + "] (D = KV heads x head size), found " +
                             std::to_string(config.rank));
    return MakeUniformRankPolicy(config.rank, config.rank);
  }
  if (has_budget) {
    DK_RETURN_IF_ERROR(CheckBudget(config.kv_budget, ctx.levels.front(), ctx));
    return MakeEnergyBudgetRankPolicy(ctx, config.kv_budget);
  }
  if (!has_tau) return InvalidArgument("--tau: the energy rank policy needs --tau X in [0, 1] or --kv-budget F");
  if (!(config.tau >= 0.0 && config.tau <= 1.0))
    return InvalidArgument("--tau: expected a fraction of latent energy in [0, 1], found " + Num(config.tau));
  return MakeEnergyRankPolicy(ctx, config.tau);
}

}  // namespace dk
