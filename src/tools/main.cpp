// dynakv: command-line front end. Each subcommand lives in its own cmd_*.cpp.
#include <cstdio>
#include <cstring>
#include <string>

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
               "run 'dynakv <command> --help' for its flags\n");
}

}  // namespace

int main(int argc, char** argv) {
  using namespace dk::cli;
  if (argc < 2) {
    PrintUsage(stderr);
    return kExitUsage;
  }
  const std::string cmd = argv[1];
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
  std::fprintf(stderr, "dynakv: unknown command '%s'\n", cmd.c_str());
  PrintUsage(stderr);
  return kExitUsage;
}
