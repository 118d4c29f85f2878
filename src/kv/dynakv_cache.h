// The DynaKV cache: every token keeps its key and value as latents on the layer's calibrated
// basis, truncated to its own ranks (r_K, r_V) chosen by a RankPolicy, packed back to back so the
// memory really shrinks. Attention runs on the latents (method.md, decision 2); no key or value is
// rebuilt on that path. Layout, index formulas and invariants: docs/kv_layout.md.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "kv/full_cache.h"  // KvDtype
#include "ops/tcode.h"
#include "kv/kv_cache.h"
#include "kv/profile.h"
#include "kv/rank_policy.h"
#include "kv/registry.h"

namespace dk {

// How a latent's numbers are stored (--kv-dtype): f16 or f32, or quantized symmetrically to int8
// / int4 with an fp16 scale per `group` numbers (--latent-group; 0 = one scale per latent, i.e. per
// token), the scales first, then the codes, padded to an even byte count (ops/quant.h); or
// transform-coded (tc: rank x precision, ops/tcode.h), where a token's rank r stands for the code
// of least distortion in at most the 2 r bytes an fp16 latent of rank r takes.
struct LatentFormat {
  enum Type { kF16, kF32, kQ8, kQ4, kTc } type = kF16;
  int group = 0;

  bool quantized() const { return type == kQ8 || type == kQ4; }
  bool tc() const { return type == kTc; }
  int bits() const { return type == kQ8 ? 8 : 4; }
  int Groups(int r) const { return group > 0 ? (r + group - 1) / group : 1; }
  int GroupSize(int r) const { return group > 0 ? group : r; }
  int64_t Bytes(int r) const;  // one latent of rank r (tc: the upper bound 2 r)
  std::string Name() const;     // "f16", "q8", "q4g32", ...
};
// "f16", "f32", "q8", "q4", "tc"; InvalidArgument naming --kv-dtype or --latent-group.
StatusOr<LatentFormat> ParseLatentFormat(const std::string& dtype, int group);

// tc: how one of K or V of a layer is coded: the ladder (the allocation each rank stands for) and
// the standard deviations that normalise the latent (z = c / sigma) before quantizing.
struct TcCodebook {
  std::vector<TcAllocation> ladder;     // [D] allocation of rank r at [r - 1]
  std::vector<float> sigma, inv_sigma;  // [D] sqrt(eigenvalue), floored at 1e-4 of the first
};
TcCodebook MakeTcCodebook(const BasisSet& b, int D);

class DynaKvCache final : public KvCache {
 public:
  static constexpr int kIndexEvery = 64;  // B: one offset index entry per B tokens
  static constexpr int kGemmMinBatch = 8; // batches this large attend through fp32 GEMMs

  // The profile must match the shape (the factory checks it against the model). It is shared
  // read-only: many caches (sequences, server slots) use one copy.
  DynaKvCache(const KvShape& shape, int capacity, LatentFormat format, std::shared_ptr<const DynaKvProfile> profile,
              std::unique_ptr<RankPolicy> policy);

  std::string name() const override;
  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override;
  void Attend(int layer, const KvPlan& plan, const float* q, float* out, ThreadPool& pool) override;
  int Stored(int layer) const override { return layers_[layer].n; }
  void ReadKeys(int layer, int first, int n, float* out) const override;
  void ReadValues(int layer, int first, int n, float* out) const override;
  // One token set per layer (the latents are shared by all KV heads).
  Status Retain(int layer, const std::vector<std::vector<int>>& keep) override;
  // Latents + metadata + offset index of the tokens stored (docs/kv_layout.md, "Bytes").
  size_t BytesUsed() const override;
  bool BatchInvariant() const override { return policy_->BatchInvariant(); }
  // Arena, metadata and index allocations.
  size_t BytesReserved() const override;

  // What one token costs in one layer (shared with the rank policy's budget arithmetic; for
  // quantized latents the per-latent scales and padding are averaged into the per-token bytes).
  static RecordCost CostFor(int kv_dim, LatentFormat format);
  static RecordCost CostFor(int kv_dim, KvDtype dtype) {
    return CostFor(kv_dim, LatentFormat{dtype == KvDtype::kF16 ? LatentFormat::kF16 : LatentFormat::kF32, 0});
  }
  const RecordCost& cost() const { return cost_; }
  const LatentFormat& format() const { return format_; }
  const RankPolicy& policy() const { return *policy_; }
  const DynaKvProfile& profile() const { return *profile_; }

  // Reference path for tests: stored token t's ranks, and its rank-r reconstruction
  // k^ = U[:, :r] c + mu (computed in double). dst: [D]
  TokenRanks Ranks(int layer, int t) const;
  void ReconstructK(int layer, int t, float* dst) const;
  void ReconstructV(int layer, int t, float* dst) const;
  // Rebuilds every visible k^, v^ and runs plain causal softmax attention in double. Same
  // contract as Attend; slow, for tests only.
  void AttendReference(int layer, const KvPlan& plan, const float* q, float* out) const;

