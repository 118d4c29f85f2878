#include "tools/common.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <thread>

#include "core/mapped_file.h"

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

Status CheckOutputPath(const std::string& path, const char* flag) {
  if (Status s = CheckWritableFile(path); !s.ok()) return InvalidArgument(std::string(flag) + ": " + s.message());
  return Status::Ok();
}

Status CheckOutputFolder(const std::string& dir, const char* flag, const std::string& first_file) {
  namespace fs = std::filesystem;
  if (dir.empty()) return InvalidArgument(std::string(flag) + ": an empty folder name");
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (fs::exists(st) && !fs::is_directory(st)) return InvalidArgument(std::string(flag) + ": " + dir + ": not a folder");
  if (!fs::exists(st) && !fs::create_directories(dir, ec) && ec)
    return InvalidArgument(std::string(flag) + ": " + dir + ": cannot create the folder: " + ec.message());
  return CheckOutputPath((fs::path(dir) / first_file).string(), flag);
}

void WarnAboveTrainingContext(const std::string& command, const Model& model, int n_ctx, const char* flag) {
  if (n_ctx > model.config().n_ctx_train)
    std::fprintf(stderr, "%s: warning: %s %d is above the model's training context (%d)\n", command.c_str(), flag,
                 n_ctx, model.config().n_ctx_train);
}

int DefaultThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

void AddKvFlags(ArgParser& p, KvConfig* kv) {
  std::string methods, wrappers;
  for (const KvMethod* m : KvMethods()) {
    std::string& list = m->is_wrapper() ? wrappers : methods;
    list += (list.empty() ? "" : ", ") + std::string(m->name);
  }
  p.AddString({"--kv"}, &kv->method, "METHOD", "KV cache method: " + methods + " (default full)");
  if (!wrappers.empty())
    p.AddString({"--evict"}, &kv->evict, "METHOD", "evict tokens from the cache: " + wrappers + " (default none)");
  // Each method's flags, once each (methods may share a flag, e.g. --kv-dtype).
  std::vector<std::string> seen;
  for (const KvMethod* m : KvMethods()) {
    for (const KvFlag& f : m->flags) {
      if (std::find(seen.begin(), seen.end(), f.name) != seen.end()) continue;
      seen.push_back(f.name);
      const std::string name = f.name;
      p.AddCallback({name}, f.metavar, f.help, [kv, name](const std::string& value) {
        kv->options.Set(name, value);
        return Status::Ok();
      });
    }
  }
}

Status ValidateKvFlags(const ArgParser& /*p*/, const KvConfig& kv) { return ValidateKvConfig(kv); }

KvModelInfo ModelInfoFor(const Model& model, const std::string& path) {
  return KvModelInfo{model.config().kv_shape(), model.fingerprint(), path};
}

}  // namespace dk::cli
