// Shared helpers for tests: test-data paths, running the CLI, reading reference files.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "ops/qmatmul.h"

namespace dk::test {

inline std::string DataPath(const std::string& name) { return std::string(DK_TEST_DATA) + "/" + name; }

inline std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct CliResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs the built dynakv binary with `args` (already shell-quoted), capturing stdout and stderr.
inline CliResult RunCli(const std::string& args) {
  static int counter = 0;
  const std::string base = ::testing::TempDir() + "dk_cli_" + std::to_string(::getpid()) + "_" + std::to_string(counter++);
  const std::string cmd = std::string(DK_CLI_PATH) + " " + args + " >" + base + ".out 2>" + base + ".err </dev/null";
  const int rc = std::system(cmd.c_str());
  CliResult r;
  r.exit_code = WIFEXITED(rc) ? WEXITSTATUS(rc) : 128 + (WIFSIGNALED(rc) ? WTERMSIG(rc) : 0);
  r.out = ReadText(base + ".out");
  r.err = ReadText(base + ".err");
  std::remove((base + ".out").c_str());
  std::remove((base + ".err").c_str());
  return r;
}

// Starts the built dynakv binary with `args` (already shell-quoted) in the background, its stdout
// and stderr to `log`, stdin from /dev/null, and returns its pid (exec'd by the shell, so signals
// reach dynakv itself), or -1 when fork fails.
inline pid_t SpawnCli(const std::string& args, const std::string& log) {
  const std::string cmd = "exec " + std::string(DK_CLI_PATH) + " " + args + " >" + log + " 2>&1 </dev/null";
  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  return pid;
}

// Parses llama.cpp's running perplexity line "[1]87.8945,[2]65.1777,..." into values.
inline std::vector<double> ParseRunningPpl(const std::string& text) {
  std::vector<double> v;
  size_t p = 0;
  while ((p = text.find('[', p)) != std::string::npos) {
    const size_t close = text.find(']', p);
    if (close == std::string::npos) break;
    v.push_back(std::stod(text.substr(close + 1)));
    p = close + 1;
  }
  return v;
}

// GPT-2's bytes_to_unicode, written independently of the tokenizer: printable bytes stand for
// themselves, the others for U+0100, U+0101, ... in byte order; returned as UTF-8.
inline std::string Gpt2ByteChar(int b) {
  const auto printable = [](int x) { return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255); };
  int cp = b;
  if (!printable(b)) {
    cp = 256;
    for (int x = 0; x < b; ++x) cp += !printable(x);
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Raw bytes in GPT-2's byte-level alphabet.
inline std::string Gpt2Mapped(const std::string& raw) {
  std::string s;
  for (const char c : raw) s += Gpt2ByteChar(static_cast<unsigned char>(c));
  return s;
}

// Restores the process-wide kernel modes (SetActMode, SetDotMaxRows) a test changes, however the
// test ends (a failed ASSERT returns early): the next test in the process sees the defaults.
class KernelModeGuard {
 public:
  KernelModeGuard() : mode_(GetActMode()), rows_(DotMaxRows()) {}
  ~KernelModeGuard() {
    SetActMode(mode_);
    SetDotMaxRows(rows_);
  }
  KernelModeGuard(const KernelModeGuard&) = delete;
  KernelModeGuard& operator=(const KernelModeGuard&) = delete;

 private:
  ActMode mode_;
  int rows_;
};

}  // namespace dk::test
