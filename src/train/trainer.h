// Router training (method.md, decision 5): the model frozen, the full-cache model as the teacher,
// the relaxed DynaKV cache as the student. Each step: a batch of training sequences, the teacher's
// logits (exact attention), the student's forward and backward through the training graph, and an
// AdamW step on the router (and optionally the bases). Loss per token
//   w_kl KL(teacher || student) + w_ce CE(student, next token) + lambda (expected fraction - target)^2
// with the fraction counted in the cache's own bytes (what --kv-budget counts). Checkpoints are
// written atomically and a run resumes from one exactly (same seed and thread count: same numbers).
// When the run ends, the router's output biases are shifted so that its argmax meets the target on a
// few calibration sequences, and its budget table (fraction per layer against a logit offset) is
// measured there, for --kv-budget at inference.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"
#include "kv/profile.h"
#include "model/llama.h"
#include "train/data.h"
#include "train/optimizer.h"

namespace dk {

class ThreadPool;

struct TrainRouterOptions {
  double target = 0.25;      // cache fraction of the fp16 full cache
  int steps = 300;
  int batch = 1;             // sequences per step
  int seq_len = 1024;        // tokens per sequence (long enough for whole retrieval documents)
  int hidden = 64;           // router width
  double lambda = 50.0;      // weight of the fraction penalty
  double w_kl = 1.0;
  double w_ce = 0.1;
  double tau_start = 1.0;    // Gumbel temperature, annealed geometrically to tau_end
  double tau_end = 0.3;
  double doc_ratio = 0.5;    // fraction of sequences ending with a retrieval document
  uint64_t seed = 1;
  bool train_bases = false;  // also train the bases (Cayley) and the means
  bool tc = false;           // train for tc latents (rank x precision); the CLI's default is true
  double bases_lr_scale = 0.1;
  AdamWOptions adam;
  int calib_seqs = 8;        // sequences for the final bias shift and the budget table
  std::string checkpoint_path;  // empty: no checkpoints
  int checkpoint_every = 50;
  bool resume = false;       // continue from checkpoint_path when it exists
  int stop_after = -1;       // end this run after this many steps (a later run resumes); -1: run to the end
};

struct TrainStepStats {
  int step = 0;              // 0-based
  double loss = 0.0;         // total, per token
  double kl = 0.0;           // mean KL(teacher || student) per token, nats
  double ce = 0.0;           // mean cross-entropy per token
  double expected_fraction = 0.0;
  double realised_fraction = 0.0;
  double lr = 0.0, tau = 0.0, grad_norm = 0.0;
};

struct TrainRouterResult {
  DynaKvProfile profile;     // the base profile with the router (and trained bases) written in
  bool finished = false;     // false: stopped early (stop_after); profile has no router then
  int start_step = 0;        // where this run began (> 0 when resumed)
  int steps_done = 0;        // steps completed in total
  double seconds = 0.0;      // wall time of this run
  std::vector<TrainStepStats> history;  // this run's steps
  std::vector<float> params; // the final parameter vector (tests compare runs)
};

using TrainProgress = std::function<void(const TrainStepStats&, int steps_total)>;

// `base` must match the model and hold no router (a fresh one is trained).
StatusOr<TrainRouterResult> TrainRouter(const Model& model, const DynaKvProfile& base, const TrainData& data,
                                        const TrainRouterOptions& options, ThreadPool& pool,
                                        const TrainProgress& progress = nullptr);

// Loss weights and the mode of the relaxed cache's choices are checked here (each error names the
// flag); called by TrainRouter, public for the CLI's early checks.
Status ValidateTrainOptions(const TrainRouterOptions& o);

}  // namespace dk
