// DynaKV's relaxed cache for training (method.md, decision 5): between RoPE and attention, each
// layer's keys and values are replaced by their masked low-rank reconstructions
//   khat = U_K (m_K * U_K^T (k - mu_K)) + mu_K        (and the same for v)
// where the soft keep-mask m_i = sum_j p_j [i < r_j] comes from the router's choice p over the
// profile's rank levels: a Gumbel-softmax sample, straight-through (hard one-hot in the forward
// pass, the soft sample's gradient in the backward pass). The router is the inference router
// (kv/router.h) with trainable parameters. Optionally the bases are trained too: U = U_PCA Q(A),
// Q the Cayley map of a skew-symmetric A (train/cayley.h), starting from A = 0, and the means.
#pragma once

#include <cstdint>
#include <vector>

#include "core/hash.h"
#include "kv/dynakv_cache.h"
#include "kv/profile.h"
#include "kv/rank_policy.h"
#include "model/train_graph.h"
#include "train/params.h"

namespace dk {

// Counter-based random numbers: the value depends only on (key, index), never on the order of
// evaluation, so a resumed run draws exactly what an uninterrupted one would.
// (Mix64, SplitMix64's output of one key, is core/hash.h's.)
double Uniform01(uint64_t key, uint64_t index);  // in (0, 1)
double GumbelNoise(uint64_t key, uint64_t index); // -log(-log(u))

enum class RouterMode {
  kGumbelHard,  // training: noisy one-hot forward, soft backward (straight-through)
  kGumbelSoft,  // the relaxed sample itself in both passes (gradient checks)
  kArgmax,      // no noise, the argmax, as at inference (evaluation, budget calibration); no backward
};

struct RelaxedCacheOptions {
  int hidden = 64;           // router width H
  double target = 0.25;      // target cache fraction (the router's output biases start near it)
  bool train_bases = false;  // also train the bases (Cayley) and the means
  double bases_lr_scale = 0.1;  // their learning rate relative to the router's
  // Rank x precision (--kv-dtype tc): level j stands for the transform code of rank levels[j]
  // (kv/dynakv_cache.h, ops/tcode.h), so khat = U c^_j + mu with c^_j the decoded code. In the
  // forward pass c^_j = m_j * c + e_j (m_j: the coordinates the code covers, e_j its error); the
  // router's gradient is exact (dL/dp_j = <dL/dc^, c^_j>), the input's passes the covered
  // coordinates straight through (the error e_j is held constant, as is its dependence on trained bases).
  bool tc = false;
};

template <typename T>
class RelaxedDynaKvCache final : public KvRelaxation<T> {
 public:
  // Registers this cache's parameters in `params` (per layer the router's w1, b1, w2k, b2k, w2v,
  // b2v; with train_bases also the K and V rotation generators and means) and keeps the profile's
  // bases. `cost` is what one stored token costs (the cache fraction is counted in those bytes).
  RelaxedDynaKvCache(const DynaKvProfile& profile, int n_embd, const RecordCost& cost,
                     const RelaxedCacheOptions& options, ParamStore<T>& params);

  // Router weights N(0, 1/fan_in) (output heads scaled down), hidden biases 0, output biases a
  // prior peaked at the level whose uniform rank meets the target; rotations 0; means from the profile.
  void InitParams(uint64_t seed);
  // Loads the router (and bases) of a profile into the parameters (continuing from a trained router).
  void LoadParams(const DynaKvProfile& profile);
  // Mode, Gumbel temperature and noise key of the next Forward. Recomputes the bases from the
  // parameters when they are trained: call it after every optimizer step.
  void Prepare(RouterMode mode, double tau, uint64_t noise_key);

  void Forward(int layer, int n, const T* k, const T* v, const T* x, T* khat, T* vhat) override;
  void Backward(int layer, int n, const T* dkhat, const T* dvhat, T* dk, T* dv, T* dx) override;

  // After Forward: mean over rows and layers of the cache fraction, expected under the router's
  // softmax (what the penalty differentiates) and realised by the forward's choices.
  double expected_fraction() const;
  double realised_fraction() const;
  double realised_fraction(int layer) const;
  // Before Backward: dLoss / d(expected fraction).
  void set_fraction_grad(double g) { fraction_grad_ = g; }
  // Router logits of the last Forward: [n][L] per layer (budget calibration).
  const std::vector<T>& logits_k(int layer) const { return ls_[layer].lk; }
  const std::vector<T>& logits_v(int layer) const { return ls_[layer].lv; }
  const std::vector<int>& levels() const { return levels_; }

