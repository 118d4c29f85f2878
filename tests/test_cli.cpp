// The dynakv binary on good and bad input: exit codes (0 ok, 1 error, 2 usage) and messages.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>
#include <thread>
#include <vector>

#include "test_util.h"

namespace dk {
namespace {

using test::DataPath;
using test::RunCli;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kBrown = DataPath("brown-kjv-llama-6M-f32.gguf");
const std::string kStories = DataPath("stories260K.gguf");

int CountLines(const std::string& s, const std::string& needle) {
  int n = 0;
  for (size_t p = 0; (p = s.find(needle, p)) != std::string::npos; ++p) ++n;
  return n;
}

TEST(Cli, InfoPrintsShapesAndKvBytes) {
  auto r = RunCli("info -m " + kBrown);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("n_head_kv       2"));
  EXPECT_THAT(r.out, HasSubstr("kv bytes/token  3072 (fp16), 6144 (fp32)"));
}

TEST(Cli, InfoListsTensorBytesAndTotalsByType) {
  auto r = RunCli("info -m " + kStories);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("mapped          "));
  EXPECT_THAT(r.out, HasSubstr("weights stored  "));
  EXPECT_THAT(r.out, HasSubstr("kv fp16 formula 2 x 5 layers x 4 KV heads x 8 x 2 bytes = 640 bytes/token"));
  // token_embd.weight of stories260K: f32 [64, 512] = 131072 bytes.
  EXPECT_THAT(r.out, ::testing::ContainsRegex("token_embd.weight +f32 +\\[64, 512\\] +131072"));
}

// make-gguf: a tiny custom shape in every type loads, generates, and info reports its shapes.
TEST(Cli, MakeGgufRoundTrips) {
  for (const char* type : {"f32", "f16", "q8_0", "q4_0"}) {
    const std::string out = ::testing::TempDir() + "dk_make_" + std::to_string(::getpid()) + "_" + type + ".gguf";
    auto r = RunCli("make-gguf -o " + out + " --shape custom --layers 2 --type " + type +
                    " --n-embd 64 --n-ff 96 --n-head 4 --n-head-kv 2 --n-vocab 300 --seed 7");
    ASSERT_EQ(r.exit_code, 0) << type << ": " << r.err;
    auto info = RunCli("info -m " + out);
    ASSERT_EQ(info.exit_code, 0) << type << ": " << info.err;
    EXPECT_THAT(info.out, HasSubstr("n_embd          64")) << type;
    EXPECT_THAT(info.out, HasSubstr("n_layer         2")) << type;
    EXPECT_THAT(info.out, HasSubstr("n_head_kv       2 (GQA group 2)")) << type;
    EXPECT_THAT(info.out, HasSubstr("n_ff            96")) << type;
    EXPECT_THAT(info.out, HasSubstr("n_vocab         300")) << type;
    EXPECT_THAT(info.out, HasSubstr("blk.1.ffn_down.weight")) << type;
    EXPECT_THAT(info.out, HasSubstr(type)) << type;
    auto gen = RunCli("generate -m " + out + " -p 'Once upon a time' -n 8 --temp 0 -t 2");
    EXPECT_EQ(gen.exit_code, 0) << type << ": " << gen.err;
    std::remove(out.c_str());
  }
}

TEST(Cli, MakeGgufRefusesBadShapesAndTypes) {
  const std::string out = ::testing::TempDir() + "dk_make_bad_" + std::to_string(::getpid()) + ".gguf";
  EXPECT_EQ(RunCli("make-gguf -o " + out + " --shape gpt5").exit_code, 2);
  EXPECT_EQ(RunCli("make-gguf -o " + out + " --shape custom --layers 1").exit_code, 2);
  EXPECT_EQ(RunCli("make-gguf -o " + out + " --shape llama2-7b --type q3_k").exit_code, 2);
  auto r = RunCli("make-gguf -o " + out + " --shape custom --layers 1 --n-embd 48 --n-ff 96 --n-head 4 --n-vocab 300 "
                  "--type q4_0");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("multiples of 32"));
  EXPECT_EQ(RunCli("make-gguf --shape llama2-7b").exit_code, 2);  // no -o
  EXPECT_FALSE(std::ifstream(out).good());
}

