#include "eval/evaluate.h"

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/mapped_file.h"
#include "core/threads.h"
#include "eval/generate.h"
#include "eval/perplexity.h"

namespace dk {

namespace {

using json = nlohmann::json;

EvalMethod Method(std::string name, std::string kv, std::string evict, std::map<std::string, std::string> flags,
                  bool per_fraction = true, bool rank_at_root = false, double rank_scale = 1.0) {
  return EvalMethod{std::move(name), std::move(kv), std::move(evict), std::move(flags), per_fraction, rank_at_root,
                    rank_scale, {}};
}

std::vector<EvalMethod> Presets() {
  const std::map<std::string, std::string> router = {
      {"--profile", "{router}"}, {"--rank-policy", "router"}, {"--kv-budget", "{fraction}"}};
  auto with = [](std::map<std::string, std::string> m, const std::string& k, const std::string& v) {
    m[k] = v;
    return m;
  };
  return {
      Method("full", "full", "", {}, false),
      Method("uniform", "dynakv", "", {{"--profile", "{profile}"}, {"--rank-policy", "uniform"}, {"--kv-budget", "{fraction}"}}),
      Method("energy", "dynakv", "", {{"--profile", "{profile}"}, {"--rank-policy", "energy"}, {"--kv-budget", "{fraction}"}}),
      Method("router", "dynakv", "", router),
      // Quantized latents hold about 2x (int8) and 4x (int4) the numbers of fp16 ones in the same
      // bytes: the router trained nearest that rank fraction is used.
      Method("router-int8", "dynakv", "", with(router, "--kv-dtype", "q8"), true, false, 2.0),
      Method("router-int4", "dynakv", "", with(router, "--kv-dtype", "q4"), true, false, 4.0),
      // Rank x precision (transform-coded latents, ops/tcode.h): the same bytes per rank as fp16.
      Method("tc", "dynakv", "", {{"--profile", "{profile}"}, {"--rank-policy", "uniform"}, {"--kv-budget", "{fraction}"}, {"--kv-dtype", "tc"}}),
      Method("router-tc", "dynakv", "", with(router, "--kv-dtype", "tc")),
      Method("kivi2", "kivi", "", {{"--kivi-bits", "2"}}, false),
      Method("kivi4", "kivi", "", {{"--kivi-bits", "4"}}, false),
      Method("kivi2-h", "kivi", "", {{"--kivi-bits", "2"}, {"--hadamard", "1"}}, false),
      Method("kivi4-h", "kivi", "", {{"--kivi-bits", "4"}, {"--hadamard", "1"}}, false),
      Method("q8_0", "q8_0", "", {}, false),
      Method("q4_0", "q4_0", "", {}, false),
      Method("q8_0-h", "q8_0", "", {{"--hadamard", "1"}}, false),
      Method("q4_0-h", "q4_0", "", {{"--hadamard", "1"}}, false),
      Method("snapkv", "full", "snapkv", {{"--evict-keep", "{fraction}"}}),
      Method("streamingllm", "full", "streamingllm", {{"--evict-keep", "{fraction}"}}),
      Method("h2o", "full", "h2o", {{"--evict-keep", "{fraction}"}}),
      Method("router+snapkv", "dynakv", "snapkv",
             {{"--profile", "{router}"}, {"--rank-policy", "router"}, {"--kv-budget", "{root}"}, {"--evict-keep", "{root}"}},
             true, true),
      Method("router-tc+snapkv", "dynakv", "snapkv",
             {{"--profile", "{router}"}, {"--rank-policy", "router"}, {"--kv-budget", "{root}"}, {"--evict-keep", "{root}"},
              {"--kv-dtype", "tc"}},
             true, true),
  };
}

std::string Num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", x);
  return buf;
}

bool Registered(const std::string& name) { return name.empty() || FindKvMethod(name) != nullptr; }

// Replaces every occurrence of `key` in `s`.
std::string Fill(std::string s, const std::string& key, const std::string& value) {
  for (size_t p = 0; (p = s.find(key, p)) != std::string::npos; p += value.size()) s.replace(p, key.size(), value);
  return s;
}

// The router profile for a rank fraction: the one trained at the largest fraction not above it
// (a router's logit offsets move it up well, but pushed below its training fraction it degrades
// fast: the 0.5 router at 0.25 of the bytes had KL 0.52 against the 0.25 router's 0.09), else the
// smallest one; without routers, the spec's profile (whose router, if any, meets the fraction with
// its budget table).
StatusOr<std::string> RouterFor(const EvalSpec& spec, double rank_fraction) {
  std::string below, smallest;
  double below_f = 0.0, smallest_f = 1e300;
  for (const auto& [frac, path] : spec.routers) {
    const double f = std::atof(frac.c_str());
    if (!(f > 0.0)) return InvalidArgument("routers: '" + frac + "' is not a cache fraction");
    if (f <= rank_fraction * (1.0 + 1e-9) && f > below_f) below_f = f, below = path;
    if (f < smallest_f) smallest_f = f, smallest = path;
  }
  if (!below.empty()) return below;
  if (!smallest.empty()) return smallest;
  if (spec.profile.empty()) return InvalidArgument("--profile: the router methods need a profile with a router");
  return spec.profile;
}

Status MakeDirs(const std::string& path) {
  for (size_t p = 1; p <= path.size(); ++p) {
    if (p < path.size() && path[p] != '/') continue;
    const std::string dir = path.substr(0, p);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
      return IoError(dir + ": cannot create the folder: " + std::strerror(errno));
  }
  return Status::Ok();
}

Status WriteJson(const std::string& path, const json& j) {
  const std::string text = j.dump(2) + "\n";
  return WriteFileAtomically(path, text.data(), text.size());
}

// The task's saved result when it was made with this configuration (else null).
json Reusable(const std::string& path, const json& config) {
  std::ifstream in(path);
  if (!in) return nullptr;
  json j = json::parse(in, nullptr, false);
  if (j.is_discarded() || !j.contains("config") || j["config"] != config) return nullptr;
  return j;
}

json RunConfigJson(const EvalRun& r) {
  return {{"method", r.method}, {"fraction", r.fraction}, {"kv", r.config.method}, {"evict", r.config.evict},
          {"flags", r.config.options.values()}};
}

KvModelInfo InfoOf(const Model& model, const EvalSpec& spec) {
  return KvModelInfo{model.config().kv_shape(), model.fingerprint(), spec.model};
}

StatusOr<json> Perplexity(const Model& model, const EvalSpec& spec, const EvalRun& run,
                          const std::vector<int32_t>& tokens, ThreadPool& pool,
                          ReferenceLogits* stored) {
  std::unique_ptr<KvCache> cache, reference;
  DK_ASSIGN_OR_RETURN(cache, CreateKvCache(run.config, InfoOf(model, spec), spec.ppl_ctx));
  DK_ASSIGN_OR_RETURN(reference, CreateKvCache(KvConfig{}, InfoOf(model, spec), spec.ppl_ctx));
  PerplexityOptions opt{spec.ppl_ctx, spec.ppl_ctx, spec.ppl_chunks, true, spec.decode_batch, spec.ppl_prompt};
  PerplexityResult r;
  DK_ASSIGN_OR_RETURN(r, ComputePerplexity(model, tokens, *cache, reference.get(), opt, pool, nullptr, stored));
  return json{{"ppl", r.ppl}, {"ppl_err", r.ppl_err}, {"kl", r.kl_mean}, {"kl_err", r.kl_err},
              {"top1", r.same_top1}, {"kv_fraction", r.kv_fraction}, {"kv_fraction_prompt", r.kv_fraction_prompt},
              {"bytes_per_token", r.kv_bytes_per_token}, {"tokens_per_s", r.n_chunks * spec.ppl_ctx / r.seconds},
              {"chunks", r.n_chunks}, {"scored", r.n_scored}, {"cache", cache->name()}};
}

// A retrieval task (passkey, keys or records) over its cases. "cases" rows: [length, depth,
// correct, kv_fraction, prompt tokens, distractors (keys) or records (records)].
StatusOr<json> Retrieval(const Model& model, const EvalSpec& spec, const EvalRun& run, const PasskeyOptions& options,
                         const std::vector<PasskeyCase>& cases, ThreadPool& pool) {
  std::unique_ptr<KvCache> cache;
  DK_ASSIGN_OR_RETURN(cache, CreateKvCache(run.config, InfoOf(model, spec), model.config().n_ctx_train));
  std::vector<PasskeyResult> results;
  DK_ASSIGN_OR_RETURN(results, RunPasskey(model, cases, options.n_predict, *cache, pool));
  const PasskeySummary s = SummarizePasskey(results);
  auto buckets = [](const std::vector<PasskeyBucket>& v, bool integral) {
    json o = json::object();
    for (const PasskeyBucket& b : v) o[integral ? std::to_string(static_cast<int64_t>(b.value)) : Num(b.value)] = b.accuracy();
    return o;
  };
  json grid = json::array(), by_phrase = json::object();
  std::map<std::string, std::pair<int, int>> phrases;
  for (const PasskeyResult& r : results) {
    grid.push_back({r.length, r.depth, r.correct ? 1 : 0, r.kv_fraction, r.n_prompt, r.distractors});
    auto& [n, ok] = phrases[r.phrase];
    ++n;
    ok += r.correct;
  }
  for (const auto& [phrase, c] : phrases) by_phrase[phrase] = static_cast<double>(c.second) / c.first;
  json out = {{"accuracy", s.accuracy}, {"correct", s.correct}, {"n", s.n}, {"kv_fraction", s.mean_kv_fraction},
              {"by_length", buckets(s.by_length, true)}, {"by_depth", buckets(s.by_depth, false)},
              {"by_tokens", buckets(s.by_tokens, true)}, {"cases", grid}, {"cache", cache->name()},
              {"prompt_tokens", s.n_prompt_tokens}};
  if (options.task == "keys") {
    out["by_distractors"] = buckets(s.by_distractors, true);
    out["by_phrase"] = by_phrase;
  }
  if (options.task == "records") out["by_records"] = buckets(s.by_distractors, true);
  return out;
}

// The machine's read bandwidth as a decode step sees it: every thread of the pool sums its share of
// a 256 MiB buffer (far larger than any cache), best of 3, in GB/s. A STREAM-like bound for the
// bytes a decode step must read (weights and the cache).
double ReadBandwidthGBs(ThreadPool& pool) {
  const size_t n = (size_t{256} << 20) / sizeof(float);
  std::vector<float> buf(n, 1.0f);
  std::vector<double> sums(pool.size(), 0.0);
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.ParallelFor(static_cast<int64_t>(n), [&](int64_t b, int64_t e, int tid) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = b;
      for (; i + 8 <= e; i += 8)
        for (int k = 0; k < 8; ++k) acc[k] += buf[i + k];
      for (; i < e; ++i) acc[0] += buf[i];
      double s = 0.0;
      for (float a : acc) s += a;
      sums[tid] += s;
    });
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n * sizeof(float)) / secs / 1e9);
  }
  volatile double sink = 0.0;
  for (double s : sums) sink = sink + s;
  return best;
}

