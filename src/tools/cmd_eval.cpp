// dynakv eval: every KV method at the same cache fractions, on the same text: perplexity, KL and
// top-1 agreement, passkey retrieval, and speed and resident bytes up to long contexts. Results go
// to <results>/<name>/ (a finished task is skipped when run again); a table is printed at the end.
#include <chrono>
#include <cstdio>
#include <fstream>

#include "core/mapped_file.h"
#include "core/threads.h"
#include "eval/evaluate.h"
#include "tools/common.h"

namespace dk::cli {

namespace {

std::string Cell(const nlohmann::json& row, const char* task, const char* key, const char* fmt) {
  if (!row.contains(task) || !row[task].contains(key)) return "-";
  char buf[48];
  std::snprintf(buf, sizeof(buf), fmt, row[task][key].get<double>());
  return buf;
}

void PrintTable(const nlohmann::json& summary) {
  std::printf("%-16s %8s %9s %9s %8s %7s %8s %6s %8s %10s\n", "method", "target", "fraction", "PPL", "KL", "top-1",
              "passkey", "keys", "records", "decode t/s");
  for (const nlohmann::json& row : summary["rows"]) {
    const double f = row["fraction"].get<double>();
    std::string decode = "-";
    if (row.contains("speed")) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "%.0f@%d", row["speed"]["contexts"].back()["decode_tokens_per_s"].get<double>(),
                    row["speed"]["contexts"].back()["ctx"].get<int>());
      decode = buf;
    }
    std::string frac = Cell(row, "perplexity", "kv_fraction_prompt", "%.4f");
    for (const char* task : {"passkey", "keys", "records"})
      if (frac == "-") frac = Cell(row, task, "kv_fraction", "%.4f");
    std::printf("%-16s %8s %9s %9s %8s %7s %8s %6s %8s %10s\n", row["method"].get<std::string>().c_str(),
                f < 0 ? "fixed" : std::to_string(f).substr(0, 6).c_str(), frac.c_str(),
                Cell(row, "perplexity", "ppl", "%.3f").c_str(), Cell(row, "perplexity", "kl", "%.4f").c_str(),
                Cell(row, "perplexity", "top1", "%.4f").c_str(), Cell(row, "passkey", "accuracy", "%.3f").c_str(),
                Cell(row, "keys", "accuracy", "%.3f").c_str(), Cell(row, "records", "accuracy", "%.3f").c_str(),
                decode.c_str());
  }
}

}  // namespace