  // Adds beta * levels_j to every layer's output biases (K and V): the argmax then chooses what the
  // unshifted router chooses with the logit offset beta (kv/rank_policy_router.cpp).
  void ShiftOutputBiases(double beta);
  // Writes the router (and trained bases and means) into `profile` (whose bases this cache was
  // built from).
  void Export(DynaKvProfile* profile) const;

 private:
  struct LayerParams {
    size_t w1, b1, w2k, b2k, w2v, b2v;   // tensor indices in params_
    size_t ak = 0, av = 0, muk = 0, muv = 0;  // train_bases only
  };
  struct LayerState {
    std::vector<T> u0k, u0v;        // [D][D] the profile's bases (PCA)
    std::vector<T> uk, uv;          // [D][D] bases in use (= U0 Q(W) when trained)
    std::vector<T> qk, qv, mik, miv;  // [D][D] Cayley rotations and (I + A)^{-1} (train_bases)
    std::vector<T> muk, muv;        // [D] means in use
    // Saved by Forward for Backward, n rows:
    std::vector<T> x;               // [n][E] router input
    std::vector<T> k, v;            // [n][D] inputs of the projection
    std::vector<T> pre, h;          // [n][H]
    std::vector<T> lk, lv;          // [n][L] router logits
    std::vector<T> yk, yv;          // [n][L] soft samples
    std::vector<T> pk, pv;          // [n][L] choices used (one-hot or soft)
    std::vector<T> mk, mv;          // [n][D] keep-masks
    std::vector<T> ck, cv;          // [n][D] latents
    double expected = 0.0, realised = 0.0;  // mean fraction of the rows
  };

  void ChooseLevels(int layer, int n, int which, const T* logits, T* y, T* p);
  // tc: m[t][i] = sum_j p[t][j] [i < cov[j]]; dp[t][j] = sum_{i < cov[j]} dm[t][i].
  void CoverageMask(const T* p, const std::vector<int>& cov, T* m, int n) const;
  void CoverageMaskBackward(const T* dm, const std::vector<int>& cov, T* dp, int n);
  // tc: e = c^ - m * c for the code of rank `rank` of latent c [D] (0 past the code's coordinates).
  void CodeError(const TcCodebook& cb, int rank, const T* c, T* e);
  // tc forward: xhat += (sum_j p_j e_j) U^T;  backward: dp[t][j] += <dxhat U, e_j> where y[t][j] > 0.
  void AddCodeError(int layer, int which, int n, const T* p, const T* c, T* xhat);
  void CodeErrorBackward(int layer, int which, int n, const T* y, const T* c, const T* dxhat, T* dp);
  void UpdateBases();

  const int n_layer_, D_, E_, H_, L_;
  std::vector<int> levels_;
  std::vector<T> level_cost_;  // [L] levels as numbers (SoftmaxExpectation's costs)
  RecordCost cost_;
  RelaxedCacheOptions opt_;
  ParamStore<T>& params_;
  std::vector<LayerParams> lp_;
  std::vector<LayerState> ls_;
  RouterMode mode_ = RouterMode::kGumbelHard;
  double tau_ = 1.0;
  uint64_t noise_key_ = 0;
  double fraction_grad_ = 0.0;
  std::vector<T> dmask_, dp_, dl_, de_, tmp_, dh_, dpre_, du_;  // backward scratch
  std::vector<TcCodebook> tck_, tcv_;            // [n_layer] (tc only)
  std::vector<std::vector<int>> covk_, covv_;    // [n_layer][L] coordinates each level's code covers
  std::vector<T> err_, emix_, g_;                // tc scratch: [D], [n][D], [n][D]
  std::vector<float> zq_;                        // [2 D] normalised latent and its decoded code
  std::vector<uint8_t> rec_;                     // one record
};

extern template class RelaxedDynaKvCache<float>;
extern template class RelaxedDynaKvCache<double>;

}  // namespace dk
