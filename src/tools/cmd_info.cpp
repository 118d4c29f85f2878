// dynakv info: what a model file holds and what its KV cache costs per token.
#include <cstdio>

#include "kv/full_cache.h"
#include "kv/profile.h"
#include "tools/common.h"

namespace dk::cli {

int CmdInfo(int argc, char** argv) {
  std::string model_path, profile_path;
  bool help = false, tensors = false;
  ArgParser p("info", "print a model's metadata, shapes and KV cache bytes per token");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"--profile"}, &profile_path, "FILE",
              "also check a DynaKV profile against the model and print its explained variance per layer and level");
  p.AddFlag({"--tensors"}, &tensors, "also list every tensor with its type and shape");
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("info", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("info", p, InvalidArgument("-m: a model file is required"));
  auto model = Model::Load(model_path);
  if (!model.ok()) return Fail("info", model.status());
  const Model& m = **model;
  const ModelConfig& c = m.config();
  const GgufFile& g = m.gguf();
  std::printf("file            %s (GGUF v%u, %zu bytes, %zu tensors, %zu metadata keys)\n", model_path.c_str(),
              g.version(), g.file_size(), g.tensors().size(), g.metadata().size());
  std::printf("name            %s\narch            %s\n", Printable(c.name).c_str(), c.arch.c_str());
  std::printf("n_vocab         %d\nn_embd          %d\nn_layer         %d\n", c.n_vocab, c.n_embd, c.n_layer);
  std::printf("n_head          %d\nn_head_kv       %d (GQA group %d)\nhead_dim        %d\n", c.n_head, c.n_head_kv,
              c.n_head / c.n_head_kv, c.head_dim);
  std::printf("n_ff            %d\nn_ctx_train     %d\nrope            %s pairs, %d dims, base %g\n", c.n_ff,
              c.n_ctx_train, c.rope_neox ? "neox" : "adjacent", c.n_rot, c.rope_base);
  std::printf("rms_eps         %g\noutput          %s\n", c.rms_eps, c.tied_output ? "tied to token_embd" : "own matrix");
  std::printf("tokenizer       %s, %d tokens, bos %d, eos %d, add_bos %s\n", m.tokenizer().model().c_str(),
              m.tokenizer().vocab_size(), m.tokenizer().bos_id(), m.tokenizer().eos_id(),
              m.tokenizer().add_bos() ? "yes" : "no");
  std::printf("weights         %.2f MiB in memory (matrices as stored)\n", m.weight_bytes() / 1048576.0);
  const KvShape s = c.kv_shape();
  std::printf("kv width D      %d per layer for K and for V (%d KV heads x %d)\n", s.kv_dim(), s.n_head_kv, s.head_dim);
  std::printf("kv bytes/token  %zu (fp16), %zu (fp32)\n", FullKvCache(s, 1, KvDtype::kF16).BytesPerToken(),
              FullKvCache(s, 1, KvDtype::kF32).BytesPerToken());
  std::printf("fingerprint     %016llx\n", static_cast<unsigned long long>(m.fingerprint()));
  if (tensors) {
    for (const GgufTensorInfo& t : g.tensors())
      std::printf("  %-28s %-6s %s\n", Printable(t.name).c_str(), TypeName(static_cast<uint32_t>(t.type)).c_str(),
                  t.shape_string().c_str());
  }
  if (!profile_path.empty()) {
    auto profile = LoadProfile(profile_path);
    if (!profile.ok()) return Fail("info", profile.status());
    if (Status st = CheckProfileMatchesModel(*profile, ModelInfoFor(m, model_path), profile_path); !st.ok())
      return Fail("info", st);
    std::string levels;
    for (int r : profile->levels) {
      if (!levels.empty()) levels += ',';
      levels += std::to_string(r);
    }
    std::printf("profile         %s (%llu bytes, format v%u, calibrated on %lld tokens)\n", profile_path.c_str(),
                static_cast<unsigned long long>(ProfileFileBytes(*profile)), profile->file_version,
                static_cast<long long>(profile->n_calib_tokens));
    std::printf("profile levels  %s\n", levels.c_str());
    if (profile->trained_bases())
      std::printf("profile bases   trained by train-router (Cayley rotations of the PCA bases; eigenvalues are PCA's)\n");
    if (profile->router) {
      const Router& r = *profile->router;
      std::printf("router          hidden width %d, trained for fraction %.4g, budget table of %zu rows\n", r.hidden,
                  r.target, r.budget.size());
      std::printf("router info     %s\n", r.info.c_str());
    }
    std::printf("%s", ExplainedVarianceTable(*profile).c_str());
  }
  return kExitOk;
}

}  // namespace dk::cli
