#include "eval/calibrate.h"

#include <algorithm>
#include <cmath>
#include <string>

#include <cblas.h>
#include <lapacke.h>

#include "core/threads.h"
#include "kv/full_cache.h"

namespace dk {

namespace {

// The fp32 full cache, with a tap that accumulates the moments of every key and value row it is
// handed, per layer.
class CalibrationCache final : public KvCacheWrapper {
 public:
  CalibrationCache(const KvShape& shape, int capacity)
      : KvCacheWrapper(std::make_unique<FullKvCache>(shape, capacity, KvDtype::kF32)) {
    for (int l = 0; l < shape.n_layer; ++l) {
      k_moments_.emplace_back(shape.kv_dim());
      v_moments_.emplace_back(shape.kv_dim());
    }
  }
  std::string name() const override { return "calibration(" + inner().name() + ")"; }

  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override {
    KvCacheWrapper::Write(layer, plan, k, v, x);
    k_moments_[layer].Add(k, plan.n);
    v_moments_[layer].Add(v, plan.n);
  }

  const MomentAccumulator& k_moments(int layer) const { return k_moments_[layer]; }
  const MomentAccumulator& v_moments(int layer) const { return v_moments_[layer]; }

 private:
  std::vector<MomentAccumulator> k_moments_, v_moments_;  // [n_layer]
};

}  // namespace

MomentAccumulator::MomentAccumulator(int D)
    : D_(D), shift_(D, 0.0), sum_(D, 0.0), outer_(static_cast<size_t>(D) * D, 0.0) {}

void MomentAccumulator::Add(const float* rows, int n) {
  if (n <= 0) return;
  const size_t D = static_cast<size_t>(D_);
  if (!has_shift_) {
    for (int t = 0; t < n; ++t)
      for (size_t i = 0; i < D; ++i) shift_[i] += rows[t * D + i];
    for (size_t i = 0; i < D; ++i) shift_[i] /= n;
    has_shift_ = true;
  }
  batch_.resize(static_cast<size_t>(n) * D);
  for (int t = 0; t < n; ++t) {
    for (size_t i = 0; i < D; ++i) {
      const double x = static_cast<double>(rows[t * D + i]) - shift_[i];
      batch_[t * D + i] = x;
      sum_[i] += x;
    }
  }
  // outer (upper triangle, row-major) += batch^T batch
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, D_, n, 1.0, batch_.data(), D_, 1.0, outer_.data(), D_);
  count_ += n;
}

void MomentAccumulator::Finish(std::vector<double>* mean, std::vector<double>* cov) const {
  const size_t D = static_cast<size_t>(D_);
  mean->assign(D, 0.0);
  cov->assign(D * D, 0.0);
  if (count_ == 0) return;
  const double inv = 1.0 / static_cast<double>(count_);
  std::vector<double> m(D);  // mean of the shifted rows
  for (size_t i = 0; i < D; ++i) {
    m[i] = sum_[i] * inv;
    (*mean)[i] = shift_[i] + m[i];
  }
  for (size_t i = 0; i < D; ++i) {
    for (size_t j = i; j < D; ++j) {
      const double c = outer_[i * D + j] * inv - m[i] * m[j];
      (*cov)[i * D + j] = c;
      (*cov)[j * D + i] = c;
    }
  }
}

StatusOr<BasisSet> PcaBasis(const std::vector<double>& mean, std::vector<double> cov, int D) {
  const size_t d = static_cast<size_t>(D);
  if (D < 1 || mean.size() != d || cov.size() != d * d)
    return Internal("PcaBasis: expected mean [" + std::to_string(D) + "] and covariance [" + std::to_string(D) +
                    "][" + std::to_string(D) + "]");
  for (double c : cov)
    if (!std::isfinite(c)) return InvalidArgument("covariance has non-finite entries (the model produced inf/nan)");
  std::vector<double> w(d);
  // Single-threaded, so that the basis is the same bits whatever -t is (threaded, the reductions
  // inside the eigensolver are split differently: bases differed by up to 5e-10 between -t 1 and 2).
  const ScopedBlasThreads one_thread(1);
  const lapack_int info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'U', D, cov.data(), D, w.data());
  if (info != 0) return Internal("LAPACKE_dsyevd failed with info = " + std::to_string(info));
  // LAPACK: w ascending, cov[i*D + j] = component i of eigenvector j. Reverse to decreasing order.
  BasisSet b;
  b.basis.resize(d * d);
  b.mean.resize(d);
  b.eigenvalues.resize(d);
  for (size_t j = 0; j < d; ++j) {
    const size_t src = d - 1 - j;
    size_t arg = 0;
    for (size_t i = 1; i < d; ++i)
      if (std::fabs(cov[i * d + src]) > std::fabs(cov[arg * d + src])) arg = i;
    const double sign = cov[arg * d + src] < 0.0 ? -1.0 : 1.0;
    for (size_t i = 0; i < d; ++i) b.basis[i * d + j] = static_cast<float>(sign * cov[i * d + src]);
    double e = std::max(w[src], 0.0);  // rounding can leave tiny negatives on a singular covariance
    if (j > 0) e = std::min(e, b.eigenvalues[j - 1]);
    b.eigenvalues[j] = e;
  }
  for (size_t i = 0; i < d; ++i) b.mean[i] = static_cast<float>(mean[i]);
  return b;
}

