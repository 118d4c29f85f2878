#include "kv/eviction.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

namespace dk {

EvictingKvCache::EvictingKvCache(std::unique_ptr<KvCache> inner, double keep, bool global)
    : KvCacheWrapper(std::move(inner)), keep_(keep) {
  per_head_ = !global && this->inner().PerHeadRetain();
  pos_.assign(shape_.n_layer, std::vector<std::vector<int>>(sets()));
}

std::string EvictingKvCache::name() const {
  std::ostringstream s;
  s << method() << "(keep=" << keep_ << (per_head_ ? ", per head" : ", per layer") << ") over " << inner().name();
  return s.str();
}

void EvictingKvCache::OnClear() {
  KvCacheWrapper::OnClear();
  for (auto& layer : pos_)
    for (auto& set : layer) set.clear();
  prompt_done_ = false;
  budget_ = 0;
}

void EvictingKvCache::Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) {
  KvCacheWrapper::Write(layer, plan, k, v, x);
  for (auto& set : pos_[layer])
    for (int i = 0; i < plan.n; ++i) set.push_back(plan.first + i);
}

void EvictingKvCache::Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) {
  KvCacheWrapper::Attend(layer, plan, q, out, pool);
  Observe(layer, plan, q);
  // After the prompt, StreamingLLM and H2O hold each layer at the budget (SnapKV returns nothing).
  if (prompt_done_ && Stored(layer) > budget_) {
    const std::vector<std::vector<int>> keep = Choose(layer, budget_, false);
    if (!keep.empty()) (void)Retain(layer, keep);  // lists built from Stored: valid by construction
  }
}

Status EvictingKvCache::Retain(int layer, const std::vector<std::vector<int>>& keep) {
  DK_RETURN_IF_ERROR(KvCacheWrapper::Retain(layer, keep));
  for (int set = 0; set < sets(); ++set) {
    const std::vector<int>& k = keep.size() == 1 ? keep[0] : keep[set];
    std::vector<int>& p = pos_[layer][set];
    for (size_t i = 0; i < k.size(); ++i) p[i] = p[k[i]];
    p.resize(k.size());
  }
  OnRetain(layer, keep);
  return Status::Ok();
}

Status EvictingKvCache::EndPrompt(ThreadPool& pool) {
  DK_RETURN_IF_ERROR(KvCacheWrapper::EndPrompt(pool));
  budget_ = std::max(1, static_cast<int>(std::lround(keep_ * n_tokens())));
  prompt_done_ = true;
  for (int l = 0; l < shape_.n_layer; ++l) {
    if (Stored(l) <= budget_) continue;
    DK_RETURN_IF_ERROR(Retain(l, Choose(l, budget_, true)).WithContext(method() + " at the end of the prompt"));
  }
  return Status::Ok();
}

void AccumulateVotes(const std::vector<float>& probs, int n_q, int n_head, int n_head_kv, int T, bool per_head,
                     std::vector<std::vector<double>>* votes) {
  const int sets = per_head ? n_head_kv : 1, group = n_head / n_head_kv;
  votes->resize(sets);
  for (auto& v : *votes) v.resize(T, 0.0);
  for (int i = 0; i < n_q; ++i)
    for (int h = 0; h < n_head; ++h) {
      std::vector<double>& v = (*votes)[per_head ? h / group : 0];
      const float* p = probs.data() + (static_cast<size_t>(i) * n_head + h) * T;
      for (int t = 0; t < T; ++t) v[t] += p[t];
    }
}

std::vector<int> TopK(const std::vector<double>& score, int n, int k) {
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  k = std::clamp(k, 0, n);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int a, int b) { return score[a] > score[b] || (score[a] == score[b] && a < b); });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

StatusOr<double> EvictKeep(const KvConfig& config) {
  if (!config.options.Has("--evict-keep"))
    return InvalidArgument("--evict-keep: " + config.evict + " needs the fraction of the prompt's tokens to keep");
  return config.options.Double("--evict-keep", 1.0, 1e-6, 1.0);
}

bool EvictGlobal(const KvConfig& config) { return config.options.Has("--evict-global"); }

std::vector<KvFlag> EvictFlags(std::vector<KvFlag> own) {
  std::vector<KvFlag> flags = {
      {"--evict-keep", "F", "eviction: fraction of the prompt's tokens each layer keeps, in (0, 1]"},
      {"--evict-global", "", "eviction: one token set per layer even where KV heads could keep their own"}};
  flags.insert(flags.end(), own.begin(), own.end());
  return flags;
}

}  // namespace dk
