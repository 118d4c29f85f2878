// The KV cache interface: every cache backend (full, dynakv, later quantized/eviction wrappers)
// implements it. The caller (the forward pass) owns the cache; one model serves many caches.
//
// Protocol for one batch of n tokens (single sequence, positions = cell indices):
//   StatusOr<KvPlan> plan = cache.Plan(n);   // does it fit? kResourceExhausted if not: act on it
//   cache.Apply(*plan);                      // commit the cells
//   for each layer: cache.Write(layer, plan, k, v, x);  then  cache.Attend(layer, plan, q, out);
// Attention is the backend's job, so a compressed backend can attend on its own representation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"

namespace dk {

class ThreadPool;

struct KvShape {
  int n_layer = 0;
  int n_head = 0;      // query heads H_q
  int n_head_kv = 0;   // KV heads H_kv
  int head_dim = 0;    // d
  int n_embd = 0;      // width of the hidden state handed to Write (for routers)
  int kv_dim() const { return n_head_kv * head_dim; }  // D: one token's K (or V) in one layer
  int q_dim() const { return n_head * head_dim; }
};

// A batch of tokens accepted by Plan: cells [first, first + n).
struct KvPlan {
  int first = 0;
  int n = 0;
};

class KvCache {
 public:
  KvCache(const KvShape& shape, int capacity) : shape_(shape), capacity_(capacity) {}
  virtual ~KvCache() = default;
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  virtual std::string name() const = 0;
  const KvShape& shape() const { return shape_; }
  int capacity() const { return capacity_; }  // most tokens this cache was reserved for
  int n_tokens() const { return n_tokens_; }  // tokens committed so far

  // Does a batch of n tokens fit? Never mutates. kResourceExhausted (with counts) when full.
  StatusOr<KvPlan> Plan(int n) const;
  // Commits a plan returned by Plan on the current state.
  Status Apply(const KvPlan& plan);
  // Forgets every token (keeps the reservation).
  void Clear();

  // Stores the batch's keys (after RoPE) and values for one layer.
  //   k, v: [plan.n][kv_dim]   x: [plan.n][n_embd], the attention input (after RMSNorm)
  virtual void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) = 0;
  // Causal attention of the batch's queries: query i sees cells [0, plan.first + i].
  //   q: [plan.n][q_dim] (after RoPE)   out: [plan.n][q_dim]
  virtual void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) = 0;

  // Bytes stored for the committed tokens (payload plus per-token metadata).
  virtual size_t BytesUsed() const = 0;
  // Bytes allocated up front.
  virtual size_t BytesReserved() const = 0;

 protected:
  virtual void OnClear() {}

  KvShape shape_;
  int capacity_;
  int n_tokens_ = 0;
};

// Bytes per token of an uncompressed fp16 cache: the denominator of every "cache fraction".
inline size_t Fp16FullBytesPerToken(const KvShape& s) {
  return static_cast<size_t>(s.n_layer) * 2 * s.kv_dim() * 2;
}

}  // namespace dk
