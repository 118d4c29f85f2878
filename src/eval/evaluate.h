// dynakv eval: every KV method at the same cache fractions on the same text, one command.
//
// An evaluation is a spec (EvalSpec: a model, a text, profiles, methods x fractions, tasks) that
// expands into runs (one method at one fraction, or once for a method with a fixed size such as a
// quantized cache). Each run does up to three tasks:
//   perplexity  llama.cpp's procedure with the eviction-aware protocol (each chunk's first half a
//               prompt, compressed when it ends; the scored half decoded in small batches), plus KL
//               from the full cache and top-1 agreement;
//   passkey     greedy retrieval of a key hidden in haystacks of the text (eval/passkey.h);
//   keys        the same among distractor keys, with number and word keys, up to the model's context;
//   records     a number looked up among 20-60 records hidden in a haystack;
//   speed       prefill and decode tokens/s and the resident KV bytes at context lengths up to 32k.
// Results go to <root>/<spec name>/: config.json (the spec, paths as given: relative ones stay
// relative), runs/<run>/<task>.json (each with the run's configuration), summary.json (every row).
// A task whose result file holds the same configuration is skipped when run again.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/status.h"
#include "eval/passkey.h"
#include "kv/registry.h"
#include "model/llama.h"

namespace dk {

class ThreadPool;

// A method of the comparison. Flag values may hold placeholders, filled per run:
//   {fraction}  the run's cache fraction            {root}    its square root (for splits)
//   {profile}   the spec's profile                  {router}  the router profile for the rank fraction
struct EvalMethod {
  std::string name;               // a folder-safe label, e.g. "router", "kivi2", "router+snapkv"
  std::string kv = "full";
  std::string evict;
  std::map<std::string, std::string> flags;
  bool per_fraction = true;       // false: one run at the method's own size (quantized caches)
  bool rank_at_root = false;      // {router} is chosen for the square root of the fraction (splits)
  double rank_scale = 1.0;        // {router} is chosen for this many times the fraction (int8 latents: 2)
  std::vector<double> fractions;  // this method's own fractions (empty: the spec's)
};

struct EvalSpec {
  std::string name;               // results/<name>/
  std::string model, text, profile;
  std::map<std::string, std::string> routers;  // fraction (as written, e.g. "0.25") -> profile with its router
  std::vector<double> fractions = {0.5, 0.25, 0.125, 0.0625};
  std::vector<EvalMethod> methods;
  std::vector<std::string> tasks = {"perplexity", "passkey", "speed"};
  int ppl_ctx = 512, ppl_chunks = 100, decode_batch = 16;
  int ppl_prompt = 0;             // tokens of each chunk compressed as the prompt (0: half), the rest scored
  PasskeyOptions passkey;         // lengths, depths, per_cell, seed, n_predict
  PasskeyOptions keys = DefaultRetrievalOptions("keys");
  PasskeyOptions records = DefaultRetrievalOptions("records");
  std::vector<int> speed_ctx = {1024, 4096, 16384, 32768};
  std::vector<double> speed_fractions = {0.25};
  std::vector<std::string> speed_methods;  // methods timed (empty: all)
  int speed_decode = 64;          // decode steps timed per context (after 4 untimed ones)
  int speed_fill = 0;             // >0: tokens prefilled through the model; the rest of a context is
                                  // their keys/values written again, cycled (0: prefill it all)
};

// Built-in methods by name: full, uniform, energy, router, router-int8, router-int4, kivi2, kivi4,
// kivi2-h, kivi4-h, q8_0, q4_0, q8_0-h, q4_0-h, snapkv, streamingllm, h2o, router+snapkv. A name
// whose cache method is not registered in this build is refused.
StatusOr<EvalMethod> PresetMethod(const std::string& name);
std::vector<std::string> PresetMethodNames();

StatusOr<EvalSpec> EvalSpecFromJson(const nlohmann::json& j);
nlohmann::json EvalSpecToJson(const EvalSpec& spec);

struct EvalRun {
  std::string method;
  double fraction = -1.0;  // -1: a fixed-size method
  KvConfig config;
  std::string folder;      // "<method>@<fraction>" or "<method>"
};
// Every run of the spec, placeholders filled. InvalidArgument names a missing profile or router.
StatusOr<std::vector<EvalRun>> ExpandRuns(const EvalSpec& spec);

using EvalProgress = std::function<void(int done, int total, const std::string& what)>;

// Runs (or reuses) every task of every run; returns summary.json's content.
StatusOr<nlohmann::json> RunEvaluation(const Model& model, const EvalSpec& spec, const std::string& root, bool force,
                                       ThreadPool& pool, const EvalProgress& progress = nullptr);

}  // namespace dk
