#include "tools/common.h"

#include <cstdio>
#include <thread>

namespace dk::cli {

int UsageError(const std::string& command, const ArgParser& parser, const Status& status) {
  std::fprintf(stderr, "dynakv %s: %s\n%s", command.c_str(), status.message().c_str(), parser.Usage().c_str());
  return kExitUsage;
}

int Fail(const std::string& command, const Status& status) {
  std::fprintf(stderr, "dynakv %s: error: %s\n", command.c_str(), status.message().c_str());
  return kExitError;
}

int CacheError(const std::string& command, const ArgParser& parser, const Status& status) {
  return status.code() == Code::kInvalidArgument ? UsageError(command, parser, status) : Fail(command, status);
}

int DefaultThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

void AddKvFlags(ArgParser& p, KvConfig* kv) {
  p.AddString({"--kv"}, &kv->method, "METHOD", "KV cache method: full (default) or dynakv");
  p.AddString({"--kv-dtype"}, &kv->dtype, "TYPE", "storage type of cached rows or latents: f16 (default) or f32");
  p.AddString({"--profile"}, &kv->profile_path, "FILE", "dynakv: calibrated profile from 'dynakv calibrate'");
  p.AddString({"--rank-policy"}, &kv->rank_policy, "NAME", "dynakv: uniform (default), energy, or router (a profile from train-router)");
  p.AddInt({"--rank"}, &kv->rank, 1, 1 << 20, "dynakv uniform: rank of every token's latent (1..D)");
  p.AddDouble({"--tau"}, &kv->tau, 0.0, 1.0, "dynakv energy: fraction of each token's latent energy to keep");
  p.AddDouble({"--kv-budget"}, &kv->kv_budget, 1e-6, 1.0, "dynakv: cache bytes as a fraction of the fp16 full cache");
}

Status ValidateKvFlags(const ArgParser& p, const KvConfig& kv) {
  if (kv.method == "full") {
    for (const char* f : {"--profile", "--rank-policy", "--rank", "--tau", "--kv-budget"})
      if (p.WasSet(f)) return InvalidArgument(std::string(f) + ": only meaningful with --kv dynakv");
  }
  return Status::Ok();
}

KvModelInfo ModelInfoFor(const Model& model, const std::string& path) {
  return KvModelInfo{model.config().kv_shape(), model.fingerprint(), path};
}

}  // namespace dk::cli
