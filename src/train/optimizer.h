// AdamW with a linear warm-up and a cosine decay, and global-norm gradient clipping.
#pragma once

#include <cstdint>
#include <vector>

#include "train/params.h"

namespace dk {

struct AdamWOptions {
  double lr = 3e-3;            // peak learning rate
  double min_lr_ratio = 0.1;   // the cosine decays to lr * min_lr_ratio at the last step
  int warmup = 20;             // steps of linear warm-up from lr / warmup
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // decoupled; only tensors marked decay
  double clip = 1.0;           // global gradient-norm clip; <= 0: off
};

// Learning rate at `step` (0-based) of a run of `total` steps.
double LearningRate(const AdamWOptions& o, int64_t step, int64_t total);

class AdamW {
 public:
  AdamW(const AdamWOptions& options, size_t n_params) : o_(options), m_(n_params, 0.0f), v_(n_params, 0.0f) {}
  // Clips params.grads() to the global norm, then updates params.values(). `step` is 0-based:
  // bias corrections use step + 1. Returns the gradient norm before clipping.
  double Step(ParamStore<float>& params, int64_t step, int64_t total);

  std::vector<float>& m() { return m_; }  // first moments (checkpoints)
  std::vector<float>& v() { return v_; }  // second moments

 private:
  AdamWOptions o_;
  std::vector<float> m_, v_;
};

}  // namespace dk