// Resident set size of this process (VmRSS), in bytes; 0 when /proc cannot be read.
size_t ResidentBytes() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  size_t kb = 0;
  while (std::fgets(line, sizeof(line), f) != nullptr)
    if (std::sscanf(line, "VmRSS: %zu kB", &kb) == 1) break;
  std::fclose(f);
  return kb * 1024;
}

// Records what the forward pass writes to each layer (keys, values, attention inputs) while passing
// it on, so that a prefill can be replayed into the same cache at later positions.
class RecordingCache : public KvCacheWrapper {
 public:
  explicit RecordingCache(std::unique_ptr<KvCache> inner)
      : KvCacheWrapper(std::move(inner)), k_(shape().n_layer), v_(shape().n_layer), x_(shape().n_layer) {}
  void Write(int layer, const KvPlan& plan, const float* k, const float* v, const float* x) override {
    const size_t d = shape().kv_dim(), e = shape().n_embd;
    k_[layer].insert(k_[layer].end(), k, k + plan.n * d);
    v_[layer].insert(v_[layer].end(), v, v + plan.n * d);
    x_[layer].insert(x_[layer].end(), x, x + plan.n * e);
    KvCacheWrapper::Write(layer, plan, k, v, x);
  }
  // Writes the recorded tokens again, cycled, until the cache holds `ctx` tokens: every layer gets
  // them through its own Write (compression, quantization, rank choice), as a prefill would.
  Status ReplayTo(int ctx) {
    const int recorded = static_cast<int>(k_[0].size() / shape().kv_dim());
    const size_t d = shape().kv_dim(), e = shape().n_embd;
    while (n_tokens() < ctx) {
      const int src = n_tokens() % recorded;
      const int n = std::min({512, ctx - n_tokens(), recorded - src});
      DK_ASSIGN_OR_RETURN(KvPlan plan, Plan(n));
      DK_RETURN_IF_ERROR(Apply(plan));
      for (int l = 0; l < shape().n_layer; ++l)
        inner().Write(l, plan, k_[l].data() + src * d, v_[l].data() + src * d, x_[l].data() + src * e);
    }
    return Status::Ok();
  }