TEST(Cli, MakeGgufChecksFreeSpaceFirst) {
  // 4000 layers of llama3-8b in f32 is about 3.5 TB: more than a test machine has. When
  // there is that much room the check cannot be shown this way: skip.
  const std::string out = ::testing::TempDir() + "dk_make_big_" + std::to_string(::getpid()) + ".gguf";
  auto r = RunCli("make-gguf -o " + out + " --shape llama3-8b --type f32 --layers 4000");
  if (r.exit_code == 0) {
    std::remove(out.c_str());
    GTEST_SKIP() << "this machine had room for it";
  }
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("are free in"));
  EXPECT_FALSE(std::ifstream(out).good());
}

// make-gguf killed while it writes (Ctrl-C, SIGTERM) leaves neither the output nor a temporary
// file behind; it left OUT.tmp-<pid> files of hundreds of MB.
TEST(Cli, MakeGgufKilledMidwayLeavesNothing) {
  for (const int sig : {SIGINT, SIGTERM}) {
    SCOPED_TRACE(sig == SIGINT ? "SIGINT" : "SIGTERM");
    const std::string dir = ::testing::TempDir() + "dk_make_kill_" + std::to_string(::getpid()) + "_" +
                            std::to_string(sig);
    ASSERT_TRUE(std::filesystem::create_directories(dir));
    const std::string out = dir + "/out.gguf", log = dir + ".log";
    // 1.24 GiB (about 3 s to write here): the kill comes while the tensors are being written.
    const pid_t pid = test::SpawnCli("make-gguf -o " + out + " --shape llama2-7b --type f16 --layers 2", log);
    ASSERT_GE(pid, 0);
    // Its announcement comes after the checks, just before the writing starts.
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (test::ReadText(log).find("make-gguf: llama2-7b") == std::string::npos &&
           std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "make-gguf ended before the kill (exit " << WEXITSTATUS(status)
                                     << "): nothing was shown\n" << test::ReadText(log);
    std::vector<std::string> left;
    for (const auto& e : std::filesystem::directory_iterator(dir)) left.push_back(e.path().filename().string());
    EXPECT_THAT(left, ::testing::IsEmpty());
    std::filesystem::remove_all(dir);
    std::remove(log.c_str());
  }
}

// One rule for outputs that cannot be written (README, "Exit codes"): refused before the work with
// exit 2, naming the flag, the path and the reason. eval --results and export-profile -o exited 1,
// export-profile without the reason.
TEST(Cli, UnwritableOutputsAreUsageErrorsWithTheReason) {
  const std::string profile = DataPath("stories260K-v1.dkv"), text = DataPath("valid.txt");
  const std::string file = ::testing::TempDir() + "dk_cli_not_a_folder_" + std::to_string(::getpid());
  std::ofstream(file) << "x";
  struct Case {
    std::string args, needle;
  } cases[] = {
      {"export-profile " + profile + " -o /sys/dk-x", "-o: /sys/dk-x: cannot create the folder: "},
      {"export-profile " + profile + " -o /sys", "-o: /sys/dynakv.safetensors: cannot write in folder '/sys': "},
      {"export-profile " + profile + " -o " + file, "-o: " + file + ": not a folder"},
      {"eval -m " + kStories + " -f " + text + " --profile " + profile + " --results /sys",
       "--results: /sys/stories260K: cannot create the folder: "},
      {"eval -m " + kStories + " -f " + text + " --profile " + profile + " --results " + file,
       "--results: " + file + "/stories260K: cannot create the folder: "},
      {"calibrate -m " + kStories + " -f " + text + " -o /sys/x.dkv", "-o: /sys/x.dkv: cannot write in folder '/sys': "},
      {"passkey -m " + kStories + " -f " + text + " --json /sys/x.json", "--json: /sys/x.json: cannot write in folder"},
  };
  for (const Case& c : cases) {
    const auto r = RunCli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.needle)) << c.args;
    // The reason follows the needle (a strerror text), and the usage follows the one line.
    const size_t at = r.err.find(c.needle);
    if (at != std::string::npos && c.needle.back() == ' ') {
      EXPECT_TRUE(std::isalpha(static_cast<unsigned char>(r.err[at + c.needle.size()]))) << r.err;
    }
    EXPECT_THAT(r.err, HasSubstr("usage: dynakv")) << c.args;
  }
  std::remove(file.c_str());
}

