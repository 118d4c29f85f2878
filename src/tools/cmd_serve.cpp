// dynakv serve: flags, signals, and the server's life (src/serve/ does the serving).
#include <fcntl.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <thread>

#include "serve/chat_template.h"
#include "serve/server.h"
#include "tools/common.h"

namespace dk::cli {
namespace {

// SIGTERM/SIGINT only write a byte to this pipe (async-signal-safe); a thread reads it and
// shuts the server down, whichever thread the signal interrupted.
int g_signal_pipe[2] = {-1, -1};

extern "C" void OnStopSignal(int) {
  const char c = 1;
  const ssize_t ignored = write(g_signal_pipe[1], &c, 1);
  (void)ignored;
}

Status InstallStopSignals() {
  if (pipe(g_signal_pipe) != 0) return IoError("serve: cannot create the signal pipe");
  fcntl(g_signal_pipe[0], F_SETFD, FD_CLOEXEC);
  fcntl(g_signal_pipe[1], F_SETFD, FD_CLOEXEC);
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  return Status::Ok();
}

// Waits for a signal (byte 1) or for the end of main (byte 0), then stops the server.
void WatchSignals(Server* server) {
  char c = 0;
  while (read(g_signal_pipe[0], &c, 1) < 0 && errno == EINTR) {
  }
  if (c != 1) return;
  std::fprintf(stderr, "dynakv serve: shutting down\n");
  server->Stop();
}

void AddServeFlags(ArgParser& p, ServerOptions& o, std::string* model_path, int* max_body) {
  p.AddString({"-m", "--model"}, model_path, "FILE", "GGUF model file (required)");
  p.AddString({"--host"}, &o.host, "ADDR", "address to listen on (default 127.0.0.1)");
  p.AddInt({"--port"}, &o.port, 0, 65535, "port to listen on; 0 = any free port, printed (default 8080)");
  p.AddInt({"-np", "--parallel"}, &o.n_slots, 1, 256, "slots: requests served at once, each with its own cache (default 1)");
  p.AddInt({"-c", "--ctx-size"}, &o.n_ctx, 1, 1 << 24, "tokens each slot's cache holds (default: the model's context)");
  p.AddInt({"--queue"}, &o.queue, 0, 4096, "requests that may wait for a slot; more get 503 (default 16)");
  p.AddDouble({"--timeout"}, &o.timeout_s, 0.001, 1e7, "seconds a request may take, queue included (default 600)");
  p.AddInt({"--max-body"}, max_body, 16, 1 << 30, "largest request body in bytes; larger get 413 (default 1048576)");
  p.AddInt({"-t", "--threads"}, &o.threads, 1, 1024, "threads for the forward passes (default: all cores)");
  p.AddInt({"-b", "--batch-size"}, &o.n_batch, 1, 1 << 16, "prompt tokens per forward pass (default 512)");
  p.AddInt({"-n", "--n-predict"}, &o.max_tokens, 1, 1 << 24, "most tokens a request may generate, and the default max_tokens (default 256)");
  p.AddString({"--chat-template"}, &o.chat_template, "NAME",
              "chat prompt format instead of the model's: " + ChatFamilyNames() + ", mistral");
  p.AddString({"-a", "--alias"}, &o.model_id, "NAME", "model name in responses (default: the file name)");
  p.AddDouble({"--grace"}, &o.grace_s, 0.0, 3600.0, "on SIGTERM/SIGINT, seconds running requests may finish (default 5)");
}

}  // namespace

int CmdServe(int argc, char** argv) {
  ServerOptions opt;
  opt.threads = DefaultThreads();
  std::string model_path;
  int max_body = 1 << 20;
  bool help = false;
  KvConfig kv;
  ArgParser p("serve", "an HTTP server with OpenAI's API (/v1/completions, /v1/chat/completions), S slots");
  AddServeFlags(p, opt, &model_path, &max_body);
  AddKvFlags(p, &kv);
  p.AddFlag({"-h", "--help"}, &help, "show this help");
  if (Status s = p.Parse(argc, argv, 2); !s.ok()) return UsageError("serve", p, s);
  if (help) {
    std::printf("%s", p.Usage().c_str());
    return kExitOk;
  }
  if (model_path.empty()) return UsageError("serve", p, InvalidArgument("-m: a model file is required"));
  if (Status s = ValidateKvFlags(p, kv); !s.ok()) return UsageError("serve", p, s);
  if (!opt.chat_template.empty()) {
    if (auto f = ParseChatFamily(opt.chat_template); !f.ok()) return UsageError("serve", p, f.status());
  }
  opt.max_body = static_cast<size_t>(max_body);
  if (Status s = InstallStopSignals(); !s.ok()) return Fail("serve", s);

  Server server(opt);
  if (Status s = server.Start(); !s.ok()) return Fail("serve", s);
  // An IPv6 address goes in brackets in a URL (RFC 3986): http://[::1]:8080, not http://::1:8080.
  const bool ipv6 = opt.host.find(':') != std::string::npos && opt.host.front() != '[';
  const std::string host = ipv6 ? "[" + opt.host + "]" : opt.host;
  std::fprintf(stderr, "dynakv serve: listening on http://%s:%d\n", host.c_str(), server.port());
  std::thread watcher(WatchSignals, &server);
  const Status loaded = server.Load(model_path, kv);
  int code = kExitOk;
  if (loaded.ok()) {
    std::fprintf(stderr, "dynakv serve: ready: %s\n", server.Describe().c_str());
    server.Wait();
  } else {
    code = CacheError("serve", p, loaded);
    server.Stop();
  }
  const char end = 0;  // wakes the watcher if no signal came
  const ssize_t ignored = write(g_signal_pipe[1], &end, 1);
  (void)ignored;
  watcher.join();
  if (code == kExitOk) std::fprintf(stderr, "dynakv serve: stopped\n");
  return code;
}

}  // namespace dk::cli