 private:
  std::vector<std::vector<float>> k_, v_, x_;
};

// Prefill `ctx` tokens (the text, cycled) in batches of 512, end the prompt, decode greedily. With
// spec.speed_fill (0 < fill < ctx) only `fill` tokens go through the model; their keys, values and
// attention inputs are then written again, cycled, through the cache's own Write up to `ctx` (the
// cache holds ctx tokens, compressed as it would compress them; only the model's products are
// skipped, and prefill speed is that of the `fill` tokens). Each context also says what a decode
// step reads (the weights as stored and the cache's bytes) and the rate that implies, beside the
// machine's read bandwidth measured in the same task, and the process's resident memory.
StatusOr<json> Speed(const Model& model, const EvalSpec& spec, const EvalRun& run, const std::vector<int32_t>& text,
                     ThreadPool& pool) {
  using Clock = std::chrono::steady_clock;
  json rows = json::array();
  for (int ctx : spec.speed_ctx) {
    constexpr int kWarmup = 4;  // untimed decode steps first: thread wake-up and first-touch pages
    std::unique_ptr<KvCache> inner;
    DK_ASSIGN_OR_RETURN(inner, CreateKvCache(run.config, InfoOf(model, spec), ctx + kWarmup + spec.speed_decode));
    const bool replay = spec.speed_fill > 0 && spec.speed_fill < ctx;
    std::unique_ptr<KvCache> cache = replay ? std::make_unique<RecordingCache>(std::move(inner)) : std::move(inner);
    const int n_real = replay ? spec.speed_fill : ctx;
    std::vector<int32_t> prompt(n_real);
    for (int i = 0; i < n_real; ++i) prompt[i] = text[i % text.size()];
    constexpr int kBatch = 512;
    ForwardState st(model.config(), std::min(kBatch, n_real));
    std::vector<float> logits(model.config().n_vocab);
    auto t0 = Clock::now();
    for (int b = 0; b < n_real; b += kBatch) {
      const int n = std::min(kBatch, n_real - b);
      DK_RETURN_IF_ERROR(model.Forward(prompt.data() + b, n, *cache, st, logits.data(), false, pool));
    }
    const double prefill = std::chrono::duration<double>(Clock::now() - t0).count();
    if (replay) DK_RETURN_IF_ERROR(static_cast<RecordingCache&>(*cache).ReplayTo(ctx));
    DK_RETURN_IF_ERROR(cache->EndPrompt(pool));
    const size_t bytes_prompt = cache->BytesUsed();
    auto decode_steps = [&](int steps) -> Status {
      for (int i = 0; i < steps; ++i) {
        const int32_t tok = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        DK_RETURN_IF_ERROR(model.Forward(&tok, 1, *cache, st, logits.data(), false, pool));
      }
      return Status::Ok();
    };
    DK_RETURN_IF_ERROR(decode_steps(kWarmup));
    t0 = Clock::now();
    DK_RETURN_IF_ERROR(decode_steps(spec.speed_decode));
    const double decode = std::chrono::duration<double>(Clock::now() - t0).count();
    const double full = static_cast<double>(Fp16FullBytesPerToken(model.config().kv_shape()));
    const double tps = spec.speed_decode / decode;
    // Bytes one decode step reads at least: every weight once, and the cache as it stands midway.
    const double read = static_cast<double>(model.weight_bytes()) + static_cast<double>(cache->BytesUsed());
    rows.push_back({{"ctx", ctx}, {"prefill_tokens", n_real}, {"prefill_tokens_per_s", n_real / prefill},
                    {"decode_tokens_per_s", tps}, {"kv_bytes", bytes_prompt}, {"kv_fraction", bytes_prompt / (full * ctx)},
                    {"kv_bytes_reserved", cache->BytesReserved()}, {"resident_bytes", ResidentBytes()},
                    {"bytes_read_per_token", read}, {"read_gb_per_s", read * tps / 1e9}});
  }
  return json{{"contexts", rows}, {"machine_read_gb_per_s", ReadBandwidthGBs(pool)}};
}

}  // namespace

