// dynakv passkey: passkey retrieval accuracy (a key hidden in a haystack, asked for at the end),
// by haystack length and key depth, with any KV cache.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "core/mapped_file.h"
#include "core/progress.h"
#include "core/threads.h"
#include "eval/passkey.h"
#include "tools/common.h"

namespace dk::cli {

namespace {

// The continuation quoted for a terminal: model output can hold control bytes (a stray escape
// sequence would repaint the screen), so everything outside printable ASCII becomes \n, \t or \xNN.
std::string Escape(const std::string& s) {
  static const char* kHex = "0123456789abcdef";
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c >= 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

nlohmann::json BucketsJson(const std::vector<PasskeyBucket>& buckets, const char* name) {
  nlohmann::json a = nlohmann::json::array();
  for (const PasskeyBucket& b : buckets) {
    nlohmann::json e;
    if (std::string(name) == "length") {
      e[name] = static_cast<int>(b.value);
    } else {
      e[name] = b.value;
    }
    e["n"] = b.n;
    e["correct"] = b.correct;
    e["accuracy"] = b.accuracy();
    a.push_back(e);
  }
  return a;
}

}  // namespace

int CmdPasskey(int argc, char** argv) {
  std::string model_path, text_file, lengths_arg, depths_arg, json_path, task = "passkey";
  PasskeyOptions opt;
  int n_ctx = 0, threads = DefaultThreads();
  unsigned long long seed = opt.seed;
  bool help = false, quiet = false;
  KvConfig kv;
  ArgParser p("passkey", "passkey retrieval: a key hidden in a haystack of -f text, asked for at the end");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"-f", "--file"}, &text_file, "FILE", "haystack text, held out from training (required)");
  p.AddString({"--task"}, &task, "TASK",
              "passkey (one key), keys (among distractor keys, number and word keys) or records (a number among "
              "20-60 records); default passkey");
  p.AddInt({"--distractors"}, &opt.max_distractors, 0, 16, "keys: most distractor keys per haystack (default 2)");
  p.AddString({"--lengths"}, &lengths_arg, "L,L,..",
              "haystack lengths in words (default 150,300,500; keys 200,500,900,1250, records 100,400,800,1100)");
  p.AddString({"--depths"}, &depths_arg, "D,D,..", "key depths in [0, 1] (default 0.1,0.3,0.5,0.7,0.9)");
  p.AddInt({"--per-cell"}, &opt.per_cell, 1, 1 << 20, "cases per length and depth (default 2; keys and records 3)");
  p.AddUInt64({"--seed"}, &seed, "seed of the haystack windows and keys (default 1)");
  p.AddInt({"-n", "--n-predict"}, &opt.n_predict, 1, 1 << 16, "most tokens decoded per answer (default 8)");
  p.AddInt({"-c", "--ctx-size"}, &n_ctx, 1, 1 << 24,
           "KV cache capacity in tokens (default: the model's); windows too long for it are redrawn");
  p.AddInt({"-t", "--threads"}, &threads, 1, 1024, "threads (default: all cores)");
  p.AddFlag({"-q", "--quiet"}, &quiet, "no line per case, no progress bar");
  p.AddString({"--json"}, &json_path, "FILE", "write every case and the summary as JSON");
  AddKvFlags(p, &kv);
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("passkey", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("passkey", p, InvalidArgument("-m: a model file is required"));
  if (text_file.empty()) return UsageError("passkey", p, InvalidArgument("-f: a text file is required"));
  {
    // The task's defaults for what the flags did not set.
    const PasskeyOptions d = DefaultRetrievalOptions(task);
    opt.task = task;
    if (!p.WasSet("--per-cell")) opt.per_cell = d.per_cell;
    if (!p.WasSet("-n")) opt.n_predict = d.n_predict;
    opt.lengths = d.lengths;
  }
  if (p.WasSet("--lengths")) {
    if (Status s = ParseInts("--lengths", lengths_arg, &opt.lengths); !s.ok()) return UsageError("passkey", p, s);
  }
  if (p.WasSet("--depths")) {
    if (Status s = ParseDoubles("--depths", depths_arg, &opt.depths); !s.ok()) return UsageError("passkey", p, s);
  }
  if (p.WasSet("--json") && json_path.empty())
    return UsageError("passkey", p, InvalidArgument("--json: expected a file name"));
  if (!json_path.empty())
    if (Status s = CheckOutputPath(json_path, "--json"); !s.ok()) return UsageError("passkey", p, s);
  opt.seed = seed;
  if (Status s = ValidatePasskeyOptions(opt); !s.ok()) return UsageError("passkey", p, s);
  if (Status s = ValidateKvFlags(p, kv); !s.ok()) return UsageError("passkey", p, s);

  auto model = Model::Load(model_path);
  if (!model.ok()) return Fail("passkey", model.status());
  const Model& m = **model;
  auto text = ReadWholeFile(text_file);
  if (!text.ok()) return Fail("passkey", text.status());
  if (n_ctx == 0) n_ctx = m.config().n_ctx_train;
  WarnAboveTrainingContext("passkey", m, n_ctx);
  // Windows whose prompt and answer would overflow the context are redrawn rather than failed:
  // a dense stretch of numbers costs twice the tokens per word of prose.
  const int max_prompt_tokens = n_ctx - (opt.n_predict - 1);
  if (max_prompt_tokens < 1)
    return UsageError("passkey", p, InvalidArgument("-c: the context must hold more than -n tokens"));
  auto cases = MakePasskeyCases(*text, opt, &m.tokenizer(), max_prompt_tokens);
  if (!cases.ok()) return Fail("passkey", cases.status().WithContext(text_file));
  auto cache = CreateKvCache(kv, ModelInfoFor(m, model_path), n_ctx);
  if (!cache.ok()) return CacheError("passkey", p, cache.status());
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);
  const int n_cases = static_cast<int>(cases->size());
  int redrawn = 0;
  for (const PasskeyCase& c : *cases) redrawn += c.redraws > 0;
  std::fprintf(stderr, "passkey: %d cases, context %d, kv cache %s\n", n_cases, n_ctx, (*cache)->name().c_str());
  if (redrawn > 0) {
    std::fprintf(stderr, "passkey: %d case%s drew another window to fit %d prompt tokens\n", redrawn,
                 redrawn == 1 ? "" : "s", max_prompt_tokens);
  }