TEST(Cli, UnknownFlagIsOneLineAndExit2) {
  for (const char* cmd : {"info", "generate", "perplexity"}) {
    auto r = RunCli(std::string(cmd) + " -m " + kStories + " --frobnicate 3");
    EXPECT_EQ(r.exit_code, 2) << cmd;
    EXPECT_THAT(r.err, HasSubstr("unknown flag '--frobnicate'")) << cmd;
    EXPECT_EQ(CountLines(r.err, "frobnicate"), 1) << r.err;
    EXPECT_THAT(r.err, HasSubstr("usage: dynakv " + std::string(cmd)));
  }
}

// A malformed DYNAKV_* variable is refused before any command runs (exit 2, naming the variable,
// the value and what it accepts); it was ignored or misread where it was used
// (DYNAKV_DOT_MAX_ROWS=abc meant 0). Well-formed values run.
TEST(Cli, MalformedEnvironmentVariablesAreRefusedFirst) {
  struct Unset {  // leaves the test process's environment as it found it
    std::string name;
    ~Unset() { ::unsetenv(name.c_str()); }
  };
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {"DYNAKV_DOT_MAX_ROWS", "abc", "4"}, {"DYNAKV_DOT_MAX_ROWS", "-3", "0"},
      {"DYNAKV_BLAS_THREADS", "2x", "1"},  {"DYNAKV_BLAS_THREADS", "99999", "0"},
      {"DYNAKV_ACTS", "f16", "f32"},       {"DYNAKV_ISA", "sse2", "scalar"}};
  for (const auto& [name, bad, good] : cases) {
    const Unset guard{name};
    ASSERT_EQ(::setenv(name.c_str(), bad.c_str(), 1), 0);
    auto r = RunCli("info -m " + kStories);
    EXPECT_EQ(r.exit_code, 2) << name << "=" << bad << ": " << r.err;
    EXPECT_THAT(r.err, HasSubstr(name + ": expected ")) << r.err;
    EXPECT_THAT(r.err, HasSubstr("found '" + bad + "'")) << r.err;
    ASSERT_EQ(::setenv(name.c_str(), good.c_str(), 1), 0);
    r = RunCli("info -m " + kStories);
    EXPECT_EQ(r.exit_code, 0) << name << "=" << good << ": " << r.err;
  }
}

TEST(Cli, BadValuesNameTheFlag) {
  struct Case {
    std::string args, needle;
  } cases[] = {
      {"perplexity -m " + kStories + " -f x -c abc", "-c: expected an integer"},
      {"perplexity -m " + kStories + " -f x -c 0", "-c: expected an integer in [4,"},
      {"generate -m " + kStories + " -p hi --temp -1", "--temp: expected a number"},
      {"generate -m " + kStories + " -p hi --top-p 2", "--top-p: expected a number"},
      {"generate -m " + kStories + " -p hi -t", "-t: missing value"},
      {"generate -m " + kStories + " -p hi --seed -5", "--seed: expected a non-negative integer"},
      {"generate -m " + kStories, "-p: give exactly one of"},
      {"perplexity -f x", "-m: a model file is required"},
      {"generate -m " + kStories + " -p hi --rank 8", "--rank: only meaningful with --kv dynakv"},
      {"frobnicate", "unknown command 'frobnicate'"},
      // Ranges print their bounds as written: integers as integers (they printed as 1.67772e+07).
      {"train-router --checkpoint-every 0", "--checkpoint-every: expected an integer in [1, 16777216], found '0'"},
      {"serve -n 0", "-n: expected an integer in [1, 16777216], found '0'"},
      {"generate -m " + kStories + " -p hi --top-p 2", "--top-p: expected a number in [0, 1], found '2'"},
      {"generate -m " + kStories + " -p hi --kv dynakv --profile " + DataPath("stories260K-v1.dkv") +
           " --latent-group -1",
       "--latent-group: expected an integer in [0, 1048576], found '-1'"},
  };
  for (const Case& c : cases) {
    auto r = RunCli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.needle)) << c.args;
  }
}