StatusOr<EvalMethod> PresetMethod(const std::string& name) {
  for (const EvalMethod& m : Presets()) {
    if (m.name != name) continue;
    if (!Registered(m.kv) || !Registered(m.evict))
      return Unimplemented("--methods: '" + name + "' needs the cache method '" + (Registered(m.kv) ? m.evict : m.kv) +
                           "', which this build does not have");
    return m;
  }
  std::string known;
  for (const std::string& n : PresetMethodNames()) known += (known.empty() ? "" : ", ") + n;
  return InvalidArgument("--methods: unknown method '" + name + "' (known: " + known + ")");
}

std::vector<std::string> PresetMethodNames() {
  std::vector<std::string> names;
  for (const EvalMethod& m : Presets())
    if (Registered(m.kv) && Registered(m.evict)) names.push_back(m.name);
  return names;
}

StatusOr<EvalSpec> EvalSpecFromJson(const json& j) {
  EvalSpec s;
  try {
    s.name = j.value("name", std::string());
    s.model = j.value("model", std::string());
    s.text = j.value("text", std::string());
    s.profile = j.value("profile", std::string());
    if (j.contains("routers")) s.routers = j["routers"].get<std::map<std::string, std::string>>();
    if (j.contains("fractions")) s.fractions = j["fractions"].get<std::vector<double>>();
    if (j.contains("tasks")) s.tasks = j["tasks"].get<std::vector<std::string>>();
    s.ppl_ctx = j.value("ppl_ctx", s.ppl_ctx);
    s.ppl_chunks = j.value("ppl_chunks", s.ppl_chunks);
    s.decode_batch = j.value("decode_batch", s.decode_batch);
    s.ppl_prompt = j.value("ppl_prompt", s.ppl_prompt);
    for (auto [key, o] : {std::pair{"passkey", &s.passkey}, std::pair{"keys", &s.keys}, std::pair{"records", &s.records}}) {
      if (!j.contains(key)) continue;
      const json& p = j[key];
      if (p.contains("lengths")) o->lengths = p["lengths"].get<std::vector<int>>();
      if (p.contains("depths")) o->depths = p["depths"].get<std::vector<double>>();
      o->per_cell = p.value("per_cell", o->per_cell);
      o->seed = p.value("seed", o->seed);
      o->n_predict = p.value("n_predict", o->n_predict);
      if (p.contains("phrases")) o->phrases = p["phrases"].get<std::vector<std::string>>();
      if (p.contains("word_phrases")) o->word_phrases = p["word_phrases"].get<std::vector<std::string>>();
      o->max_distractors = p.value("max_distractors", o->max_distractors);
      o->records_min = p.value("records_min", o->records_min);
      o->records_max = p.value("records_max", o->records_max);
    }
    if (j.contains("speed_ctx")) s.speed_ctx = j["speed_ctx"].get<std::vector<int>>();
    if (j.contains("speed_fractions")) s.speed_fractions = j["speed_fractions"].get<std::vector<double>>();
    if (j.contains("speed_methods")) s.speed_methods = j["speed_methods"].get<std::vector<std::string>>();
    s.speed_decode = j.value("speed_decode", s.speed_decode);
    s.speed_fill = j.value("speed_fill", s.speed_fill);
    for (const json& m : j.value("methods", json::array())) {
      if (m.is_string()) {
        EvalMethod preset;
        DK_ASSIGN_OR_RETURN(preset, PresetMethod(m.get<std::string>()));
        s.methods.push_back(preset);
        continue;
      }
      EvalMethod e;
      e.name = m.at("name").get<std::string>();
      e.kv = m.value("kv", e.kv);
      e.evict = m.value("evict", std::string());
      if (m.contains("flags")) e.flags = m["flags"].get<std::map<std::string, std::string>>();
      e.per_fraction = m.value("per_fraction", true);
      e.rank_at_root = m.value("rank_at_root", false);
      e.rank_scale = m.value("rank_scale", 1.0);
      if (m.contains("fractions")) e.fractions = m["fractions"].get<std::vector<double>>();
      s.methods.push_back(e);
    }
  } catch (const json::exception& e) {
    return InvalidArgument(std::string("evaluation config: ") + e.what());
  }
  if (s.name.empty() || s.name.find('/') != std::string::npos || s.name[0] == '.')
    return InvalidArgument("evaluation config: 'name' must be a plain folder name, found '" + s.name + "'");
  if (s.model.empty() || s.text.empty()) return InvalidArgument("evaluation config: 'model' and 'text' are required");
  if (s.methods.empty()) return InvalidArgument("evaluation config: no methods");
  for (const std::string& t : s.tasks)
    if (t != "perplexity" && t != "passkey" && t != "keys" && t != "records" && t != "speed")
      return InvalidArgument("--tasks: unknown task '" + t + "' (perplexity, passkey, keys, records, speed)");
  for (double f : s.fractions)
    if (!(f > 0.0 && f <= 1.0)) return InvalidArgument("--fractions: " + Num(f) + " is not in (0, 1]");
  if (s.ppl_ctx < 4 || s.ppl_chunks < 1 || s.decode_batch < 1 || s.speed_decode < 1 || s.speed_fill < 0)
    return InvalidArgument("evaluation config: ppl_ctx, ppl_chunks, decode_batch and speed_decode must be positive, speed_fill not negative");
  for (int c : s.speed_ctx)
    if (c < 1 || c > (1 << 22)) return InvalidArgument("--speed-ctx: " + std::to_string(c) + " is out of range");
  if (s.ppl_prompt < 0 || s.ppl_prompt > s.ppl_ctx - 2)
    return InvalidArgument("--ppl-prompt: must be in [1, " + std::to_string(s.ppl_ctx - 2) + "] (or 0 for half of -c), found " +
                           std::to_string(s.ppl_prompt));
  DK_RETURN_IF_ERROR(ValidatePasskeyOptions(s.passkey).WithContext("passkey"));
  DK_RETURN_IF_ERROR(ValidatePasskeyOptions(s.keys).WithContext("keys"));
  DK_RETURN_IF_ERROR(ValidatePasskeyOptions(s.records).WithContext("records"));
  return s;
}

