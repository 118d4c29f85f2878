// dynakv info: what a model file holds and what its KV cache costs per token.
#include <cstdio>
#include <map>
#include <utility>

#include "kv/dynakv_cache.h"
#include "kv/full_cache.h"
#include "kv/profile.h"
#include "tools/common.h"

namespace dk::cli {

int CmdInfo(int argc, char** argv) {
  std::string model_path, profile_path;
  bool help = false, tensors = false, tc = false;
  ArgParser p("info", "print a model's metadata, shapes and KV cache bytes per token");
  p.AddString({"-m", "--model"}, &model_path, "FILE", "GGUF model file (required)");
  p.AddString({"--profile"}, &profile_path, "FILE",
              "also check a DynaKV profile against the model and print its explained variance per layer and level");
  p.AddFlag({"--tc"}, &tc,
            "with --profile: the rank x precision code each level stands for (--kv-dtype tc), per layer for K and V");
  p.AddFlag({"--tensors"}, &tensors, "accepted for old scripts: the tensor table is always printed");
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("info", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("info", p, InvalidArgument("-m: a model file is required"));
  if (tc && profile_path.empty()) return UsageError("info", p, InvalidArgument("--tc: needs --profile FILE (the codes come from its eigenvalues)"));
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
  // The full fp16 cache, from the hyperparameters: K and V, every layer, every KV head.
  const unsigned long long kv_formula = 2ull * c.n_layer * c.n_head_kv * c.head_dim * 2ull;
  std::printf("kv fp16 formula 2 x %d layers x %d KV heads x %d x 2 bytes = %llu bytes/token\n", c.n_layer,
              c.n_head_kv, c.head_dim, kv_formula);
  std::printf("mapped          %zu bytes (%.2f MiB: the file, memory-mapped)\n", g.file_size(),
              g.file_size() / 1048576.0);
  // Weight bytes as stored in the file, by tensor type (type id order).
  std::map<uint32_t, std::pair<size_t, size_t>> by_type;  // type -> (tensors, bytes)
  size_t stored = 0;
  for (const GgufTensorInfo& t : g.tensors()) {
    auto& e = by_type[static_cast<uint32_t>(t.type)];
    ++e.first;
    e.second += t.nbytes;
    stored += t.nbytes;
  }
  std::printf("weights stored  %zu bytes (%.2f MiB)", stored, stored / 1048576.0);
  for (const auto& [type, e] : by_type)
    std::printf("%s %s %zu bytes in %zu tensors", type == by_type.begin()->first ? ":" : ",", TypeName(type).c_str(),
                e.second, e.first);
  std::printf("\n");
  std::printf("fingerprint     %016llx\n", static_cast<unsigned long long>(m.fingerprint()));
  (void)tensors;
  std::printf("tensors         name, type, shape (ggml order), bytes\n");
  for (const GgufTensorInfo& t : g.tensors())
    std::printf("  %-28s %-6s %-20s %zu\n", Printable(t.name).c_str(), TypeName(static_cast<uint32_t>(t.type)).c_str(),
                t.shape_string().c_str(), t.nbytes);
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
      std::printf("router          hidden width %d, trained for fraction %.4g (%s latents), budget table of %zu rows\n",
                  r.hidden, r.target, profile->tc_router() ? "tc" : "fp16", r.budget.size());
      std::printf("router info     %s\n", r.info.c_str());
    }
    std::printf("%s", ExplainedVarianceTable(*profile).c_str());
    if (tc) {
      const int D = s.kv_dim();
      if (D % 8 != 0) return Fail("info", InvalidArgument("--tc: tc latents need D % 8 == 0, the model has D = " +
                                                          std::to_string(D)));
      std::printf("tc codes: rank r stands for at most 2 r bytes; bits per group of %d coordinates\n", kTcGroup);
      std::printf("layer kv      r  bytes coords  widths\n");
      for (int l = 0; l < c.n_layer; ++l)
        for (int which = 0; which < 2; ++which) {
          const TcCodebook cb = MakeTcCodebook(which == 0 ? profile->k[l] : profile->v[l], D);
          for (int r : profile->levels) {
            const TcAllocation& a = cb.ladder[r - 1];
            std::string widths;
            for (int i = 0; i < a.active; ++i) widths += (i ? "," : "") + std::to_string(a.bits[i]);
            std::printf("%5d  %c %6d %6d %6d  %s\n", l, which == 0 ? 'K' : 'V', r, a.bytes, a.coords, widths.c_str());
          }
        }
    }
  }
  return kExitOk;
}

}  // namespace dk::cli