TEST(Cli, MissingFileIsAnErrorNamingIt) {
  auto r = RunCli("info -m /nonexistent/model.gguf");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/model.gguf"));
  EXPECT_THAT(r.err, HasSubstr("No such file"));
  r = RunCli("perplexity -m " + kStories + " -f /nonexistent/text.txt");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/text.txt"));
}

TEST(Cli, NonGgufFileIsRejected) {
  const std::string path = ::testing::TempDir() + "not_a_model.gguf";
  std::ofstream(path) << "this is plain text, not a GGUF model file at all\n";
  for (const char* cmd : {"info", "generate -p hi", "perplexity -f " }) {
    std::string args = std::string(cmd) + " -m " + path;
    if (std::string(cmd).rfind("perplexity", 0) == 0) args = "perplexity -f " + DataPath("valid.txt") + " -m " + path;
    auto r = RunCli(args);
    EXPECT_EQ(r.exit_code, 1) << args;
    EXPECT_THAT(r.err, HasSubstr(path)) << args;
    EXPECT_THAT(r.err, HasSubstr("magic")) << args;
  }
}

TEST(Cli, PromptLongerThanContextIsAnError) {
  auto r = RunCli("generate -m " + kStories + " -c 8 -n 4 -p 'Once upon a time there was a little girl named Lily who'");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("more than the context size 8"));
}

TEST(Cli, TextTooShortForPerplexityIsAnError) {
  const std::string path = ::testing::TempDir() + "short.txt";
  std::ofstream(path) << "In the beginning.";
  auto r = RunCli("perplexity -m " + kStories + " -f " + path + " -c 128");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("at least 2 * n_ctx"));
}

TEST(Cli, GreedyGenerationPrintsTextAndSpeeds) {
  auto r = RunCli("generate -m " + kStories + " -p 'Once upon a time' -n 16 --temp 0 -t 2");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The prompt and the answer as text: no "<s>" (control tokens are not text, as llama.cpp prints them).
  EXPECT_EQ(r.out.rfind(" Once upon a time, there was a little girl named Lily.", 0), 0u) << r.out;
  EXPECT_THAT(r.out, Not(HasSubstr("<s>")));
  EXPECT_THAT(r.err, HasSubstr("prefill: 5 tokens"));
  EXPECT_THAT(r.err, HasSubstr("decode:  15 tokens"));
  EXPECT_THAT(r.err, HasSubstr("tokens/s"));
}

TEST(Cli, SamplingIsReproducibleWithASeed) {
  const std::string args = "generate -m " + kStories + " -p 'Once upon a time' -n 24 --temp 1.0 --seed 42";
  auto a = RunCli(args), b = RunCli(args), c = RunCli(args + "1");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);
}

TEST(Cli, DynaKvFlagErrorsAreUsageErrors) {
  struct Case {
    std::string args, needle;
  } cases[] = {
      {"--kv dynakv --rank 8", "--profile: dynakv needs a calibrated profile"},
      {"--kv frobnicate", "--kv: unknown cache method 'frobnicate'"},
      {"--kv-dtype f8", "--kv-dtype: expected f16 or f32"},
  };
  for (const Case& c : cases) {
    auto r = RunCli("perplexity -m " + kStories + " -f " + DataPath("valid.txt") + " -c 128 " + c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.needle)) << c.args;
  }
}

