#include "kv/kv_cache.h"

namespace dk {

StatusOr<KvPlan> KvCache::Plan(int n) const {
  if (n <= 0) return InvalidArgument("KV plan: batch of " + std::to_string(n) + " tokens");
  if (n_tokens_ + n > capacity_) {
    return ResourceExhausted("KV cache full: " + std::to_string(n_tokens_) + " of " + std::to_string(capacity_) +
                             " cells used, a batch of " + std::to_string(n) + " does not fit");
  }
  return KvPlan{n_tokens_, n};
}

Status KvCache::Apply(const KvPlan& plan) {
  if (plan.first != n_tokens_ || plan.n <= 0 || plan.first + plan.n > capacity_)
    return Internal("KV apply: stale plan (first " + std::to_string(plan.first) + ", n " + std::to_string(plan.n) +
                    ") for a cache holding " + std::to_string(n_tokens_));
  n_tokens_ += plan.n;
  return Status::Ok();
}

void KvCache::Clear() {
  n_tokens_ = 0;
  OnClear();
}

}  // namespace dk
