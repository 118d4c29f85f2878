// The KV cache interface: every cache backend (full, quantized, DynaKV) and every eviction wrapper
// (SnapKV, StreamingLLM, H2O) implements it. The caller (the forward pass) owns the cache; one
// model serves many caches. Layouts and invariants: docs/kv_layout.md.
//
// Positions and storage are separate. A cache has seen n_tokens() tokens, at logical positions
// 0 .. n_tokens()-1 (what RoPE used); each layer stores some of them, in position order: all of them
// for storage backends, fewer once an eviction wrapper has retained a subset (then each layer, or
// each KV head of a layer, may keep a different subset, but a layer's heads always keep the same
// count). Kept tokens keep their keys as written, so their original positions stay in their RoPE.
//
// Protocol for one batch of n tokens:
//   StatusOr<KvPlan> plan = cache.Plan(n);   // does it fit? kResourceExhausted if not: act on it
//   cache.Apply(*plan);                      // commit positions [plan.first, plan.first + n)
//   for each layer: cache.Write(layer, plan, k, v, x);  then  cache.Attend(layer, plan, q, out);
// and, when a prompt has been read, cache.EndPrompt(pool) (eviction wrappers compress then).
// Attention is the backend's job, so a compressed backend attends on its own representation.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

// A batch accepted by Plan: logical positions [first, first + n).
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
  int capacity() const { return capacity_; }  // most tokens (positions) this cache was reserved for
  int n_tokens() const { return n_tokens_; }  // tokens seen so far (the next position)

  // Does a batch of n tokens fit? Never mutates. kResourceExhausted (with counts) when full.
  StatusOr<KvPlan> Plan(int n) const;
  // Commits a plan returned by Plan on the current state.
  Status Apply(const KvPlan& plan);
  // Forgets every token (keeps the reservation).
  void Clear();

  // Appends the batch's keys (after RoPE) and values to one layer.
  //   k, v: [plan.n][kv_dim]   x: [plan.n][n_embd], the attention input (after RMSNorm)
  virtual void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) = 0;
  // Causal attention of the batch's queries over the layer's stored tokens: query i sees every
  // token stored before this batch and the batch's own tokens 0..i.
  //   q: [plan.n][q_dim] (after RoPE)   out: [plan.n][q_dim]
  virtual void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) = 0;

  // ---- What eviction needs (kv/eviction.h) -----------------------------------------------------
  // Tokens a layer stores (every KV head of it stores this many).
  virtual int Stored(int layer) const = 0;
  // Keys of stored tokens [first, first + n) as attention sees them (dequantized, reconstructed):
  // out [n][kv_dim], KV head g in columns [g*d, g*d + d) (its own s-th token when heads keep
  // different tokens).
  virtual void ReadKeys(int layer, int first, int n, float* out) const = 0;
  // The same for values (reference attention in the conformance tests).
  virtual void ReadValues(int layer, int first, int n, float* out) const = 0;
  // Softmax attention weights of n_q queries over the layer's stored tokens, the queries being those
  // of the last n_q tokens written (query i sees stored tokens [0, Stored - n_q + i]; zeros after).
  //   q: [n_q][q_dim] (after RoPE)   probs: [n_q][H_q][Stored(layer)]
  // The default computes them from ReadKeys; a backend may do it on its own representation.
  virtual void Scores(int layer, const float* q, int n_q, float* probs) const;
  // Keeps only the listed stored tokens of a layer and frees the rest. keep.size() == 1: indices
  // (strictly increasing, into [0, Stored)) kept by every KV head; keep.size() == H_kv (only when
  // PerHeadRetain()): one list per KV head, all of the same length.
  virtual Status Retain(int layer, const std::vector<std::vector<int>>& keep) = 0;
  virtual bool PerHeadRetain() const { return false; }
  // The prompt has been read (the caller decides what a prompt is). Eviction wrappers compress now.
  virtual Status EndPrompt(ThreadPool& pool);
  // True when what the cache stores for a sequence of tokens depends on the tokens alone, not on
  // how they were cut into batches or where EndPrompt was called: then a cache holding a prefix,
  // extended by the rest, holds exactly what a fresh cache given the whole sequence holds (the
  // server reuses a slot's prefix only then). False for eviction (it compresses at the end of a
  // prompt) and for the energy policy with a byte budget (its tau is bisected over each batch).
  // The conformance suite checks every method that says true.
  virtual bool BatchInvariant() const { return true; }

  // Bytes stored for the tokens each layer holds (payload plus per-token metadata).
  virtual size_t BytesUsed() const = 0;
  // Bytes allocated up front.
  virtual size_t BytesReserved() const = 0;

 protected:
  virtual void OnApply(const KvPlan& /*plan*/) {}
  virtual void OnClear() {}
  // Checks a Retain request against Stored(layer) and PerHeadRetain(); names what is wrong.
  Status CheckRetain(int layer, const std::vector<std::vector<int>>& keep) const;

  KvShape shape_;
  int capacity_;
  int n_tokens_ = 0;
};

// A cache that forwards everything to an inner cache (timers, calibration taps, eviction): derive
// and override what changes. Plan/Apply/Clear keep both caches' positions in step.
class KvCacheWrapper : public KvCache {
 public:
  explicit KvCacheWrapper(std::unique_ptr<KvCache> inner)
      : KvCache(inner->shape(), inner->capacity()), inner_(std::move(inner)) {}
  std::string name() const override { return inner_->name(); }
  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override {
    inner_->Write(layer, plan, k, v, x);
  }
  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override {
    inner_->Attend(layer, plan, q, out, pool);
  }
  int Stored(int layer) const override { return inner_->Stored(layer); }
  void ReadKeys(int layer, int first, int n, float* out) const override { inner_->ReadKeys(layer, first, n, out); }
  void ReadValues(int layer, int first, int n, float* out) const override {
    inner_->ReadValues(layer, first, n, out);
  }
  void Scores(int layer, const float* q, int n_q, float* probs) const override {
    inner_->Scores(layer, q, n_q, probs);
  }
  Status Retain(int layer, const std::vector<std::vector<int>>& keep) override { return inner_->Retain(layer, keep); }
  bool PerHeadRetain() const override { return inner_->PerHeadRetain(); }
  Status EndPrompt(ThreadPool& pool) override { return inner_->EndPrompt(pool); }
  bool BatchInvariant() const override { return inner_->BatchInvariant(); }
  size_t BytesUsed() const override { return inner_->BytesUsed(); }
  size_t BytesReserved() const override { return inner_->BytesReserved(); }

  KvCache& inner() { return *inner_; }
  const KvCache& inner() const { return *inner_; }

 protected:
  void OnApply(const KvPlan& plan) override { (void)inner_->Apply(plan); }
  void OnClear() override { inner_->Clear(); }

 private:
  std::unique_ptr<KvCache> inner_;
};

// Bytes per token of an uncompressed fp16 cache: the denominator of every "cache fraction".
inline size_t Fp16FullBytesPerToken(const KvShape& s) {
  return static_cast<size_t>(s.n_layer) * 2 * s.kv_dim() * 2;
}

}  // namespace dk