TEST(Cli, PerplexityEndsWithThePplLine) {
  auto r = RunCli("perplexity -m " + kStories + " -f " + DataPath("valid.txt") + " -c 128 --chunks 4 -t 2");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("[1]"));
  EXPECT_THAT(r.out, HasSubstr("KV fraction = 1.0000"));
  const std::string last = r.out.substr(r.out.rfind("PPL = "));
  EXPECT_EQ(last.find('\n'), last.size() - 1) << "PPL line must be last: " << r.out;
  EXPECT_THAT(r.err, HasSubstr("perplexity ["));  // progress bar
}

// Runs the dynakv binary with `args` (no shell), stdout to `out_path`; returns the exit code and,
// in *max_rss_kb, the child's peak resident memory (wait4's ru_maxrss, kB).
int RunCliMeasured(const std::vector<std::string>& args, const std::string& out_path, long* max_rss_kb) {
  std::vector<char*> argv;
  std::string bin = DK_CLI_PATH;
  argv.push_back(bin.data());
  std::vector<std::string> copy = args;
  for (std::string& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int null = ::open("/dev/null", O_RDWR);
    ::dup2(out, 1);
    ::dup2(null, 2);
    ::dup2(null, 0);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  int status = 0;
  struct rusage ru {};
  if (pid < 0 || ::wait4(pid, &status, 0, &ru) != pid) return -1;
  *max_rss_kb = ru.ru_maxrss;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// A 48 MB text with --chunks 1: only the tokens of the first chunks are made. Tokenizing the whole
// text first took about 43 bytes per byte of it (2 GB here, 40 GB near the 1 GiB cap); now the
// peak resident memory it adds stays below a quarter of the text's size, and the result is the one of the
// text's first 600 kB alone (the file starts with valid.txt).
TEST(Cli, PerplexityOfAHugeTextWithFewChunksUsesMemoryForThoseChunksOnly) {
  const std::string valid = test::ReadText(DataPath("valid.txt"));
  const std::string path = ::testing::TempDir() + "dk_huge_" + std::to_string(::getpid()) + ".txt";
  const size_t kBytes = size_t{48} << 20;
  {
    std::ofstream out(path, std::ios::binary);
    for (size_t n = 0; n < kBytes; n += valid.size()) out << valid;
  }
  const std::string out_path = path + ".out";
  long rss_kb = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = RunCliMeasured({"perplexity", "-m", kStories, "-f", path, "-c", "128", "--chunks", "1", "-t", "2"},
                                out_path, &rss_kb);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string out = test::ReadText(out_path);
  std::remove(path.c_str());
  std::remove(out_path.c_str());
  ASSERT_EQ(rc, 0) << out;
  // The same command on valid.txt alone (600 kB) is the baseline: the process's own footprint
  // (binary, model, and under ASan its shadow memory and quarantine) is in both, so what the
  // 48 MB text adds is the difference, and it must stay well below the text's size.
  const std::string small_path = path + ".small.out";
  long small_rss_kb = 0;
  const int small_rc = RunCliMeasured(
      {"perplexity", "-m", kStories, "-f", DataPath("valid.txt"), "-c", "128", "--chunks", "1", "-t", "2"},
      small_path, &small_rss_kb);
  const std::string small_out = test::ReadText(small_path);
  std::remove(small_path.c_str());
  ASSERT_EQ(small_rc, 0) << small_out;
  std::printf("perplexity --chunks 1 of %zu bytes: peak RSS %ld kB (%ld kB for valid.txt alone), %.2f s\n", kBytes,
              rss_kb, small_rss_kb, secs);
  EXPECT_LT((rss_kb - small_rss_kb) * 1024L, static_cast<long>(kBytes / 4))
      << "resident memory the 48 MB text added to the run";
  const auto ppl_line = [](const std::string& s) { return s.substr(s.rfind("PPL = ")); };
  EXPECT_EQ(ppl_line(out), ppl_line(small_out));
  EXPECT_EQ(out.substr(0, out.find('\n')), small_out.substr(0, small_out.find('\n')));  // [1]...
}

// Every command that writes a file checks where before the work that produces it (once, calibrate
// found out only after the whole calibration, and named its temporary file).
TEST(Cli, OutputPathsAreCheckedFirstAndNamed) {
  const std::string dir = ::testing::TempDir() + "dk_cli_out_" + std::to_string(::getpid());
  const std::string text = DataPath("valid.txt");
  struct Case {
    std::string args, needle;
  } cases[] = {
      {"calibrate -m " + kStories + " -f " + text + " -o " + dir + "/missing/p.dkv",
       "-o: " + dir + "/missing/p.dkv: folder '" + dir + "/missing' does not exist"},
      {"calibrate -m " + kStories + " -f " + text + " -o /sys/p.dkv", "-o: /sys/p.dkv: cannot write in folder '/sys'"},
      {"calibrate -m " + kStories + " -f " + text + " -o " + ::testing::TempDir(), "is a folder"},
      {"calibrate -m " + kStories + " -f " + text + " -o /dev/null", "-o: /dev/null: exists and is not a regular file"},
      {"passkey -m " + kStories + " -f " + text + " --json " + dir + "/missing/p.json", "--json: " + dir + "/missing"},
      {"train-router -m " + kStories + " --profile " + DataPath("stories260K-v1.dkv") + " -f " + text + " -o " +
           ::testing::TempDir() + "r.dkv --log " + dir + "/missing/log",
       "--log: " + dir + "/missing/log"},
  };
  for (const Case& c : cases) {
    auto r = RunCli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.needle)) << c.args;
    EXPECT_EQ(r.out.find("calibrated on"), std::string::npos) << c.args;
  }
}

