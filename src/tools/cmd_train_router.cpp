// dynakv train-router: trains DynaKV's learned router (and optionally the bases) by distillation
// from the full-cache model, and writes it into a new profile (format version 2).
#include <algorithm>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "core/mapped_file.h"
#include "core/progress.h"
#include "core/threads.h"
#include "kv/profile.h"
#include "tools/common.h"
#include "train/data.h"
#include "train/trainer.h"

namespace dk::cli {

int CmdTrainRouter(int argc, char** argv) {
  std::string model_path, profile_path, text_file, docs_file, out_path, log_path, checkpoint;
  int threads = DefaultThreads(), warmup = -1;
  unsigned long long seed = 1;
  bool help = false, quiet = false, keep_checkpoint = false;
  TrainRouterOptions o;
  ArgParser p("train-router",
              "train DynaKV's router (token-wise K/V ranks) by distillation from the full cache; writes a profile");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"--profile"}, &profile_path, "FILE", "calibrated profile from 'dynakv calibrate' (required)");
  p.AddString({"-f", "--file"}, &text_file, "FILE", "training text (required; e.g. the calibration text)");
  p.AddString({"--docs"}, &docs_file, "FILE",
              "retrieval documents, separated by blank lines, placed at the end of some sequences");
  p.AddString({"-o", "--output"}, &out_path, "FILE", "profile to write, with the router (required)");
  p.AddDouble({"--target"}, &o.target, 1e-6, 1.0, "target cache fraction of the fp16 full cache (default 0.25)");
  p.AddInt({"--steps"}, &o.steps, 1, 1 << 24, "optimizer steps (default 300)");
  p.AddInt({"--batch"}, &o.batch, 1, 4096, "sequences per step (default 1)");
  p.AddInt({"--seq-len"}, &o.seq_len, 2, 1 << 16, "tokens per sequence (default: 1024, or the model's context if smaller)");
  p.AddInt({"--hidden"}, &o.hidden, 1, 4096, "router hidden width (default 64)");
  p.AddDouble({"--lambda"}, &o.lambda, 0.0, 1e9, "weight of (expected fraction - target)^2 (default 50)");
  p.AddDouble({"--w-kl"}, &o.w_kl, 0.0, 1e9, "weight of KL(teacher || student) (default 1)");
  p.AddDouble({"--w-ce"}, &o.w_ce, 0.0, 1e9, "weight of the cross-entropy on the next token (default 0.1)");
  p.AddDouble({"--tau-start"}, &o.tau_start, 1e-3, 100.0, "Gumbel-softmax temperature at the first step (default 1)");
  p.AddDouble({"--tau-end"}, &o.tau_end, 1e-3, 100.0, "temperature at the last step, geometric decay (default 0.3)");
  p.AddDouble({"--doc-ratio"}, &o.doc_ratio, 0.0, 1.0, "fraction of sequences ending with a --docs document (0.5)");
  p.AddUInt64({"--seed"}, &seed, "seed of initialisation, data order and noise (default 1)");
  p.AddDouble({"--lr"}, &o.adam.lr, 1e-9, 10.0, "peak learning rate of AdamW (default 0.003)");
  p.AddInt({"--warmup"}, &warmup, 0, 1 << 24, "warm-up steps (default steps / 20)");
  p.AddDouble({"--weight-decay"}, &o.adam.weight_decay, 0.0, 10.0, "AdamW decoupled weight decay (default 0.01)");
  p.AddDouble({"--clip"}, &o.adam.clip, 0.0, 1e9, "gradient-norm clip, 0 = off (default 1)");
  std::string kv_dtype = "tc";
  p.AddString({"--kv-dtype"}, &kv_dtype, "TYPE",
              "latents the router is trained for: tc (rank x precision, default) or f16 (rank only)");
  p.AddFlag({"--train-bases"}, &o.train_bases, "also train the K/V bases (Cayley map from the PCA bases) and means");
  p.AddDouble({"--bases-lr-scale"}, &o.bases_lr_scale, 0.0, 100.0, "bases' learning rate / router's (default 0.1)");
  p.AddInt({"--calib-seqs"}, &o.calib_seqs, 1, 1 << 20, "sequences for the final budget calibration (default 8)");
  p.AddString({"--checkpoint"}, &checkpoint, "FILE", "checkpoint file (default: <output>.ckpt)");
  p.AddInt({"--checkpoint-every"}, &o.checkpoint_every, 1, 1 << 24, "steps between checkpoints (default 50)");
  p.AddFlag({"--resume"}, &o.resume, "continue from the checkpoint if it exists");
  p.AddInt({"--stop-after"}, &o.stop_after, 1, 1 << 24, "stop after N steps of this run (resume later)");
  p.AddFlag({"--keep-checkpoint"}, &keep_checkpoint, "keep the checkpoint after a finished run");
  p.AddString({"--log"}, &log_path, "FILE", "write every step's loss, KL, fraction, ... as JSON lines");
  p.AddInt({"-t", "--threads"}, &threads, 1, 1024, "threads (default: all cores)");
  p.AddFlag({"-q", "--quiet"}, &quiet, "no progress bar");
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("train-router", p, s);
  if (kv_dtype != "tc" && kv_dtype != "f16")
    return UsageError("train-router", p, InvalidArgument("--kv-dtype: train-router trains for tc or f16 latents, found '" + kv_dtype + "'"));
  o.tc = kv_dtype == "tc";
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  for (const auto& [value, flag] : {std::pair{&model_path, "-m"}, {&profile_path, "--profile"}, {&text_file, "-f"},
                                    {&out_path, "-o"}})
    if (value->empty()) return UsageError("train-router", p, InvalidArgument(std::string(flag) + ": required"));
  o.seed = seed;
  o.adam.warmup = warmup >= 0 ? warmup : o.steps / 20;
  o.checkpoint_path = checkpoint.empty() ? out_path + ".ckpt" : checkpoint;
  if (Status s = ValidateTrainOptions(o); !s.ok()) return UsageError("train-router", p, s);
  if (Status s = CheckOutputPath(out_path, "-o"); !s.ok()) return UsageError("train-router", p, s);
  if (!log_path.empty())
    if (Status s = CheckOutputPath(log_path, "--log"); !s.ok()) return UsageError("train-router", p, s);
  if (Status s = CheckOutputPath(o.checkpoint_path, checkpoint.empty() ? "-o" : "--checkpoint"); !s.ok())
    return UsageError("train-router", p, s);

  auto model = Model::Load(model_path);
  if (!model.ok()) return Fail("train-router", model.status());
  const Model& m = **model;
  if (!p.WasSet("--seq-len")) o.seq_len = std::min(o.seq_len, m.config().n_ctx_train);
  auto base = LoadProfile(profile_path);
  if (!base.ok()) return Fail("train-router", base.status());
  if (Status s = CheckProfileMatchesModel(*base, ModelInfoFor(m, model_path), profile_path); !s.ok())
    return Fail("train-router", s);
  auto text = ReadWholeFile(text_file);
  if (!text.ok()) return Fail("train-router", text.status());
  std::string docs;
  if (!docs_file.empty()) {
    auto d = ReadWholeFile(docs_file);
    if (!d.ok()) return Fail("train-router", d.status());
    docs = std::move(*d);
  }
  auto data = MakeTrainData(m.tokenizer(), *text, docs, o.seq_len);
  if (!data.ok()) return Fail("train-router", data.status());
  std::fprintf(stderr,
               "train-router: %zu text tokens, %zu documents (%d shortened to fit --seq-len, %d skipped); target %.4g, "
               "%d steps of %d x %d tokens, router width %d, %s latents%s\n",
               data->plain.size(), data->docs.size(), data->shortened_docs, data->skipped_docs, o.target, o.steps, o.batch, o.seq_len,
               o.hidden, o.tc ? "tc" : "f16", o.train_bases ? ", training bases" : "");
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);
  ProgressBar bar("train-router", o.steps, !quiet);
  std::string log;
  auto r = TrainRouter(m, *base, *data, o, pool, [&](const TrainStepStats& s, int) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "loss %.4f kl %.4f frac %.3f tau %.2f", s.loss, s.kl, s.realised_fraction, s.tau);
    bar.Update(s.step + 1, buf);
    nlohmann::json j = {{"step", s.step},   {"loss", s.loss}, {"kl", s.kl},     {"ce", s.ce},
                        {"expected_fraction", s.expected_fraction}, {"fraction", s.realised_fraction},
                        {"lr", s.lr},       {"tau", s.tau},   {"grad_norm", s.grad_norm}};
    log += j.dump() + "\n";
  });
  bar.Finish();
  if (!r.ok()) return Fail("train-router", r.status());
  if (!log_path.empty())
    if (Status s = WriteFileAtomically(log_path, log.data(), log.size()); !s.ok()) return Fail("train-router", s);
  if (!r->finished) {
    std::printf("stopped after step %d of %d (checkpoint %s); run again with --resume to continue\n", r->steps_done,
                o.steps, o.checkpoint_path.c_str());
    return kExitOk;
  }
  if (Status s = SaveProfile(r->profile, out_path); !s.ok()) return Fail("train-router", s);
  if (!keep_checkpoint) std::remove(o.checkpoint_path.c_str());
  const nlohmann::json info = nlohmann::json::parse(r->profile.router->info);
  std::printf("trained %d steps (from step %d) in %.1f s; calibrated fraction %.4f (target %.4g)\n", r->steps_done,
              r->start_step, r->seconds, info.value("calibrated_fraction", 0.0), o.target);
  std::printf("wrote %s (%llu bytes)\n", out_path.c_str(),
              static_cast<unsigned long long>(ProfileFileBytes(r->profile)));
  return kExitOk;
}

}  // namespace dk::cli