namespace {
json RetrievalJson(const PasskeyOptions& o) {
  json j = {{"lengths", o.lengths}, {"depths", o.depths}, {"per_cell", o.per_cell}, {"seed", o.seed},
            {"n_predict", o.n_predict}};
  if (o.task == "keys")
    j.update({{"phrases", o.phrases}, {"word_phrases", o.word_phrases}, {"max_distractors", o.max_distractors}});
  if (o.task == "records") j.update({{"records_min", o.records_min}, {"records_max", o.records_max}});
  return j;
}
}  // namespace

json EvalSpecToJson(const EvalSpec& s) {
  json methods = json::array();
  for (const EvalMethod& m : s.methods)
    methods.push_back({{"name", m.name}, {"kv", m.kv}, {"evict", m.evict}, {"flags", m.flags},
                       {"per_fraction", m.per_fraction}, {"rank_at_root", m.rank_at_root},
                       {"rank_scale", m.rank_scale}, {"fractions", m.fractions}});
  return json{{"name", s.name}, {"model", s.model}, {"text", s.text}, {"profile", s.profile}, {"routers", s.routers},
              {"fractions", s.fractions}, {"methods", methods}, {"tasks", s.tasks}, {"ppl_ctx", s.ppl_ctx},
              {"ppl_chunks", s.ppl_chunks}, {"decode_batch", s.decode_batch},
              {"passkey", {{"lengths", s.passkey.lengths}, {"depths", s.passkey.depths},
                           {"per_cell", s.passkey.per_cell}, {"seed", s.passkey.seed},
                           {"n_predict", s.passkey.n_predict}}},
              {"keys", RetrievalJson(s.keys)}, {"records", RetrievalJson(s.records)}, {"ppl_prompt", s.ppl_prompt},
              {"speed_ctx", s.speed_ctx}, {"speed_fractions", s.speed_fractions},
              {"speed_methods", s.speed_methods}, {"speed_decode", s.speed_decode},
              {"speed_fill", s.speed_fill}};
}