int CmdEval(int argc, char** argv) {
  std::string model_path, text_file, profile, routers, methods = "full,uniform,energy,router", fractions, tasks,
                                                       config_file, write_config, name, results = "results",
                                                       lengths, depths, speed_ctx, speed_fractions;
  int threads = DefaultThreads(), chunks = -1, per_cell = -1, ctx = -1, ppl_prompt = -1, speed_fill = -1;
  bool help = false, force = false, quiet = false;
  ArgParser p("eval", "compare KV cache methods at equal cache fractions: perplexity/KL, passkey retrieval, speed");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"-f", "--file"}, &text_file, "FILE", "held-out text: perplexity and passkey haystacks (required)");
  p.AddString({"--profile"}, &profile, "FILE", "DynaKV profile for uniform/energy (and router without --routers)");
  p.AddString({"--routers"}, &routers, "F=FILE,..", "profiles with a router trained at each fraction, e.g. 0.25=r.dkv");
  p.AddString({"--methods"}, &methods, "LIST", "methods to compare (default full,uniform,energy,router); see below");
  p.AddString({"--fractions"}, &fractions, "LIST", "cache fractions of the fp16 full cache (default 0.5,0.25,0.125,0.0625)");
  p.AddString({"--tasks"}, &tasks, "LIST", "perplexity,passkey,keys,records,speed (default perplexity,passkey,speed)");
  p.AddInt({"-c", "--ctx-size"}, &ctx, 4, 1 << 20, "perplexity chunk size (default 512)");
  p.AddInt({"--ppl-prompt"}, &ppl_prompt, 0, 1 << 20,
           "tokens of each chunk compressed as the prompt, the rest scored (default 0: half of -c)");
  p.AddInt({"--chunks"}, &chunks, 1, 1 << 30, "perplexity chunks scored (default 100)");
  p.AddInt({"--per-cell"}, &per_cell, 1, 1 << 20,
           "retrieval haystacks per length and depth (default 2 for passkey, 3 for keys and records)");
  p.AddString({"--lengths"}, &lengths, "L,L,..",
              "retrieval haystack lengths in words (default 150,300,500 for passkey, 200,500,900,1250 for keys, 100,400,800,1100 for records)");
  p.AddString({"--depths"}, &depths, "D,D,..", "retrieval key depths (default 0.1,0.3,0.5,0.7,0.9)");
  p.AddString({"--speed-ctx"}, &speed_ctx, "LIST", "context lengths for speed (default 1024,4096,16384,32768)");
  p.AddString({"--speed-fractions"}, &speed_fractions, "LIST", "fractions timed for speed (default 0.25)");
  p.AddInt({"--speed-fill"}, &speed_fill, 0, 1 << 22,
           "speed: tokens prefilled through the model; the rest of each context is their keys and values "
           "written again, cycled, through the cache (default 0: prefill it all)");
  p.AddString({"--name"}, &name, "NAME", "results folder name (default: from the model file)");
  p.AddString({"--results"}, &results, "DIR", "where result folders go (default results)");
  p.AddString({"--config"}, &config_file, "FILE", "an evaluation spec (JSON, as written to <results>/<name>/config.json)");
  p.AddString({"--write-config"}, &write_config, "FILE", "write the spec these flags make, and stop");
  p.AddFlag({"--force"}, &force, "rerun tasks that already have results");
  p.AddInt({"-t", "--threads"}, &threads, 1, 1024, "threads (default: all cores)");
  p.AddFlag({"-q", "--quiet"}, &quiet, "no progress bar");
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("eval", p, s);
  if (help) {
    std::string names;
    for (const std::string& n : PresetMethodNames()) names += " " + n;
    std::printf("%smethods:%s\n", p.Usage().c_str(), names.c_str());
    return kExitOk;
  }
  // The spec: from --config, with the flags given on top.
  nlohmann::json j = nlohmann::json::object();
  if (!config_file.empty()) {
    auto text = ReadWholeFile(config_file);
    if (!text.ok()) return Fail("eval", text.status());
    j = nlohmann::json::parse(*text, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return Fail("eval", InvalidArgument(config_file + ": not a JSON object"));
  }
  if (!model_path.empty()) j["model"] = model_path;
  if (!text_file.empty()) j["text"] = text_file;
  if (!profile.empty()) j["profile"] = profile;
  if (!name.empty()) j["name"] = name;
  if (!j.contains("name") && j.contains("model")) {
    std::string base = j["model"].get<std::string>();
    base = base.substr(base.find_last_of('/') + 1);
    j["name"] = base.substr(0, base.rfind(".gguf"));
  }
  if (!j.contains("model")) return UsageError("eval", p, InvalidArgument("-m: a model file is required"));
  if (!j.contains("text")) return UsageError("eval", p, InvalidArgument("-f: a text file is required"));
  if (config_file.empty() || p.WasSet("--methods")) j["methods"] = SplitCommas(methods);
  if (!routers.empty()) {
    nlohmann::json r = nlohmann::json::object();
    for (const std::string& part : SplitCommas(routers)) {
      const size_t eq = part.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == part.size())
        return UsageError("eval", p, InvalidArgument("--routers: expected F=FILE pairs, found '" + part + "'"));
      r[part.substr(0, eq)] = part.substr(eq + 1);
    }
    j["routers"] = r;
  }
  std::vector<double> d;
  std::vector<int> i;
  if (!fractions.empty()) {
    if (Status s = ParseDoubles("--fractions", fractions, &d); !s.ok()) return UsageError("eval", p, s);
    j["fractions"] = d;
  }
  if (!tasks.empty()) j["tasks"] = SplitCommas(tasks);
  if (ctx > 0) j["ppl_ctx"] = ctx;
  if (chunks > 0) j["ppl_chunks"] = chunks;
  if (ppl_prompt >= 0) j["ppl_prompt"] = ppl_prompt;
  // The retrieval flags apply to every retrieval task.
  for (const char* task : {"passkey", "keys", "records"}) {
    if (per_cell > 0) j[task]["per_cell"] = per_cell;
    if (!lengths.empty()) {
      if (Status s = ParseInts("--lengths", lengths, &i); !s.ok()) return UsageError("eval", p, s);
      j[task]["lengths"] = i;
    }
    if (!depths.empty()) {
      if (Status s = ParseDoubles("--depths", depths, &d); !s.ok()) return UsageError("eval", p, s);
      j[task]["depths"] = d;
    }
  }
  if (!speed_ctx.empty()) {
    if (Status s = ParseInts("--speed-ctx", speed_ctx, &i); !s.ok()) return UsageError("eval", p, s);
    j["speed_ctx"] = i;
  }
  if (!speed_fractions.empty()) {
    if (Status s = ParseDoubles("--speed-fractions", speed_fractions, &d); !s.ok()) return UsageError("eval", p, s);
    j["speed_fractions"] = d;
  }
  if (speed_fill >= 0) j["speed_fill"] = speed_fill;
  auto spec = EvalSpecFromJson(j);
  if (!spec.ok()) return CacheError("eval", p, spec.status());
  if (auto runs = ExpandRuns(*spec); !runs.ok()) return CacheError("eval", p, runs.status());
  if (!write_config.empty()) {
    if (Status s = CheckOutputPath(write_config, "--write-config"); !s.ok()) return UsageError("eval", p, s);
    const std::string out = EvalSpecToJson(*spec).dump(2) + "\n";
    if (Status s = WriteFileAtomically(write_config, out.data(), out.size()); !s.ok()) return Fail("eval", s);
    std::printf("wrote %s\n", write_config.c_str());
    return kExitOk;
  }

  const std::string run_dir = results + "/" + spec->name;
  if (Status s = CheckOutputFolder(run_dir, "--results", "config.json"); !s.ok()) return UsageError("eval", p, s);
  auto model = Model::Load(spec->model);
  if (!model.ok()) return Fail("eval", model.status());
  WarnAboveTrainingContext("eval", **model, spec->ppl_ctx);
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);
  // One line per task (tasks take seconds to minutes): which runs, how far along, the time so far.
  const auto t0 = std::chrono::steady_clock::now();
  auto summary = RunEvaluation(**model, *spec, results, force, pool, [&](int done, int total, const std::string& what) {
    if (quiet) return;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (done < total) {
      std::fprintf(stderr, "eval [%d/%d] %s (%.0f s so far)\n", done + 1, total, what.c_str(), secs);
    } else {
      std::fprintf(stderr, "eval: %d tasks done in %.0f s\n", total, secs);
    }
  });
  if (!summary.ok()) return Fail("eval", summary.status());
  PrintTable(*summary);
  std::printf("results in %s/%s/ (summary.json)\n", results.c_str(), spec->name.c_str());
  return kExitOk;
}

}  // namespace dk::cli
