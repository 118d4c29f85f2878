// dynakv generate: prefill a prompt, then sample tokens; prints tokens/s for both phases.
#include <cstdio>
#include <random>

#include "core/mapped_file.h"
#include "core/threads.h"
#include "eval/generate.h"
#include "tools/common.h"

namespace dk::cli {

int CmdGenerate(int argc, char** argv) {
  std::string model_path, prompt, prompt_file;
  int n_predict = 64, n_ctx = 0, n_batch = 512, threads = DefaultThreads(), top_k = 40;
  double temp = 0.8, top_p = 0.95;
  unsigned long long seed = 0;
  bool help = false;
  KvConfig kv;
  ArgParser p("generate", "generate text from a prompt (greedy with --temp 0)");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"-p", "--prompt"}, &prompt, "TEXT", "prompt text");
  p.AddString({"-f", "--file"}, &prompt_file, "FILE", "read the prompt from a file");
  p.AddInt({"-n", "--n-predict"}, &n_predict, 0, 1 << 24, "tokens to generate (default 64)");
  p.AddInt({"-c", "--ctx-size"}, &n_ctx, 1, 1 << 24, "context size in tokens (default: the model's)");
  p.AddInt({"-b", "--batch-size"}, &n_batch, 1, 1 << 16, "prompt tokens per forward pass (default 512)");
  p.AddInt({"-t", "--threads"}, &threads, 1, 1024, "threads (default: all cores)");
  p.AddDouble({"--temp"}, &temp, 0.0, 100.0, "temperature; 0 = greedy (default 0.8)");
  p.AddInt({"--top-k"}, &top_k, 0, 1 << 24, "keep the k most likely tokens; 0 = off (default 40)");
  p.AddDouble({"--top-p"}, &top_p, 0.0, 1.0, "nucleus sampling threshold; 1 = off (default 0.95)");
  p.AddUInt64({"--seed"}, &seed, "random seed (default: random)");
  AddKvFlags(p, &kv);
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("generate", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("generate", p, InvalidArgument("-m: a model file is required"));
  if (p.WasSet("-p") + p.WasSet("-f") != 1)
    return UsageError("generate", p, InvalidArgument("-p: give exactly one of -p TEXT or -f FILE"));
  if (Status s = ValidateKvFlags(p, kv); !s.ok()) return UsageError("generate", p, s);
  if (!prompt_file.empty()) {
    auto text = ReadWholeFile(prompt_file);
    if (!text.ok()) return Fail("generate", text.status());
    prompt = *text;
  }
  if (!p.WasSet("--seed")) seed = std::random_device()();

  auto model = Model::Load(model_path);
  if (!model.ok()) return Fail("generate", model.status());
  const Model& m = **model;
  if (n_ctx == 0) n_ctx = m.config().n_ctx_train;
  WarnAboveTrainingContext("generate", m, n_ctx);
  const std::vector<int32_t> tokens = m.tokenizer().Encode(prompt, true);
  if (static_cast<int>(tokens.size()) > n_ctx) {
    return Fail("generate", InvalidArgument("the prompt has " + std::to_string(tokens.size()) +
                                            " tokens, more than the context size " + std::to_string(n_ctx) +
                                            " (raise -c or shorten the prompt)"));
  }
  auto cache = CreateKvCache(kv, ModelInfoFor(m, model_path), n_ctx);
  if (!cache.ok()) return CacheError("generate", p, cache.status());
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);
  Sampler sampler(SamplerOptions{static_cast<float>(temp), top_k, static_cast<float>(top_p), seed});
  std::printf("%s", m.tokenizer().Decode(tokens, /*special=*/false).c_str());  // the prompt, without "<s>"
  std::fflush(stdout);
  auto stats = Generate(m, tokens, n_predict, n_batch, **cache, sampler, pool, [&](int32_t tok) {
    std::printf("%s", m.tokenizer().TokenToPiece(tok, /*special=*/false).c_str());
    std::fflush(stdout);
    return true;
  });
  std::printf("\n");
  if (!stats.ok()) return Fail("generate", stats.status());
  const GenerateStats& s = *stats;
  std::fprintf(stderr, "prefill: %d tokens in %.3f s, %.1f tokens/s\n", s.n_prompt, s.prefill_seconds,
               s.n_prompt / std::max(s.prefill_seconds, 1e-9));
  std::fprintf(stderr, "decode:  %d tokens in %.3f s, %.1f tokens/s%s\n", s.n_decoded, s.decode_seconds,
               s.n_decoded / std::max(s.decode_seconds, 1e-9),
               s.stopped_at_eog ? " (stopped at end of text)" : s.stopped_at_capacity ? " (context full)" : "");
  std::fprintf(stderr, "kv cache: %s, %zu bytes used for %d tokens (%.1f bytes/token), %zu reserved\n",
               (*cache)->name().c_str(), (*cache)->BytesUsed(), (*cache)->n_tokens(),
               static_cast<double>((*cache)->BytesUsed()) / std::max(1, (*cache)->n_tokens()), (*cache)->BytesReserved());
  return kExitOk;
}

}  // namespace dk::cli