TEST(Cli, ContextAboveTheTrainingContextIsAWarning) {
  auto r = RunCli("generate -m " + kStories + " -p hi -n 2 --temp 0 -c 4096");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("generate: warning: -c 4096 is above the model's training context (2048)"));
  r = RunCli("generate -m " + kStories + " -p hi -n 2 --temp 0 -c 2048");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.find("warning"), std::string::npos) << r.err;
}

}  // namespace
// `info --tc` prints the code each profile level stands for: non-decreasing bytes within 2 r, and
// the last level (r = D) codes every coordinate.
TEST(Cli, InfoTcPrintsEachLevelsCode) {
  auto r = RunCli("info -m " + kStories + " --profile " + DataPath("stories260K-v1.dkv") + " --tc");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const size_t at = r.out.find("layer kv      r  bytes coords  widths\n");
  ASSERT_NE(at, std::string::npos) << r.out;
  std::istringstream in(r.out.substr(at));
  std::string line;
  std::getline(in, line);
  int rows = 0, last_bytes = -1, last_layer = -1;
  char last_kv = 0;
  while (std::getline(in, line)) {
    int layer = 0, rank = 0, bytes = 0, coords = 0;
    char kv = 0;
    ASSERT_EQ(std::sscanf(line.c_str(), "%d %c %d %d %d", &layer, &kv, &rank, &bytes, &coords), 5) << line;
    if (layer != last_layer || kv != last_kv) last_bytes = -1;
    EXPECT_LE(bytes, 2 * rank) << line;
    EXPECT_GE(bytes, last_bytes) << line;
    EXPECT_LE(coords, 32) << line;  // D = 4 KV heads x 8
    if (rank == 32) {
      EXPECT_EQ(coords, 32) << line;
    }
    last_bytes = bytes;
    last_layer = layer;
    last_kv = kv;
    ++rows;
  }
  EXPECT_GT(rows, 0);
  const auto bad = RunCli("info -m " + kStories + " --tc");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_THAT(bad.err, HasSubstr("--tc: needs --profile"));
}

}  // namespace dk
