// Sequence-level eviction as wrappers that compose with any storage backend (--evict over --kv):
// SnapKV (evict_snapkv.cpp), StreamingLLM (evict_streaming.cpp), H2O (evict_h2o.cpp). The wrapper
// decides which stored tokens to keep; the storage backend keeps them (KvCache::Retain) and frees
// the rest. Scoring is apart from keeping: a method implements Observe (what it learns from each
// batch's queries) and Choose (what to keep, given a budget).
//
// Budget: when the prompt ends (EndPrompt), each layer keeps B = max(1, round(keep * n)) of the n
// tokens seen (--evict-keep). SnapKV then lets the cache grow with the answer; StreamingLLM and H2O
// keep every layer at B tokens, evicting one token per decoded token.
//
// Heads: when the storage can keep a different token set per KV head (the full and quantized
// caches: PerHeadRetain), scores are per KV head (summed over its query heads) and so are the kept
// sets; over DynaKV, whose latents are shared by all heads, one global set per layer is kept, with
// votes summed over all heads (--evict-global forces that everywhere).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kv/kv_cache.h"
#include "kv/registry.h"

namespace dk {

class EvictingKvCache : public KvCacheWrapper {
 public:
  EvictingKvCache(std::unique_ptr<KvCache> inner, double keep, bool global);

  std::string name() const override;
  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override;
  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override;
  Status Retain(int layer, const std::vector<std::vector<int>>& keep) override;
  Status EndPrompt(ThreadPool& pool) override;
  bool BatchInvariant() const override { return false; }  // what is kept depends on where prompts end

  // Original positions of the tokens a layer keeps, per kept set (one, or one per KV head).
  const std::vector<int>& Positions(int layer, int set) const { return pos_[layer][set]; }
  int sets() const { return per_head_ ? shape_.n_head_kv : 1; }
  int budget() const { return budget_; }  // tokens per layer after the prompt (0 before)

 protected:
  virtual std::string method() const = 0;
  // Sees each batch's queries after it was attended (the batch is stored by then).
  virtual void Observe(int layer, const KvPlan& plan, const float* q) {}
  // What to keep of the layer's `Stored` tokens, `budget` of them per set (the caller only asks when
  // Stored > budget). at_prompt_end: EndPrompt's compression; otherwise one decode step over budget.
  virtual std::vector<std::vector<int>> Choose(int layer, int budget, bool at_prompt_end) = 0;
  // Keeps the method's per-token state in step with a retention (index lists as in Retain).
  virtual void OnRetain(int layer, const std::vector<std::vector<int>>& keep) {}
  void OnClear() override;

  bool per_head_;  // one kept set per KV head (else one per layer)
  double keep_;

 private:
  bool prompt_done_ = false;
  int budget_ = 0;
  std::vector<std::vector<std::vector<int>>> pos_;  // [layer][set][stored] original positions
};

// ---- Shared pieces of the methods ------------------------------------------------------------------

// Attention mass per kept set: probs [n_q][H_q][T] (KvCache::Scores) summed over the queries and over
// the query heads of each KV head (per_head) or of all heads, added into votes [sets][T].
void AccumulateVotes(const std::vector<float>& probs, int n_q, int n_head, int n_head_kv, int T, bool per_head,
                     std::vector<std::vector<double>>* votes);
// Indices of the k largest scores among [0, n) (ties: the earlier token), sorted increasing.
std::vector<int> TopK(const std::vector<double>& score, int n, int k);
// --evict-keep (required, in (0, 1]) and --evict-global, which every eviction method declares.
StatusOr<double> EvictKeep(const KvConfig& config);
bool EvictGlobal(const KvConfig& config);
std::vector<KvFlag> EvictFlags(std::vector<KvFlag> own);

const KvMethod& SnapKvMethod();
const KvMethod& StreamingLlmMethod();
const KvMethod& H2oMethod();

}  // namespace dk
