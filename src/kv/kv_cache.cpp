#include "kv/kv_cache.h"

#include <algorithm>
#include <cmath>

#include "core/threads.h"
#include "ops/ops.h"

namespace dk {

StatusOr<KvPlan> KvCache::Plan(int n) const {
  if (n <= 0) return InvalidArgument("KV plan: batch of " + std::to_string(n) + " tokens");
  if (n_tokens_ + n > capacity_) {
    return ResourceExhausted("KV cache full: " + std::to_string(n_tokens_) + " of " + std::to_string(capacity_) +
                             " positions used, a batch of " + std::to_string(n) + " does not fit");
  }
  return KvPlan{n_tokens_, n};
}

Status KvCache::Apply(const KvPlan& plan) {
  if (plan.first != n_tokens_ || plan.n <= 0 || plan.first + plan.n > capacity_)
    return Internal("KV apply: stale plan (first " + std::to_string(plan.first) + ", n " + std::to_string(plan.n) +
                    ") for a cache holding " + std::to_string(n_tokens_));
  n_tokens_ += plan.n;
  OnApply(plan);
  return Status::Ok();
}

void KvCache::Clear() {
  n_tokens_ = 0;
  OnClear();
}

Status KvCache::EndPrompt(ThreadPool& /*pool*/) { return Status::Ok(); }

void KvCache::Scores(int layer, const float* q, int n_q, float* probs) const {
  const int T = Stored(layer), d = shape_.head_dim, Hq = shape_.n_head, group = Hq / shape_.n_head_kv,
            D = shape_.kv_dim();
  std::vector<float> keys(static_cast<size_t>(T) * D);
  if (T > 0) ReadKeys(layer, 0, T, keys.data());
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int i = 0; i < n_q; ++i) {
    const int visible = std::clamp(T - n_q + i + 1, 0, T);
    for (int h = 0; h < Hq; ++h) {
      const float* qh = q + (static_cast<size_t>(i) * Hq + h) * d;
      float* p = probs + (static_cast<size_t>(i) * Hq + h) * T;
      const int64_t col = static_cast<int64_t>(h / group) * d;
      for (int t = 0; t < visible; ++t) p[t] = scale * Dot(qh, keys.data() + static_cast<size_t>(t) * D + col, d);
      if (visible > 0) Softmax(p, visible);
      std::fill(p + visible, p + T, 0.0f);
    }
  }
}

Status KvCache::CheckRetain(int layer, const std::vector<std::vector<int>>& keep) const {
  const std::string where = name() + ": retain in layer " + std::to_string(layer);
  if (layer < 0 || layer >= shape_.n_layer) return InvalidArgument(where + ": no such layer");
  if (keep.size() != 1 && !(PerHeadRetain() && keep.size() == static_cast<size_t>(shape_.n_head_kv)))
    return InvalidArgument(where + ": expected 1 list" + (PerHeadRetain() ? " or one per KV head" : "") + ", found " +
                           std::to_string(keep.size()));
  const int T = Stored(layer);
  for (const std::vector<int>& k : keep) {
    if (k.size() != keep[0].size()) return InvalidArgument(where + ": KV heads must keep the same number of tokens");
    for (size_t i = 0; i < k.size(); ++i)
      if (k[i] < 0 || k[i] >= T || (i > 0 && k[i] <= k[i - 1]))
        return InvalidArgument(where + ": indices must be increasing within [0, " + std::to_string(T) + ")");
  }
  return Status::Ok();
}

}  // namespace dk
