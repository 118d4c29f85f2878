// dynakv: command-line front end. Each subcommand lives in its own cmd_*.cpp.
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "core/env.h"
#include "tools/common.h"

namespace {

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "usage: dynakv <command> [flags]\n"
               "commands:\n"
               "  info        model metadata, shapes and KV bytes per token (--profile: explained variance)\n"
               "  generate    generate text from a prompt\n"
               "  perplexity  perplexity of a text file, as llama.cpp's perplexity tool computes it\n"
               "  calibrate   fit a DynaKV profile (joint PCA bases of keys and values) on calibration text\n"
               "  train-router  train DynaKV's token-wise rank router by distillation; writes a profile\n"
               "  rankmap     an HTML page of a text coloured by the ranks DynaKV gives each token\n"
               "  passkey     passkey retrieval accuracy (a key hidden in a haystack of text), any KV cache\n"
               "  eval        compare KV methods at equal cache fractions (perplexity/KL, passkey, speed)\n"
               "  export-profile  a profile as safetensors + JSON for PyTorch serving engines\n"
               "  serve       an HTTP server with OpenAI's API (completions, chat, streaming), S slots\n"
               "  make-gguf   a random-weight Llama GGUF of a real model's shapes and type (speed measurements)\n"
               "run 'dynakv <command> --help' for its flags\n");
}

}  // namespace

namespace {

int Dispatch(int argc, char** argv) {
  using namespace dk::cli;
  if (argc < 2) {
    PrintUsage(stderr);
    return kExitUsage;
  }
  const std::string cmd = argv[1];
  // A malformed DYNAKV_* variable would be ignored where it is read: refuse it first.
  if (const std::vector<std::string> bad = dk::EnvironmentProblems(); !bad.empty()) {
    for (const std::string& m : bad) std::fprintf(stderr, "dynakv: error in the environment: %s\n", m.c_str());
    return kExitUsage;
  }
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    PrintUsage(stdout);
    return kExitOk;
  }
  if (cmd == "info") return CmdInfo(argc, argv);
  if (cmd == "generate") return CmdGenerate(argc, argv);
  if (cmd == "perplexity") return CmdPerplexity(argc, argv);
  if (cmd == "calibrate") return CmdCalibrate(argc, argv);
  if (cmd == "train-router") return CmdTrainRouter(argc, argv);
  if (cmd == "rankmap") return CmdRankmap(argc, argv);
  if (cmd == "passkey") return CmdPasskey(argc, argv);
  if (cmd == "eval") return CmdEval(argc, argv);
  if (cmd == "export-profile") return CmdExportProfile(argc, argv);
  if (cmd == "serve") return CmdServe(argc, argv);
  if (cmd == "make-gguf") return CmdMakeGguf(argc, argv);
  std::fprintf(stderr, "dynakv: unknown command '%s'\n", cmd.c_str());
  PrintUsage(stderr);
  return kExitUsage;
}

}  // namespace

// The library reports failures as Status; what can still escape is the standard library's own
// (an allocation the checks before it did not foresee): it ends the run with a message and exit
// code 1, never an abort.
int main(int argc, char** argv) {
  try {
    return Dispatch(argc, argv);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "dynakv: error: out of memory (try a smaller -c, -b or --batch, or a smaller text)\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dynakv: error: %s\n", e.what());
  }
  return dk::cli::kExitError;
}