 private:
  // One layer's packed records; offsets and sizes in bytes.
  struct LayerStore {
    std::vector<int32_t> bytes_k, bytes_v;  // [D + 1] bytes of a K / V latent of rank r
    std::vector<int32_t> width_k, width_v;  // [D + 1] numbers it decodes to (r; tc: the code's coords)
    std::vector<uint8_t> arena;    // [arena_bytes + slack] records [c_K][c_V], token after token
    int64_t arena_bytes = 0;       // allocated bytes (slack not counted)
    int64_t used = 0;              // bytes written = sum over tokens of Bytes(r_K) + Bytes(r_V)
    std::vector<uint8_t> meta;     // [capacity][2][meta_width_] (r_K - 1, r_V - 1), little-endian
    std::vector<uint32_t> index;   // [ceil(capacity / B)] byte offset of token b * B's record
    int n = 0;                     // tokens written
  };
  // Per-thread scratch and partial softmax state of the latent attention path (Dp = D rounded up to 8).
  struct Partial {
    std::vector<float> m, l;        // [Hq] running max and sum of exp
    std::vector<float> acc;         // [Hq][Dp] sum_t p_t c_V,t (zero-padded)
    std::vector<float> scores;      // [Hq][B] scores, then softmax weights
    std::vector<int> rk, rv;        // [B] ranks of a block
    std::vector<int64_t> off;       // [B] record offsets in the arena
    std::vector<float> z;           // [B][ldz] a block of decoded latents
    std::vector<int> width;         // [B] their coordinates
    int rmax_v = 0;                 // acc columns touched so far
  };

  void OnClear() override;
  int D() const { return shape_.kv_dim(); }
  // Ranks and record offsets of tokens [t0, t1) of a layer; t0 must be a multiple of B.
  void DecodeBlock(const LayerStore& s, int t0, int t1, int* rk, int* rv, int64_t* off) const;
  // dst: [width] the stored numbers (tc: normalised, z = c / sigma)
  void ReadLatent(int layer, bool value, int64_t off, int r, float* dst) const;
  void Reconstruct(int layer, int t, bool value, double* dst) const;            // dst: [D]
  void Append(int layer, bool value, const float* c, int r);
  void AppendRecord(int layer, TokenRanks r, const float* ck, const float* cv);
  void Grow(LayerStore& s, int64_t need_bytes);

  // Projected queries: qt [n][Hq][D] = U_K,h^T q_h / sqrt(d); mterm [n][Hq] = q_h . mu_K,h / sqrt(d).
  void ProjectQueries(int layer, int n, const float* q);
  // out_h = U_V,h a_h + mu_V,h for a [n][Hq][D] (first r_max columns non-zero).
  void ProjectOutputs(int layer, int n, int r_max, float* out);
  void AttendLatent(int layer, const KvPlan& plan, float* out, ThreadPool& pool);
  // The block's K (value = false) or V latents as floats in p.z / p.width; returns the widest.
  int DecodeLatentBlock(int layer, bool value, int nb, Partial& p) const;
  void AttendBlock(int layer, const float* qp, const float* mterm, int nb, Partial& p) const;
  void OnlineSoftmax(int nb, Partial& p) const;  // the per-head softmax update of a block's scores
  void AttendRange(int layer, const float* qp, const float* mterm, int t0, int t1, Partial& p) const;
  void AttendGemm(int layer, const KvPlan& plan, float* out, ThreadPool& pool);

  LatentFormat format_;
  std::shared_ptr<const DynaKvProfile> profile_;
  std::unique_ptr<RankPolicy> policy_;
  int meta_width_;  // bytes per rank: 1 when D <= 256 (rank - 1 fits a byte), else 2
  RecordCost cost_;
  std::vector<LayerStore> layers_;  // [n_layer]
  struct TcLayer {
    TcCodebook k, v;
  };
  std::vector<TcLayer> tc_;         // [n_layer] (tc only)

  // Scratch (Write and Attend run on the caller's thread; workers only touch their Partial).
  std::vector<float> xc_, ck_, cv_;   // [n][D] centred rows, latents of K and V
  std::vector<float> zt_;             // [D] one normalised latent (tc encode)
  std::vector<TokenRanks> ranks_;     // [n]
  std::vector<float> qt_, mterm_;     // [n][Hq][D], [n][Hq]
  std::vector<float> qpad_;           // [Hq][Dp] one query's projected heads, zero-padded
  std::vector<float> att_;            // [n][Hq][D] attention in latent space
  std::vector<float> kd_, vd_, s_;    // GEMM path: [T][r] dense latents, [n][T] scores
  std::vector<Partial> partials_;     // [threads]
};

// Loads a profile once per process and file: later calls share the same copy while any cache holds
// it (a file changed on disk is loaded again).
StatusOr<std::shared_ptr<const DynaKvProfile>> LoadSharedProfile(const std::string& path);
// Registered as "dynakv" (DynaKvMethod): loads --profile, checks it against the model, builds the
// rank policy from the flags. This one takes a profile already in memory; `origin` names it in
// messages.
StatusOr<std::unique_ptr<DynaKvCache>> CreateDynaKvCacheFromProfile(const KvConfig& config, const KvModelInfo& model,
                                                                    int capacity,
                                                                    std::shared_ptr<const DynaKvProfile> profile,
                                                                    const std::string& origin);

}  // namespace dk
