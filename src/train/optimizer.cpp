#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

namespace dk {

double LearningRate(const AdamWOptions& o, int64_t step, int64_t total) {
  if (o.warmup > 0 && step < o.warmup) return o.lr * static_cast<double>(step + 1) / o.warmup;
  const int64_t decay_steps = std::max<int64_t>(1, total - std::max(o.warmup, 0));
  const double progress = std::clamp(static_cast<double>(step - std::max(o.warmup, 0)) / decay_steps, 0.0, 1.0);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * cosine);
}

double AdamW::Step(ParamStore<float>& params, int64_t step, int64_t total) {
  std::vector<float>& g = params.grads();
  std::vector<float>& w = params.values();
  double norm2 = 0.0;
  for (float x : g) norm2 += static_cast<double>(x) * x;
  const double norm = std::sqrt(norm2);
  const double scale = (o_.clip > 0.0 && norm > o_.clip) ? o_.clip / norm : 1.0;
  const double lr = LearningRate(o_, step, total);
  const double bc1 = 1.0 - std::pow(o_.beta1, static_cast<double>(step + 1));
  const double bc2 = 1.0 - std::pow(o_.beta2, static_cast<double>(step + 1));
  for (const ParamStore<float>::Tensor& t : params.tensors()) {
    const double decay = t.decay ? o_.weight_decay : 0.0, tlr = lr * t.lr_scale;
    for (size_t i = t.offset; i < t.offset + t.size; ++i) {
      const double gi = g[i] * scale;
      m_[i] = static_cast<float>(o_.beta1 * m_[i] + (1.0 - o_.beta1) * gi);
      v_[i] = static_cast<float>(o_.beta2 * v_[i] + (1.0 - o_.beta2) * gi * gi);
      const double update = (m_[i] / bc1) / (std::sqrt(v_[i] / bc2) + o_.eps);
      w[i] = static_cast<float>(w[i] - tlr * (update + decay * w[i]));
    }
  }
  return norm;
}

}  // namespace dk
