#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <sstream>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "core/hash.h"
#include "core/memory.h"
#include "core/threads.h"
#include "kv/dynakv_cache.h"
#include "kv/full_cache.h"
#include "model/train_graph.h"
#include "ops/grad.h"
#include "train/checkpoint.h"
#include "train/relaxed_cache.h"

namespace dk {

namespace {

constexpr uint64_t kCalibIndexBase = 1ull << 40;  // calibration sequences: a stream apart from training

// Everything that shapes the trajectory of a run: a checkpoint of another configuration is refused.
uint64_t ConfigHash(const TrainRouterOptions& o, const Model& model, const DynaKvProfile& base) {
  std::ostringstream s;
  s.precision(17);
  s << o.target << ' ' << o.steps << ' ' << o.batch << ' ' << o.seq_len << ' ' << o.hidden << ' ' << o.lambda << ' '
    << o.w_kl << ' ' << o.w_ce << ' ' << o.tau_start << ' ' << o.tau_end << ' ' << o.doc_ratio << ' ' << o.seed << ' '
    << o.train_bases << ' ' << o.tc << ' ' << o.bases_lr_scale << ' ' << o.adam.lr << ' ' << o.adam.min_lr_ratio << ' '
    << o.adam.warmup << ' ' << o.adam.weight_decay << ' ' << o.adam.clip << ' ' << model.fingerprint();
  for (int l : base.levels) s << ' ' << l;
  const std::string text = s.str();
  uint64_t h = Fnv1a(kFnv1aOffset, text.data(), text.size());
  for (const auto& sets : {&base.k, &base.v})
    for (const BasisSet& b : *sets) h = Fnv1a(h, b.basis.data(), b.basis.size() * sizeof(float));
  return h;
}

double Tau(const TrainRouterOptions& o, int step) {
  if (o.steps <= 1) return o.tau_end;
  return o.tau_start * std::pow(o.tau_end / o.tau_start, static_cast<double>(step) / (o.steps - 1));
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Router logits of the calibration sequences, the argmax choices feeding forward as at inference.
//   out[l]: rows [n][2][L] (K logits, then V logits) of layer l.
Status CollectLogits(const Model& model, const TrainData& data, const TrainRouterOptions& o, TrainGraph<float>& graph,
                     RelaxedDynaKvCache<float>& relax, ThreadPool& pool, std::vector<std::vector<float>>* out) {
  const int B = graph.batch(), T = graph.seq_len(), L = static_cast<int>(relax.levels().size());
  const int n_layer = model.config().n_layer;
  out->assign(n_layer, {});
  std::vector<int32_t> tokens(static_cast<size_t>(B) * T);
  relax.Prepare(RouterMode::kArgmax, 1.0, 0);
  for (int done = 0; done < o.calib_seqs; done += B) {
    for (int b = 0; b < B; ++b)
      MakeSequence(data, o.seed, kCalibIndexBase + done + b, T, o.doc_ratio, model.tokenizer().bos_id(),
                   &tokens[static_cast<size_t>(b) * T]);
    DK_RETURN_IF_ERROR(graph.Forward(tokens.data(), &relax, pool));
    const int rows = std::min(B, o.calib_seqs - done) * T;
    for (int l = 0; l < n_layer; ++l) {
      const std::vector<float>& lk = relax.logits_k(l);
      const std::vector<float>& lv = relax.logits_v(l);
      for (int r = 0; r < rows; ++r) {
        (*out)[l].insert((*out)[l].end(), lk.begin() + static_cast<int64_t>(r) * L, lk.begin() + (r + 1) * L);
        (*out)[l].insert((*out)[l].end(), lv.begin() + static_cast<int64_t>(r) * L, lv.begin() + (r + 1) * L);
      }
    }
  }
  return Status::Ok();
}

// Fraction each layer realises with choice argmax(logits + beta * levels).
std::vector<double> FractionsAt(const std::vector<std::vector<float>>& logits, const std::vector<int>& levels,
                                const RecordCost& cost, int D, double beta) {
  const int L = static_cast<int>(levels.size());
  std::vector<double> f(logits.size());
  for (size_t l = 0; l < logits.size(); ++l) {
    const size_t rows = logits[l].size() / (2 * L);
    int64_t elems = 0;
    for (size_t r = 0; r < rows; ++r) {
      const float* row = logits[l].data() + r * 2 * L;
      elems += levels[RouterChoice(row, levels.data(), L, beta)] + levels[RouterChoice(row + L, levels.data(), L, beta)];
    }
    f[l] = cost.Bytes(elems, static_cast<int64_t>(rows)) / (4.0 * D * static_cast<double>(rows));
  }
  return f;
}

double Mean(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

// The budget table, and the offset at which the mean fraction reaches `target`.
struct BudgetFit {
  std::vector<RouterBudgetRow> rows;
  double beta_target = 0.0;
};

BudgetFit FitBudget(const std::vector<std::vector<float>>& logits, const std::vector<int>& levels,
                    const RecordCost& cost, int D, double target) {
  auto mean_at = [&](double beta) { return Mean(FractionsAt(logits, levels, cost, D, beta)); };
  const double f_lo = cost.Bytes(2 * levels.front(), 1) / (4.0 * D), f_hi = cost.Bytes(2 * levels.back(), 1) / (4.0 * D);
  // Bracket: offsets where every token takes the lowest, and the highest, level.
  double lo = -1.0, hi = 1.0;
  while (mean_at(lo) > f_lo + 1e-12 && lo > -1e6) lo *= 2.0;
  while (mean_at(hi) < f_hi - 1e-12 && hi < 1e6) hi *= 2.0;
  // Smallest offset whose mean fraction reaches f (the fraction is a non-decreasing step function).
  auto solve = [&](double f) {
    double a = lo, b = hi;
    for (int it = 0; it < 60; ++it) {
      const double mid = 0.5 * (a + b);
      (mean_at(mid) < f ? a : b) = mid;
    }
    return b;
  };
  BudgetFit fit;
  fit.beta_target = solve(target);
  constexpr int kRows = 40;  // log-spaced in fraction from the lowest to the highest level
  const double m_lo = mean_at(lo), m_hi = mean_at(hi);
  for (int i = 0; i < kRows; ++i) {
    const double f = m_lo * std::pow(m_hi / m_lo, static_cast<double>(i) / (kRows - 1));
    const double beta = i == 0 ? lo : (i == kRows - 1 ? hi : solve(f));
    if (!fit.rows.empty() && beta <= fit.rows.back().beta) continue;
    fit.rows.push_back(RouterBudgetRow{beta, FractionsAt(logits, levels, cost, D, beta)});
  }
  return fit;
}

std::string InfoJson(const TrainRouterOptions& o, const std::optional<LastStepMetrics>& last, double final_fraction) {
  nlohmann::json j;
  j["trainer"] = "dynakv train-router";
  j["target"] = o.target;
  j["steps"] = o.steps;
  j["batch"] = o.batch;
  j["seq_len"] = o.seq_len;
  j["hidden"] = o.hidden;
  j["lambda"] = o.lambda;
  j["w_kl"] = o.w_kl;
  j["w_ce"] = o.w_ce;
  j["tau"] = {o.tau_start, o.tau_end};
  j["doc_ratio"] = o.doc_ratio;
  j["seed"] = o.seed;
  j["lr"] = o.adam.lr;
  j["warmup"] = o.adam.warmup;
  j["weight_decay"] = o.adam.weight_decay;
  j["clip"] = o.adam.clip;
  j["train_bases"] = o.train_bases;
  j["kv_dtype"] = o.tc ? "tc" : "f16";
  j["calib_seqs"] = o.calib_seqs;
  if (last) j["last_step"] = {{"loss", last->loss}, {"kl", last->kl}, {"ce", last->ce}, {"fraction", last->fraction}};
  j["calibrated_fraction"] = final_fraction;
  return j.dump();
}

}  // namespace

Status ValidateTrainOptions(const TrainRouterOptions& o) {
  auto bad = [](const std::string& flag, const std::string& what) { return InvalidArgument(flag + ": " + what); };
  if (!(o.target > 0.0 && o.target <= 1.0)) return bad("--target", "expected a cache fraction in (0, 1]");
  if (o.steps < 1) return bad("--steps", "expected at least 1");
  if (o.batch < 1) return bad("--batch", "expected at least 1");
  if (o.seq_len < 2) return bad("--seq-len", "expected at least 2");
  if (o.hidden < 1 || o.hidden > 4096) return bad("--hidden", "expected a width in [1, 4096]");
  if (!(o.lambda >= 0.0) || !(o.w_kl >= 0.0) || !(o.w_ce >= 0.0) || !(o.w_kl + o.w_ce > 0.0))
    return bad("--w-kl/--w-ce/--lambda", "weights must be >= 0, and w_kl + w_ce > 0");
  if (!(o.tau_start > 0.0 && o.tau_end > 0.0 && o.tau_start <= 100.0 && o.tau_end <= 100.0))
    return bad("--tau", "Gumbel temperatures must be in (0, 100]");
  if (!(o.doc_ratio >= 0.0 && o.doc_ratio <= 1.0)) return bad("--doc-ratio", "expected a fraction in [0, 1]");
  if (!(o.adam.lr > 0.0)) return bad("--lr", "expected a positive learning rate");
  if (o.calib_seqs < 1) return bad("--calib-seqs", "expected at least 1");
  if (o.checkpoint_every < 1) return bad("--checkpoint-every", "expected at least 1");
  return Status::Ok();
}

StatusOr<TrainRouterResult> TrainRouter(const Model& model, const DynaKvProfile& base, const TrainData& data,
                                        const TrainRouterOptions& o, ThreadPool& pool, const TrainProgress& progress) {
  DK_RETURN_IF_ERROR(ValidateTrainOptions(o));
  const ModelConfig& c = model.config();
  DK_RETURN_IF_ERROR(CheckProfileMatchesModel(base, KvModelInfo{c.kv_shape(), model.fingerprint(), "the model"},
                                              "the base profile"));
  if (data.plain.size() < static_cast<size_t>(o.seq_len))
    return InvalidArgument("-f: the training text is shorter than --seq-len");
  using Clock = std::chrono::steady_clock;
  const auto t_start = Clock::now();
  const int B = o.batch, T = o.seq_len, N = B * T, V = c.n_vocab, D = c.n_head_kv * c.head_dim;
  const RecordCost cost = DynaKvCache::CostFor(D, KvDtype::kF16);
  {
    // The training graph (its attention weights grow as seq_len^2), the teacher's logits and their
    // gradient, the teacher's cache and the fp32 copies of the weights, refused before any of it
    // is allocated.
    const long double logits = 2.0L * N * V * sizeof(float), teacher_kv = 2.0L * c.n_layer * T * D * sizeof(float);
    const long double weights = static_cast<long double>(model.weight_bytes()) * 4;  // at most fp32 copies
    const long double total = static_cast<long double>(TrainGraph<float>::BytesFor(c, B, T)) + logits + teacher_kv + weights;
    const uint64_t need = total >= 1.8e19L ? UINT64_MAX : static_cast<uint64_t>(total);
    DK_RETURN_IF_ERROR(CheckMemory(need, "training with --batch " + std::to_string(B) + " --seq-len " +
                                             std::to_string(T) + " (activations grow as batch x seq-len^2)")
                           .WithContext("train-router: lower --seq-len or --batch"));
  }

  ParamStore<float> params;
  RelaxedDynaKvCache<float> relax(base, c.n_embd, cost,
                                  RelaxedCacheOptions{o.hidden, o.target, o.train_bases, o.bases_lr_scale, o.tc}, params);
  relax.InitParams(Mix64(o.seed ^ 0x7e57ab1eull));
  AdamW adam(o.adam, params.size());
  const ModelGraphWeights weights(model);  // fp32 copies of matrices not stored as f32
  TrainGraph<float> graph(weights.view(), B, T);

  TrainRouterResult result;
  result.profile = base;
  result.profile.router.reset();
  const uint64_t hash = ConfigHash(o, model, base);
  std::optional<LastStepMetrics> last;
  if (o.resume && !o.checkpoint_path.empty() && FileExists(o.checkpoint_path)) {
    Checkpoint ck;
    DK_ASSIGN_OR_RETURN(ck, LoadCheckpoint(o.checkpoint_path));
    if (ck.config_hash != hash || ck.params.size() != params.size())
      return InvalidArgument("--resume: checkpoint " + o.checkpoint_path +
                             " belongs to another configuration (model, profile or training flags differ); "
                             "remove it or run with the flags that wrote it");
    params.values() = ck.params;
    adam.m() = ck.m;
    adam.v() = ck.v;
    result.start_step = static_cast<int>(std::min<int64_t>(ck.step, o.steps));
    last = ck.last;  // a run resumed after its last step trains nothing, and still reports it
  }

  FullKvCache teacher_cache(c.kv_shape(), T, KvDtype::kF32);
  ForwardState st(c, T);
  std::vector<float> teacher(static_cast<size_t>(N) * V), dlogits(static_cast<size_t>(N) * V);
  std::vector<int32_t> tokens(N), targets(N);
  int step = result.start_step;
  for (; step < o.steps; ++step) {
    if (o.stop_after >= 0 && step - result.start_step >= o.stop_after) break;
    for (int b = 0; b < B; ++b) {
      int32_t* seq = &tokens[static_cast<size_t>(b) * T];
      MakeSequence(data, o.seed, static_cast<uint64_t>(step) * B + b, T, o.doc_ratio, model.tokenizer().bos_id(), seq);
      for (int t = 0; t < T; ++t) targets[static_cast<size_t>(b) * T + t] = t + 1 < T ? seq[t + 1] : -1;
      teacher_cache.Clear();
      DK_RETURN_IF_ERROR(model.Forward(seq, T, teacher_cache, st, &teacher[static_cast<size_t>(b) * T * V], true, pool));
    }
    TrainStepStats s;
    s.step = step;
    s.tau = Tau(o, step);
    s.lr = LearningRate(o.adam, step, o.steps);
    relax.Prepare(RouterMode::kGumbelHard, s.tau, Mix64(Mix64(o.seed) + static_cast<uint64_t>(step)));
    DK_RETURN_IF_ERROR(graph.Forward(tokens.data(), &relax, pool));
    const DistillLossSums sums = DistillLoss(graph.logits(), teacher.data(), targets.data(), N, V,
                                             static_cast<float>(o.w_kl), static_cast<float>(o.w_ce), 1.0f / N,
                                             dlogits.data(), pool);
    s.kl = sums.kl / N;
    s.ce = sums.ce / (N - B);
    s.expected_fraction = relax.expected_fraction();
    s.realised_fraction = relax.realised_fraction();
    const double gap = s.expected_fraction - o.target;
    s.loss = o.w_kl * s.kl + o.w_ce * sums.ce / N + o.lambda * gap * gap;
    relax.set_fraction_grad(2.0 * o.lambda * gap);
    params.ZeroGrad();
    graph.Backward(dlogits.data(), &relax, pool);
    for (float g : params.grads())
      if (!std::isfinite(g))
        return Internal("train-router: non-finite gradient at step " + std::to_string(step) +
                        " (try a smaller --lr or --lambda)");
    s.grad_norm = adam.Step(params, step, o.steps);
    result.history.push_back(s);
    last = LastStepMetrics{s.loss, s.kl, s.ce, s.realised_fraction};
    if (progress) progress(s, o.steps);
    const bool final_step = step + 1 == o.steps;
    if (!o.checkpoint_path.empty() && ((step + 1) % o.checkpoint_every == 0 || final_step ||
                                       (o.stop_after >= 0 && step + 1 - result.start_step == o.stop_after))) {
      DK_RETURN_IF_ERROR(SaveCheckpoint(Checkpoint{hash, step + 1, params.values(), adam.m(), adam.v(), last},
                                        o.checkpoint_path));
    }
  }
  result.steps_done = step;
  result.params = params.values();
  result.finished = step >= o.steps;
  if (!result.finished) {
    result.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
    return result;
  }

  // Calibration: shift the output biases so the argmax meets the target, then measure the budget
  // table with the shifted router (the hidden states of the second pass are those at the target).
  std::vector<std::vector<float>> logits;
  DK_RETURN_IF_ERROR(CollectLogits(model, data, o, graph, relax, pool, &logits));
  const double shift = FitBudget(logits, base.levels, cost, D, o.target).beta_target;
  relax.ShiftOutputBiases(shift);
  DK_RETURN_IF_ERROR(CollectLogits(model, data, o, graph, relax, pool, &logits));
  BudgetFit fit = FitBudget(logits, base.levels, cost, D, o.target);
  const double calibrated = Mean(FractionsAt(logits, base.levels, cost, D, 0.0));
  relax.Export(&result.profile);
  result.profile.router->budget = std::move(fit.rows);
  result.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  result.profile.router->info = InfoJson(o, last, calibrated);
  DK_RETURN_IF_ERROR(ValidateProfile(result.profile, "trained profile"));
  return result;
}

}  // namespace dk
