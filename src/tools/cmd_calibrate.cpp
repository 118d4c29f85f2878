// dynakv calibrate: fits a DynaKV profile (per-layer joint PCA bases of post-RoPE keys and of values)
// on calibration text, and reports the explained variance at each rank level.
#include <charconv>
#include <chrono>
#include <cstdio>

#include "core/mapped_file.h"
#include "core/progress.h"
#include "core/threads.h"
#include "eval/calibrate.h"
#include "kv/profile.h"
#include "tools/common.h"

namespace dk::cli {

namespace {

// "4,8,16" -> {4, 8, 16}. Range checks against D come later, once the model is known.
StatusOr<std::vector<int>> ParseLevels(const std::string& text) {
  std::vector<int> levels;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t end = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, end - start);
    int value = 0;
    const auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), value);
    if (item.empty() || ec != std::errc() || ptr != item.data() + item.size())
      return InvalidArgument("--levels: expected comma-separated positive integers (e.g. 8,16,32), found '" + text +
                             "'");
    levels.push_back(value);
    start = end + 1;
  }
  return levels;
}

}  // namespace

int CmdCalibrate(int argc, char** argv) {
  std::string model_path, text_file, out_path, levels_text;
  int n_ctx = 512, n_batch = 512, threads = DefaultThreads(), chunks = -1;
  bool help = false, quiet = false;
  ArgParser p("calibrate",
              "fit a DynaKV profile: per layer, joint PCA bases (all KV heads) of post-RoPE keys and of values");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"-f", "--file"}, &text_file, "FILE", "calibration text file (required)");
  p.AddString({"-o", "--output"}, &out_path, "FILE", "profile to write, e.g. model.dkv (required)");
  p.AddInt({"-c", "--ctx-size"}, &n_ctx, 2, 1 << 24, "chunk (context) size in tokens (default 512)");
  p.AddInt({"-b", "--batch-size"}, &n_batch, 1, 1 << 24, "tokens per forward pass, at most -c (default 512)");
  p.AddInt({"--chunks"}, &chunks, 1, 1 << 30, "use only the first N chunks (default: all)");
  p.AddString({"--levels"}, &levels_text, "LIST",
              "rank levels, comma-separated and increasing, e.g. 8,16,32 (D is appended; default: 1,2,4,8,12,16,...,D)");
  p.AddInt({"-t", "--threads"}, &threads, 1, 1024, "threads (default: all cores)");
  p.AddFlag({"-q", "--quiet"}, &quiet, "no progress bar");
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("calibrate", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("calibrate", p, InvalidArgument("-m: a model file is required"));
  if (text_file.empty()) return UsageError("calibrate", p, InvalidArgument("-f: a text file is required"));
  if (out_path.empty()) return UsageError("calibrate", p, InvalidArgument("-o: an output profile path is required"));
  if (Status s = CheckOutputPath(out_path, "-o"); !s.ok()) return UsageError("calibrate", p, s);
  CalibrateOptions opt{n_ctx, n_batch, chunks, {}};
  if (p.WasSet("--levels")) {
    auto levels = ParseLevels(levels_text);
    if (!levels.ok()) return UsageError("calibrate", p, levels.status());
    opt.levels = std::move(*levels);
  }

  auto model = Model::Load(model_path);
  if (!model.ok()) return Fail("calibrate", model.status());
  const Model& m = **model;
  const int D = m.config().kv_shape().kv_dim();
  if (!opt.levels.empty()) {
    auto levels = NormalizeLevels(opt.levels, D);
    if (!levels.ok()) return UsageError("calibrate", p, levels.status());
    opt.levels = std::move(*levels);
  }
  WarnAboveTrainingContext("calibrate", m, n_ctx);
  auto text = ReadWholeFile(text_file);
  if (!text.ok()) return Fail("calibrate", text.status());
  const std::vector<int32_t> tokens = m.tokenizer().Encode(*text, true);
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);
  const int64_t n_chunks_total = static_cast<int64_t>(tokens.size()) / n_ctx;
  const int64_t n_chunks = chunks > 0 ? std::min<int64_t>(chunks, n_chunks_total) : n_chunks_total;
  std::fprintf(stderr, "calibrate: %zu tokens, %lld chunks of %d, D = %d (%d KV heads x %d), %d layers\n",
               tokens.size(), static_cast<long long>(n_chunks), n_ctx, D, m.config().n_head_kv,
               m.config().head_dim, m.config().n_layer);

  const auto t0 = std::chrono::steady_clock::now();
  ProgressBar bar("calibrate", std::max<int64_t>(n_chunks, 1), !quiet);
  auto profile = Calibrate(m, tokens, opt, pool, [&](int c, int) { bar.Update(c); });
  bar.Finish();
  if (!profile.ok()) return Fail("calibrate", profile.status());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("calibrated on %lld tokens in %.2f s\n", static_cast<long long>(profile->n_calib_tokens), seconds);
  std::printf("%s", ExplainedVarianceTable(*profile).c_str());
  if (Status s = SaveProfile(*profile, out_path); !s.ok()) return Fail("calibrate", s);
  std::printf("wrote %s (%llu bytes)\n", out_path.c_str(),
              static_cast<unsigned long long>(ProfileFileBytes(*profile)));
  return kExitOk;
}

}  // namespace dk::cli
