// dynakv perplexity: llama.cpp's perplexity procedure; optionally KL divergence from the full cache.
#include <algorithm>
#include <cstdio>

#include "core/mapped_file.h"
#include "core/memory.h"
#include "core/progress.h"
#include "core/threads.h"
#include "eval/perplexity.h"
#include "tools/common.h"

namespace dk::cli {

int CmdPerplexity(int argc, char** argv) {
  std::string model_path, text_file;
  int n_ctx = 512, n_batch = 2048, threads = DefaultThreads(), chunks = -1;
  bool help = false, kl = false, quiet = false, prompt_then_decode = false;
  int decode_batch = 16;
  KvConfig kv;
  ArgParser p("perplexity", "perplexity of a text file: chunks of -c tokens, the second half of each scored");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"-f", "--file"}, &text_file, "FILE", "text file (required)");
  p.AddInt({"-c", "--ctx-size"}, &n_ctx, 4, 1 << 24, "chunk (context) size in tokens (default 512)");
  p.AddInt({"-b", "--batch-size"}, &n_batch, 1, 1 << 24, "tokens per forward pass, at most -c (default 2048)");
  p.AddInt({"--chunks"}, &chunks, 1, 1 << 30, "score only the first N chunks (default: all)");
  p.AddInt({"-t", "--threads"}, &threads, 1, 1024, "threads (default: all cores)");
  p.AddFlag({"--kl-divergence"}, &kl, "also run the fp16 full cache and report KL(full || this cache) per token");
  p.AddFlag({"-q", "--quiet"}, &quiet, "no running values or progress bar");
  p.AddFlag({"--prompt-then-decode"}, &prompt_then_decode,
            "each chunk's first half is a prompt (compressed when it ends), the scored half follows in batches "
            "(on by default with --evict)");
  p.AddInt({"--decode-batch"}, &decode_batch, 1, 1 << 16, "with --prompt-then-decode: tokens per batch after the prompt (16)");
  AddKvFlags(p, &kv);
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("perplexity", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("perplexity", p, InvalidArgument("-m: a model file is required"));
  if (text_file.empty()) return UsageError("perplexity", p, InvalidArgument("-f: a text file is required"));
  if (Status s = ValidateKvFlags(p, kv); !s.ok()) return UsageError("perplexity", p, s);

  auto model = Model::Load(model_path);
  if (!model.ok()) return Fail("perplexity", model.status());
  const Model& m = **model;
  // With --chunks N only the first max(N, 2) chunks' tokens are needed: the text is encoded a piece
  // at a time until they exist (the same ids as encoding it whole), not all of a text of up to 1 GiB.
  const size_t needed = chunks > 0 ? static_cast<size_t>(std::max(chunks, 2)) * static_cast<size_t>(n_ctx) : 0;
  auto text = TokenizeTextFile(m.tokenizer(), text_file, needed);
  if (!text.ok()) return Fail("perplexity", text.status());
  const std::vector<int32_t>& tokens = text->ids;
  // Checks that cost nothing come before anything is allocated for the run.
  if (static_cast<int64_t>(tokens.size()) < 2LL * n_ctx)
    return Fail("perplexity", InvalidArgument("-c " + std::to_string(n_ctx) + ": the text has " +
                                              std::to_string(tokens.size()) + " tokens; at least 2 * n_ctx = " +
                                              std::to_string(2LL * n_ctx) + " are needed (use a smaller -c)"));
  WarnAboveTrainingContext("perplexity", m, n_ctx);
  const uint64_t logit_bytes = static_cast<uint64_t>(n_ctx) * m.config().n_vocab * 4 * (kl ? 2 : 1);
  if (Status s = CheckMemory(logit_bytes, "-c " + std::to_string(n_ctx) + ": the logits of a chunk"); !s.ok())
    return Fail("perplexity", s);
  const KvModelInfo info = ModelInfoFor(m, model_path);
  auto cache = CreateKvCache(kv, info, n_ctx);
  if (!cache.ok()) return CacheError("perplexity", p, cache.status());
  std::unique_ptr<KvCache> reference;
  if (kl) {
    auto ref = CreateKvCache(KvConfig{}, info, n_ctx);
    if (!ref.ok()) return Fail("perplexity", ref.status());
    reference = std::move(*ref);
  }
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);
  const int n_chunks_total = static_cast<int>(tokens.size() / n_ctx);
  const int n_chunks = chunks > 0 ? std::min(chunks, n_chunks_total) : n_chunks_total;
  if (text->whole)
    std::fprintf(stderr, "perplexity: %zu tokens, %d chunks of %d, kv cache %s\n", tokens.size(), n_chunks, n_ctx,
                 (*cache)->name().c_str());
  else
    std::fprintf(stderr, "perplexity: %zu tokens (from the text's first %llu bytes: enough for --chunks %d), %d chunks "
                 "of %d, kv cache %s\n", tokens.size(), static_cast<unsigned long long>(text->bytes_encoded), chunks,
                 n_chunks, n_ctx, (*cache)->name().c_str());
  ProgressBar bar("perplexity", n_chunks, !quiet);
  PerplexityOptions opt{n_ctx, n_batch, chunks, prompt_then_decode || !kv.evict.empty(), decode_batch};
  if (opt.prompt_then_decode)
    std::fprintf(stderr, "perplexity: each chunk's first %d tokens are a prompt, the rest follows in batches of %d\n",
                 n_ctx / 2, decode_batch);
  auto r = ComputePerplexity(m, tokens, **cache, reference.get(), opt, pool, [&](int c, int n, double ppl) {
    if (!quiet) {
      std::printf("[%d]%.4f,", c, ppl);
      std::fflush(stdout);
    }
    bar.Update(c, "ppl " + std::to_string(ppl));
  });
  bar.Finish();
  if (!quiet) std::printf("\n");
  if (!r.ok()) return Fail("perplexity", r.status());
  std::printf("tokens/s = %.1f (%lld tokens in %.2f s)\n", n_chunks * static_cast<double>(n_ctx) / r->seconds,
              static_cast<long long>(n_chunks) * n_ctx, r->seconds);
  std::printf("KV bytes/token = %.1f\n", r->kv_bytes_per_token);
  std::printf("KV fraction = %.4f\n", r->kv_fraction);
  if (opt.prompt_then_decode) std::printf("KV fraction (prompt) = %.4f\n", r->kv_fraction_prompt);
  if (r->has_kl) {
    std::printf("KL = %.6f +/- %.6f\n", r->kl_mean, r->kl_err);
    std::printf("same top-1 = %.4f\n", r->same_top1);
  }
  std::printf("PPL = %.4f +/- %.5f\n", r->ppl, r->ppl_err);
  return kExitOk;
}

}  // namespace dk::cli
