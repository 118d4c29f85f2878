// dynakv rankmap: an HTML page of a text coloured by the ranks a DynaKV cache gave each token.
#include <cstdio>

#include "core/mapped_file.h"
#include "core/threads.h"
#include "eval/rankmap.h"
#include "kv/dynakv_cache.h"
#include "tools/common.h"

namespace dk::cli {

int CmdRankmap(int argc, char** argv) {
  std::string model_path, text_file, out_path;
  int n_tokens = 400, threads = DefaultThreads(), offset = 0;
  bool help = false;
  KvConfig kv;
  kv.method = "dynakv";
  ArgParser p("rankmap", "colour a text by the K and V ranks a DynaKV cache gives each token (an HTML page)");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"-f", "--file"}, &text_file, "FILE", "text file (required)");
  p.AddString({"-o", "--output"}, &out_path, "FILE", "HTML page to write (required)");
  p.AddInt({"-n", "--tokens"}, &n_tokens, 1, 1 << 20, "tokens of the text to show, BOS included (default 400)");
  p.AddInt({"--offset"}, &offset, 0, 1 << 30, "start at this byte of the text, moved to the next blank line (default 0)");
  p.AddInt({"-t", "--threads"}, &threads, 1, 1024, "threads (default: all cores)");
  AddKvFlags(p, &kv);
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("rankmap", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("rankmap", p, InvalidArgument("-m: a model file is required"));
  if (text_file.empty()) return UsageError("rankmap", p, InvalidArgument("-f: a text file is required"));
  if (out_path.empty()) return UsageError("rankmap", p, InvalidArgument("-o: an output file is required"));
  if (Status s = CheckOutputPath(out_path, "-o"); !s.ok()) return UsageError("rankmap", p, s);
  if (kv.method != "dynakv")
    return UsageError("rankmap", p, InvalidArgument("--kv: rankmap shows the ranks of a dynakv cache"));
  if (!kv.options.Has("--rank-policy")) kv.Set("--rank-policy", "router");
  if (Status s = ValidateKvFlags(p, kv); !s.ok()) return UsageError("rankmap", p, s);

  auto model = Model::Load(model_path);
  if (!model.ok()) return Fail("rankmap", model.status());
  const Model& m = **model;
  auto text = ReadWholeFile(text_file);
  if (!text.ok()) return Fail("rankmap", text.status());
  if (offset > 0) {
    const size_t para = text->find("\n\n", std::min<size_t>(offset, text->size()));
    *text = para == std::string::npos ? std::string() : text->substr(para + 2);
  }
  std::vector<int32_t> tokens = m.tokenizer().Encode(*text, true);
  if (tokens.size() < 2) return Fail("rankmap", InvalidArgument("-f: no text at --offset " + std::to_string(offset)));
  tokens.resize(std::min<size_t>(tokens.size(), n_tokens));
  auto cache = CreateKvCache(kv, ModelInfoFor(m, model_path), static_cast<int>(tokens.size()));
  if (!cache.ok()) return CacheError("rankmap", p, cache.status());
  auto* dyna = dynamic_cast<DynaKvCache*>(cache->get());
  if (dyna == nullptr) return UsageError("rankmap", p, InvalidArgument("--evict: rankmap shows a dynakv cache alone"));
  ThreadPool pool(threads);
  ConfigureBlasFor(threads);
  auto map = CollectRankMap(m, tokens, *dyna, 512, pool);
  if (!map.ok()) return Fail("rankmap", map.status());
  map->title = m.config().name + " | profile " + kv.options.String("--profile", "") + " | cache " + dyna->name();
  const std::string html = RankMapHtml(*map);
  if (Status s = WriteFileAtomically(out_path, html.data(), html.size()); !s.ok()) return Fail("rankmap", s);
  std::printf("%s", RankMapSummary(*map, 3, 12).c_str());
  std::printf("wrote %s (%zu tokens, cache fraction %.4f)\n", out_path.c_str(), tokens.size(), map->kv_fraction);
  return kExitOk;
}

}  // namespace dk::cli
