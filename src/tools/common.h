// Pieces shared by the CLI subcommands: flag groups, exit-code policy, model loading.
#pragma once

#include <memory>
#include <string>

#include "core/status.h"
#include "kv/registry.h"
#include "model/llama.h"
#include "tools/args.h"

namespace dk::cli {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;  // the command ran and failed (bad file, I/O, ...)
constexpr int kExitUsage = 2;  // bad flags or values

// Prints "dynakv <cmd>: <message>" and the usage to stderr; returns kExitUsage.
int UsageError(const std::string& command, const ArgParser& parser, const Status& status);
// Prints "dynakv <cmd>: error: <message>" to stderr; returns kExitError.
int Fail(const std::string& command, const Status& status);

// A failed cache creation: a bad flag value (kInvalidArgument) is a usage error, the rest fail.
int CacheError(const std::string& command, const ArgParser& parser, const Status& status);

// The file a flag names (-o, --json, --log, ...) can be written: checked before the work that
// produces it (a calibration, hours of training). InvalidArgument naming the flag and the path.
Status CheckOutputPath(const std::string& path, const char* flag);
// The same for a folder a flag names (eval --results, export-profile -o): created (with its parents)
// when missing, then `first_file` in it must be writable. InvalidArgument naming the flag, the
// folder and the reason, so every output that cannot be written is the same usage error (exit 2).
Status CheckOutputFolder(const std::string& dir, const char* flag, const std::string& first_file);
// A warning on stderr when a context size is above what the model was trained on.
void WarnAboveTrainingContext(const std::string& command, const Model& model, int n_ctx, const char* flag = "-c");

int DefaultThreads();
void AddKvFlags(ArgParser& p, KvConfig* kv);
// Cross-flag checks of the KV options (e.g. --rank only with uniform). InvalidArgument names the flag.
Status ValidateKvFlags(const ArgParser& p, const KvConfig& kv);
KvModelInfo ModelInfoFor(const Model& model, const std::string& path);

int CmdInfo(int argc, char** argv);
int CmdGenerate(int argc, char** argv);
int CmdPerplexity(int argc, char** argv);
int CmdCalibrate(int argc, char** argv);
int CmdTrainRouter(int argc, char** argv);
int CmdRankmap(int argc, char** argv);
int CmdEval(int argc, char** argv);
int CmdExportProfile(int argc, char** argv);
int CmdPasskey(int argc, char** argv);
int CmdServe(int argc, char** argv);
int CmdMakeGguf(int argc, char** argv);

}  // namespace dk::cli
