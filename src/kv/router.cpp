#include "kv/router.h"

#include "ops/grad.h"

namespace dk {

double Router::MeanFraction(const RouterBudgetRow& row) {
  if (row.fraction.empty()) return 0.0;
  double s = 0.0;
  for (double f : row.fraction) s += f;
  return s / static_cast<double>(row.fraction.size());
}

size_t RouterLayerParams(int E, int H, int L) {
  return static_cast<size_t>(H) * E + H + 2 * (static_cast<size_t>(L) * H + L);
}

void RouterForward(const RouterLayer& w, int E, int H, int L, const float* x, int n, float* pre, float* h, float* lk,
                   float* lv) {
  LinearForward(x, w.w1.data(), w.b1.data(), pre, n, E, H);
  Silu(pre, h, static_cast<int64_t>(n) * H);
  LinearForward(h, w.w2k.data(), w.b2k.data(), lk, n, H, L);
  LinearForward(h, w.w2v.data(), w.b2v.data(), lv, n, H, L);
}

int RouterChoice(const float* logits, const int* levels, int L, double beta) {
  int best = 0;
  double best_score = static_cast<double>(logits[0]) + beta * levels[0];
  for (int j = 1; j < L; ++j) {
    const double s = static_cast<double>(logits[j]) + beta * levels[j];
    if (s > best_score) {
      best_score = s;
      best = j;
    }
  }
  return best;
}

}  // namespace dk