StatusOr<DynaKvProfile> Calibrate(const Model& model, const std::vector<int32_t>& tokens,
                                  const CalibrateOptions& opt, ThreadPool& pool, const CalibrateProgress& progress) {
  const ModelConfig& cfg = model.config();
  const KvShape shape = cfg.kv_shape();
  const int D = shape.kv_dim();
  const int n_ctx = opt.n_ctx;
  if (n_ctx < 2) return InvalidArgument("-c: context size must be at least 2, found " + std::to_string(n_ctx));
  if (opt.n_batch < 1) return InvalidArgument("-b: batch size must be positive, found " + std::to_string(opt.n_batch));
  int64_t n_chunks = static_cast<int64_t>(tokens.size()) / n_ctx;
  if (opt.max_chunks > 0) n_chunks = std::min<int64_t>(n_chunks, opt.max_chunks);
  if (n_chunks < 1) {
    return InvalidArgument("calibrate: the text has " + std::to_string(tokens.size()) +
                           " tokens; at least one chunk of n_ctx = " + std::to_string(n_ctx) +
                           " is needed (use a longer text or a smaller -c)");
  }
  DynaKvProfile p;
  DK_ASSIGN_OR_RETURN(p.levels, NormalizeLevels(opt.levels, D));
  p.model_fingerprint = model.fingerprint();
  p.model_name = cfg.name;
  p.n_layer = shape.n_layer;
  p.n_head_kv = shape.n_head_kv;
  p.head_dim = shape.head_dim;

  const int n_batch = std::min(opt.n_batch, n_ctx);
  CalibrationCache cache(shape, n_ctx);
  ForwardState st(cfg, n_batch);
  std::vector<float> logits(cfg.n_vocab);  // last token's logits: unused, but Forward computes them
  std::vector<int32_t> chunk(n_ctx);
  const int32_t bos = model.tokenizer().bos_id();
  for (int64_t c = 0; c < n_chunks; ++c) {
    std::copy(tokens.begin() + c * n_ctx, tokens.begin() + (c + 1) * n_ctx, chunk.begin());
    if (bos >= 0) chunk[0] = bos;
    cache.Clear();
    for (int b = 0; b < n_ctx; b += n_batch) {
      const int n = std::min(n_batch, n_ctx - b);
      DK_RETURN_IF_ERROR(model.Forward(chunk.data() + b, n, cache, st, logits.data(), false, pool));
    }
    if (progress) progress(static_cast<int>(c + 1), static_cast<int>(n_chunks));
  }

  p.n_calib_tokens = cache.k_moments(0).count();
  p.k.resize(p.n_layer);
  p.v.resize(p.n_layer);
  std::vector<double> mean, cov;
  for (int l = 0; l < p.n_layer; ++l) {
    for (int which = 0; which < 2; ++which) {
      const MomentAccumulator& acc = which == 0 ? cache.k_moments(l) : cache.v_moments(l);
      acc.Finish(&mean, &cov);
      auto basis = PcaBasis(mean, std::move(cov), D);
      if (!basis.ok())
        return basis.status().WithContext("calibrate: layer " + std::to_string(l) + (which == 0 ? " K" : " V"));
      (which == 0 ? p.k[l] : p.v[l]) = std::move(basis).value();
    }
  }
  DK_RETURN_IF_ERROR(ValidateProfile(p, "calibrated profile"));
  return p;
}

}  // namespace dk