StatusOr<std::vector<EvalRun>> ExpandRuns(const EvalSpec& spec) {
  std::vector<EvalRun> runs;
  for (const EvalMethod& m : spec.methods) {
    const std::vector<double> fractions =
        !m.per_fraction ? std::vector<double>{-1.0} : (m.fractions.empty() ? spec.fractions : m.fractions);
    for (double f : fractions) {
      EvalRun r;
      r.method = m.name;
      r.fraction = f;
      r.folder = m.per_fraction ? m.name + "@" + Num(f) : m.name;
      r.config.method = m.kv;
      r.config.evict = m.evict;
      for (const auto& [flag, raw] : m.flags) {
        std::string v = raw;
        if (v.find("{fraction}") != std::string::npos || v.find("{root}") != std::string::npos) {
          if (!m.per_fraction)
            return InvalidArgument("method '" + m.name + "': " + flag + " uses a fraction, but the method has a fixed size");
          v = Fill(Fill(v, "{fraction}", Num(f)), "{root}", Num(std::sqrt(f)));
        }
        if (v.find("{profile}") != std::string::npos) {
          if (spec.profile.empty()) return InvalidArgument("--profile: method '" + m.name + "' needs a profile");
          v = Fill(v, "{profile}", spec.profile);
        }
        if (v.find("{router}") != std::string::npos) {
          std::string path;
          DK_ASSIGN_OR_RETURN(path, RouterFor(spec, std::min(1.0, m.rank_scale * (m.rank_at_root ? std::sqrt(f) : f))));
          v = Fill(v, "{router}", path);
        }
        r.config.Set(flag, v);
      }
      DK_RETURN_IF_ERROR(ValidateKvConfig(r.config).WithContext("method '" + m.name + "'"));
      runs.push_back(std::move(r));
    }
  }
  return runs;
}

