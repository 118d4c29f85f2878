// DynaKV's learned router (method.md, decision 4): per layer, a one-hidden-layer MLP on the token's
// attention input (after RMSNorm) that scores the profile's rank levels, one head for the key rank
// and one for the value rank. It is trained by `dynakv train-router` (src/train/) and stored in the
// profile (docs/profile_format.md, version 2); at inference the `router` rank policy takes the
// argmax, optionally shifted by a budget offset (rank_policy_router.cpp).
#pragma once

#include <string>
#include <vector>

namespace dk {

struct RouterLayer {
  std::vector<float> w1;   // [H][E]
  std::vector<float> b1;   // [H]
  std::vector<float> w2k;  // [L][H]  key head
  std::vector<float> b2k;  // [L]
  std::vector<float> w2v;  // [L][H]  value head
  std::vector<float> b2v;  // [L]
};

// One row of the budget table: at logit offset beta (choice = argmax_j logits_j + beta * levels_j),
// the cache fraction each layer realised on the calibration sequences.
struct RouterBudgetRow {
  double beta = 0.0;
  std::vector<double> fraction;  // [n_layer]
};

struct Router {
  int n_embd = 0;      // E: width of the attention input
  int hidden = 0;      // H
  double target = 0.0; // the cache fraction it was trained for (0 < target <= 1)
  std::string info;    // the training configuration and its results, as JSON (provenance)
  std::vector<RouterLayer> layers;     // [n_layer]
  std::vector<RouterBudgetRow> budget; // increasing beta, increasing mean fraction; may be empty

  // Mean over layers of a budget row's fractions.
  static double MeanFraction(const RouterBudgetRow& row);
};

// Parameter count of one layer: H*E + H + 2*(L*H + L).
size_t RouterLayerParams(int E, int H, int L);

// Router logits for n rows of attention input x [n][E]:
//   h = silu(x W1^T + b1) [n][H]   lk = h W2k^T + b2k, lv = h W2v^T + b2v [n][L]
// pre, h: scratch [n][H] (pre keeps the pre-activation, which the training backward needs).
void RouterForward(const RouterLayer& w, int E, int H, int L, const float* x, int n, float* pre, float* h, float* lk,
                   float* lv);

// Index of the level with the largest logits_j + beta * levels_j (the lowest index on ties).
int RouterChoice(const float* logits, const int* levels, int L, double beta);

}  // namespace dk