  ProgressBar bar("passkey", n_cases, !quiet);
  int done = 0, correct = 0;
  auto results = RunPasskey(m, *cases, opt.n_predict, **cache, pool, [&](int i, const PasskeyResult& r) {
    ++done;
    correct += r.correct;
    if (!quiet) {
      std::printf("%4d  length %5d  depth %-5g  %-13s  %s  %-16s  %-4s  kv %.4f\n", i + 1, r.length, r.depth,
                  r.phrase.c_str(), r.key.c_str(), Escape(r.continuation).c_str(), r.correct ? "ok" : "FAIL",
                  r.kv_fraction);
      std::fflush(stdout);
    }
    char acc[32];
    std::snprintf(acc, sizeof(acc), "accuracy %.4f", static_cast<double>(correct) / done);
    bar.Update(done, acc);
  });
  bar.Finish();
  if (!results.ok()) return Fail("passkey", results.status());
  const PasskeySummary s = SummarizePasskey(*results);

  std::printf("accuracy by length:\n");
  for (const PasskeyBucket& b : s.by_length)
    std::printf("  %5d  %.4f (%d of %d)\n", static_cast<int>(b.value), b.accuracy(), b.correct, b.n);
  std::printf("accuracy by depth:\n");
  for (const PasskeyBucket& b : s.by_depth)
    std::printf("  %5g  %.4f (%d of %d)\n", b.value, b.accuracy(), b.correct, b.n);
  std::printf("time = %.2f s (%lld prompt tokens)\n", s.seconds, static_cast<long long>(s.n_prompt_tokens));
  std::printf("KV fraction = %.4f\n", s.mean_kv_fraction);
  std::printf("accuracy = %.4f (%d of %d)\n", s.accuracy, s.correct, s.n);

  if (!json_path.empty()) {
    nlohmann::json j;
    j["model"] = model_path;
    j["text"] = text_file;
    j["ctx_size"] = n_ctx;
    j["kv"] = {{"method", kv.method}, {"evict", kv.evict}, {"flags", kv.options.values()}, {"name", (*cache)->name()}};
    j["options"] = {{"lengths", opt.lengths}, {"depths", opt.depths},       {"per_cell", opt.per_cell},
                    {"seed", opt.seed},       {"n_predict", opt.n_predict}, {"phrases", opt.phrases}};
    nlohmann::json cj = nlohmann::json::array();
    for (size_t i = 0; i < results->size(); ++i) {
      const PasskeyResult& r = (*results)[i];
      cj.push_back({{"length", r.length},
                    {"depth", r.depth},
                    {"phrase", r.phrase},
                    {"key", r.key},
                    {"offset", (*cases)[i].offset},
                    {"redraws", (*cases)[i].redraws},
                    {"continuation", r.continuation},
                    {"correct", r.correct},
                    {"n_prompt", r.n_prompt},
                    {"n_generated", r.n_generated},
                    {"kv_bytes", r.kv_bytes},
                    {"kv_fraction", r.kv_fraction},
                    {"seconds", r.seconds}});
    }
    j["cases"] = std::move(cj);
    j["summary"] = {{"n", s.n},
                    {"correct", s.correct},
                    {"accuracy", s.accuracy},
                    {"kv_fraction", s.mean_kv_fraction},
                    {"seconds", s.seconds},
                    {"prompt_tokens", s.n_prompt_tokens},
                    {"by_length", BucketsJson(s.by_length, "length")},
                    {"by_depth", BucketsJson(s.by_depth, "depth")}};
    // Model output need not be valid UTF-8; replace bad bytes rather than throw.
    const std::string out = j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    if (Status w = WriteFileAtomically(json_path, out.data(), out.size()); !w.ok()) return Fail("passkey", w);
  }
  return kExitOk;
}

}  // namespace dk::cli