StatusOr<json> RunEvaluation(const Model& model, const EvalSpec& spec, const std::string& root, bool force,
                             ThreadPool& pool, const EvalProgress& progress) {
  std::vector<EvalRun> runs;
  DK_ASSIGN_OR_RETURN(runs, ExpandRuns(spec));
  const std::string dir = root + "/" + spec.name;
  DK_RETURN_IF_ERROR(MakeDirs(dir + "/runs"));
  DK_RETURN_IF_ERROR(WriteJson(dir + "/config.json", EvalSpecToJson(spec)));
  std::string text;
  DK_ASSIGN_OR_RETURN(text, ReadWholeFile(spec.text));
  // Encode(text, true)'s ids, made a piece at a time: memory for the ids, not ~40 bytes a byte of text.
  std::vector<int32_t> tokens;
  {
    Tokenizer::PieceEncoder enc(model.tokenizer(), true);
    constexpr size_t kPart = size_t{1} << 18;
    for (size_t at = 0; at < text.size(); at += kPart) enc.Add(std::string_view(text).substr(at, kPart), tokens);
    enc.Finish(tokens);
  }
  auto wants = [&](const char* task) { return std::find(spec.tasks.begin(), spec.tasks.end(), task) != spec.tasks.end(); };
  // Every retrieval task's cases, made once for all runs.
  std::map<std::string, std::vector<PasskeyCase>> cases;
  auto options = [&](const std::string& task) -> const PasskeyOptions& {
    return task == "keys" ? spec.keys : task == "records" ? spec.records : spec.passkey;
  };
  for (const char* task : {"passkey", "keys", "records"}) {
    if (!wants(task)) continue;
    DK_ASSIGN_OR_RETURN(cases[task], MakePasskeyCases(text, options(task), &model.tokenizer(),
                                                      model.config().n_ctx_train - options(task).n_predict + 1));
  }
  ReferenceLogits reference;  // the full cache's logits, shared by every run's perplexity
  // Speed is measured for the chosen methods, at the chosen fractions (fixed-size methods always).
  auto timed = [&](const EvalRun& r) {
    const bool method = spec.speed_methods.empty() ||
                        std::count(spec.speed_methods.begin(), spec.speed_methods.end(), r.method) > 0;
    return method && (r.fraction < 0 ||
                      std::count(spec.speed_fractions.begin(), spec.speed_fractions.end(), r.fraction) > 0);
  };
  int total = 0, done = 0;
  for (const EvalRun& r : runs)
    for (const std::string& t : spec.tasks) total += t != "speed" || timed(r);
  json rows = json::array();
  for (const EvalRun& r : runs) {
    const std::string run_dir = dir + "/runs/" + r.folder;
    DK_RETURN_IF_ERROR(MakeDirs(run_dir));
    json row = RunConfigJson(r);
    row["folder"] = r.folder;
    for (const std::string& task : spec.tasks) {
      if (task == "speed" && !timed(r)) continue;
      json config = RunConfigJson(r);
      json all = EvalSpecToJson(spec);
      config["task"] = task;
      config["model"] = spec.model;
      config["text"] = spec.text;
      if (task == "perplexity") config["settings"] = {all["ppl_ctx"], all["ppl_chunks"], all["decode_batch"]};
      if (task == "perplexity" && spec.ppl_prompt > 0) config["settings"].push_back(spec.ppl_prompt);
      if (task == "passkey" || task == "keys" || task == "records") config["settings"] = all[task];
      if (task == "speed") config["settings"] = {all["speed_ctx"], all["speed_decode"]};
      const std::string file = run_dir + "/" + task + ".json";
      if (progress) progress(done, total, r.folder + " " + task);
      json result = force ? json(nullptr) : Reusable(file, config);
      if (result.is_null()) {
        const auto t0 = std::chrono::steady_clock::now();
        StatusOr<json> out = task == "perplexity" ? Perplexity(model, spec, r, tokens, pool, &reference)
                             : task == "speed"    ? Speed(model, spec, r, tokens, pool)
                                                  : Retrieval(model, spec, r, options(task), cases[task], pool);
        if (!out.ok()) return out.status().WithContext(r.folder + " " + task);
        result = {{"config", config}, {"result", *out},
                  {"seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()}};
        DK_RETURN_IF_ERROR(WriteJson(file, result));
      }
      row[task] = result["result"];
      ++done;
    }
    rows.push_back(row);
  }
  if (progress) progress(done, total, "done");
  json summary = {{"spec", EvalSpecToJson(spec)}, {"rows", rows}};
  DK_RETURN_IF_ERROR(WriteJson(dir + "/summary.json", summary));
  return summary;
}

}  // namespace dk
