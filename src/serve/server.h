// dynakv serve: an HTTP server (cpp-httplib) with OpenAI's and llama-server's conventions.
//
//   POST /v1/completions, POST /v1/chat/completions   (stream: server-sent events)
//   GET  /v1/models, /health (200 when serving, 503 while loading or shutting down), /metrics
//
// Slots, queue, prefix reuse and threads: serve/slots.h and serve/engine.h; the whole design in
// docs/architecture.md ("Server"). The HTTP library stays inside server.cpp.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "core/status.h"
#include "kv/registry.h"

namespace dk {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;             // 0: any free port (see Server::port)
  int n_slots = 1;             // --parallel
  int n_ctx = 0;               // tokens per slot's cache; 0: the model's training context
  int queue = 16;              // requests that may wait for a slot
  double timeout_s = 600.0;    // per request, queue wait included
  size_t max_body = 1 << 20;   // bytes of a request body
  int threads = 1;             // forward-pass threads (pool and OpenBLAS)
  int n_batch = 512;           // prompt tokens per forward pass
  int max_tokens = 256;        // cap and default of a request's max_tokens
  std::string chat_template;   // a family name that overrides the model's template; "": detect
  double grace_s = 5.0;        // on shutdown, how long in-flight requests may still run
  std::string model_id;        // the name /v1/models gives; "": the model file's name
};

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds host:port and starts answering on a background thread; until Load has finished,
  // /health and generation answer 503 ("loading").
  Status Start();
  int port() const;  // the bound port (the chosen one when options.port was 0)
  // Loads the model, finds its chat template and creates one cache per slot from `kv`
  // (InvalidArgument for bad cache flags). Then /health answers 200.
  Status Load(const std::string& model_path, const KvConfig& kv);
  // One line on what is served (model, cache, slots, context, template).
  std::string Describe() const;

  // Graceful shutdown, from any thread (not from a signal handler): stops accepting, refuses
  // queued requests, lets running ones finish for grace_s, then cancels the rest. Idempotent.
  void Stop();
  // Blocks until the server has stopped (Stop was called and every request has ended).
  void Wait();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dk
