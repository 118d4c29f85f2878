// The HTTP side of dynakv serve: routes, admission (loading, shutdown, queue), streaming, errors
// as OpenAI-style bodies, graceful shutdown. Generation itself is serve/engine.cpp.
#include "serve/server.h"

#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <httplib.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "model/llama.h"
#include "serve/chat_template.h"
#include "serve/engine.h"
#include "serve/metrics.h"
#include "serve/openai_api.h"
#include "serve/slots.h"

namespace dk {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

// ---- the client's connection ------------------------------------------------------------------
// httplib 0.11 does not tell a handler whether its client is still there, and a non-streaming
// request writes nothing until the end. The handler runs on the thread that owns the connection,
// so the socket is stable while it runs: find it once by its two addresses, then peek at it.

int PortOf(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
  return -1;
}

bool IsConnection(int fd, const httplib::Request& req) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode)) return false;
  sockaddr_storage local{}, peer{};
  socklen_t llen = sizeof(local), plen = sizeof(peer);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &llen) != 0) return false;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &plen) != 0) return false;
  if (PortOf(peer) != req.remote_port || (req.local_port > 0 && PortOf(local) != req.local_port)) return false;
  // The address as httplib wrote it (numeric getnameinfo), so two clients on one port differ.
  char host[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<sockaddr*>(&peer), plen, host, sizeof(host), nullptr, 0, NI_NUMERICHOST) != 0)
    return false;
  return req.remote_addr == host;
}

// The socket of a request's connection, or -1 (then the client is taken to be there).
int FindConnection(const httplib::Request& req) {
  if (req.remote_port <= 0) return -1;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  for (dirent* e; found < 0 && (e = readdir(dir)) != nullptr;) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    if (IsConnection(static_cast<int>(fd), req)) found = static_cast<int>(fd);
  }
  closedir(dir);
  return found;
}

// True once the peer has closed or reset the connection (a pipelined request is not a hang-up).
bool PeerGone(int fd) {
  if (fd < 0) return false;
  char c;
  const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n > 0) return false;
  if (n == 0) return true;
  return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

// ---- connections waiting for a request head -------------------------------------------------------
// httplib 0.11 reads a request head with a timeout per read(): a client sending a byte every few
// seconds holds its connection thread for as long as it likes, and at shutdown httplib joins that
// thread. So each connection gets a thread of its own (a /health check never waits behind slow
// clients), and a watchdog shuts down every connection that has not finished a request head within
// kHeadTimeoutS of being accepted or of its previous response (nginx's client_header_timeout); at
// shutdown every connection not inside a request is shut down at once.

constexpr double kHeadTimeoutS = 10.0;
constexpr size_t kMaxConnections = 512;  // connection threads; beyond, accept waits

// One thread per connection, at most `max` at once; shutdown() waits for all of them.
class ConnectionThreads : public httplib::TaskQueue {
 public:
  explicit ConnectionThreads(size_t max) : max_(max) {}
  void enqueue(std::function<void()> fn) override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return running_ < max_; });
    ++running_;
    auto run = std::make_shared<std::function<void()>>(std::move(fn));
    try {
      std::thread([this, run] {
        (*run)();
        std::lock_guard<std::mutex> done(mu_);
        --running_;
        cv_.notify_all();
      }).detach();
    } catch (const std::system_error&) {  // no thread to be had (a limit): serve it here, slowly
      --running_;
      lock.unlock();
      (*run)();
    }
  }
  void shutdown() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return running_ == 0; });
  }

 private:
  const size_t max_;
  std::mutex mu_;
  std::condition_variable cv_;
  size_t running_ = 0;
};

// A connection by its peer, as httplib names it in a Request (numeric address, port).
using PeerKey = std::pair<std::string, int>;

// Calls f(fd, local address) for each of this process's sockets bound to `port`.
template <typename F>
void ForEachSocketOnPort(int port, F f) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return;
  for (dirent* e; (e = readdir(dir)) != nullptr;) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    struct stat st;
    if (fstat(static_cast<int>(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage local{};
    socklen_t llen = sizeof(local);
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &llen) != 0 || PortOf(local) != port)
      continue;
    f(static_cast<int>(fd));
  }
  closedir(dir);
}

// The accepted connections of the server listening on `port`: (socket, peer).
std::vector<std::pair<int, PeerKey>> AcceptedConnections(int port) {
  std::vector<std::pair<int, PeerKey>> out;
  ForEachSocketOnPort(port, [&](int fd) {
    sockaddr_storage peer{};
    socklen_t plen = sizeof(peer);
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &plen) != 0) return;  // the listener
    char host[NI_MAXHOST];
    if (getnameinfo(reinterpret_cast<sockaddr*>(&peer), plen, host, sizeof(host), nullptr, 0, NI_NUMERICHOST) != 0)
      return;
    out.push_back({fd, PeerKey(host, PortOf(peer))});
  });
  return out;
}

// httplib 0.11 listens with a backlog of 5: a burst of connections (60 slow clients, a load test)
// overflows it and the kernel drops SYNs, which clients resend after a second. listen() again on
// the listening socket (found by its port) raises the backlog, as nginx's 511.
void RaiseListenBacklog(int port) {
  ForEachSocketOnPort(port, [](int fd) {
    int listening = 0;
    socklen_t len = sizeof(listening);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening) ::listen(fd, SOMAXCONN);
  });
}

// ---- errors ---------------------------------------------------------------------------------------

ApiError Unavailable(const std::string& message, const std::string& code) {
  ApiError e;
  e.http_status = 503;
  e.message = message;
  e.type = "unavailable_error";
  e.code = code;
  return e;
}

ApiError ServerError(const std::string& message, const std::string& code) {
  ApiError e;
  e.http_status = 500;
  e.message = message;
  e.type = "server_error";
  e.code = code;
  return e;
}

void Send(httplib::Response& res, const ApiError& e) {
  res.status = e.http_status;
  if (e.http_status == 503) res.set_header("Retry-After", "1");
  res.set_content(e.Body(), "application/json");
}

// Why a running request stopped early.
enum class Cancel { kNone, kGone, kTimeout, kShutdown };

ApiError CancelError(Cancel why, double timeout_s) {
  if (why == Cancel::kTimeout)
    return Unavailable("the request ran out of time (--timeout " + std::to_string(timeout_s) + " s)", "timeout");
  if (why == Cancel::kShutdown) return Unavailable("the server is shutting down", "shutting_down");
  ApiError e = Unavailable("the client closed the connection", "client_closed");
  e.http_status = 499;  // nginx's "client closed request": nobody reads it, /metrics counts it
  return e;
}

FinishReason FinishOf(EndReason end) {
  return end == EndReason::kEndOfText || end == EndReason::kStopString ? FinishReason::kStop : FinishReason::kLength;
}

std::string BaseName(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// httplib's own refusals (unknown route, body too large, malformed request) as OpenAI errors.
ApiError HttpError(const httplib::Request& req, int status, size_t max_body) {
  ApiError e;
  e.http_status = status;
  if (status == 413) {
    e.message = "the request body is larger than " + std::to_string(max_body) + " bytes (--max-body)";
    e.code = "payload_too_large";
  } else if (status == 404) {
    e.message = "no route for " + Printable(req.method, 16) + " " + Printable(req.path, 100);
    e.type = "not_found_error";
    e.code = "not_found";
  } else {
    e.message = "HTTP " + std::to_string(status) + (status == 400 ? ": malformed request" : "");
    if (status >= 500) e.type = "server_error";
  }
  return e;
}

}  // namespace

// One accepted generation request, from its slot lease to its last byte.
struct GenerationJob {
  std::shared_ptr<void> flight;  // counts the request in flight (shutdown waits for it)
  SlotLease lease;
  std::vector<int32_t> prompt;
  GenerationParams params;
  ResponseHead head;
  bool include_usage = true;
  int fd = -1;  // the client's socket (-1: unknown)
  Clock::time_point deadline;
  Cancel why = Cancel::kNone;
};

struct Server::Impl {
  enum class State { kLoading, kReady, kStopping };

  explicit Impl(ServerOptions o) : opt(std::move(o)) {}

  ServerOptions opt;
  httplib::Server http;
  std::thread listener;
  int port = -1;
  std::atomic<State> state{State::kLoading};
  // Written by Load before state turns kReady, read-only after.
  std::unique_ptr<Model> model;
  std::string model_id, kv_desc;
  std::unique_ptr<ForwardGate> gate;
  std::unique_ptr<SlotPool> slots;
  std::optional<ChatTemplate> chat;
  std::string chat_problem;  // why chat is unavailable when !chat
  size_t kv_reserved = 0;
  RequestLimits limits;

  ServeMetrics metrics;
  std::atomic<bool> cancel_all{false};
  std::atomic<uint64_t> ids{0};
  const int64_t created = std::time(nullptr);
  std::mutex mu;
  std::condition_variable cv;
  int in_flight = 0;
  bool stop_started = false, stopped = false, listener_ended = false;
  bool loaded = false;  // the members above are set (under mu)

  // Connections: since when each waits for a request head (accepted, or its last response sent),
  // or busy (inside a request). Under conn_mu; the watchdog sweeps them every 250 ms.
  struct Connection {
    Clock::time_point since;
    bool busy = false;
    Clock::time_point seen;  // last found open
  };
  std::mutex conn_mu;
  std::map<PeerKey, Connection> connections;
  std::thread watchdog;
  bool watchdog_stop = false;  // under mu
  // Shuts down the connections waiting for a request head longer than kHeadTimeoutS; with
  // `waiting`, every one waiting; with `all`, every one.
  void Sweep(bool waiting, bool all);
  void MarkBusy(const httplib::Request& req, bool busy);

  void Routes();
  std::shared_ptr<void> Track();
  std::optional<ApiError> Admission() const;
  void Health(httplib::Response& res) const;
  void Metrics(httplib::Response& res) const;
  void Models(httplib::Response& res) const;
  void Complete(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader,
                bool chat_api);
  std::optional<ApiError> ReadBody(const httplib::ContentReader& reader, httplib::Response& res,
                                   std::string* body) const;
  std::optional<ApiError> Tokenize(const CompletionRequest& r, std::vector<int32_t>* tokens) const;
  std::optional<ApiError> Accept(const httplib::Request& req, const std::string& body, bool chat_api,
                                 GenerationJob* job, bool* stream);
  bool KeepGoing(GenerationJob& job) const;
  void RunWhole(GenerationJob& job, httplib::Response& res);
  void RunStream(GenerationJob& job, httplib::DataSink& sink);
  void Shutdown();
};

// Counts a request in flight until the returned token is destroyed.
std::shared_ptr<void> Server::Impl::Track() {
  {
    std::lock_guard<std::mutex> lock(mu);
    ++in_flight;
  }
  return std::shared_ptr<void>(nullptr, [this](void*) {
    {
      std::lock_guard<std::mutex> lock(mu);
      --in_flight;
    }
    cv.notify_all();
  });
}

std::optional<ApiError> Server::Impl::Admission() const {
  switch (state.load()) {
    case State::kLoading: return Unavailable("the model is loading", "loading");
    case State::kStopping: return Unavailable("the server is shutting down", "shutting_down");
    case State::kReady: return std::nullopt;
  }
  return std::nullopt;
}

void Server::Impl::Health(httplib::Response& res) const {
  if (std::optional<ApiError> e = Admission()) {
    json body = json::parse(e->Body());
    body["status"] = state.load() == State::kLoading ? "loading" : "shutting down";
    res.status = 503;
    res.set_content(DumpJson(body), "application/json");
    return;
  }
  res.set_content(R"({"status":"ok"})", "application/json");
}

void Server::Impl::Metrics(httplib::Response& res) const {
  ServeGauges g;
  if (state.load() == State::kReady) {
    g.slots_total = slots->size();
    g.slots_busy = slots->busy();
    g.queue_length = slots->waiting();
    g.kv_bytes_reserved = kv_reserved;
    g.fp16_bytes_per_token = Fp16FullBytesPerToken(model->config().kv_shape());
    for (int i = 0; i < slots->size(); ++i) {
      g.kv_bytes_used += slots->slot(i).bytes_used.load();
      g.kv_tokens += slots->slot(i).n_tokens.load();
    }
  }
  res.set_content(FormatMetrics(metrics.Snapshot(), g), "text/plain; version=0.0.4; charset=utf-8");
}

void Server::Impl::Models(httplib::Response& res) const {
  if (state.load() != State::kReady) return Send(res, *Admission());
  json meta = {{"n_ctx", opt.n_ctx}, {"n_slots", opt.n_slots}, {"kv", kv_desc}, {"n_vocab", model->config().n_vocab},
               {"chat_template", nullptr}};
  if (chat) meta["chat_template"] = ChatFamilyName(chat->family);
  const json m = {{"id", model_id}, {"object", "model"}, {"created", created}, {"owned_by", "dynakv"}, {"meta", meta}};
  res.set_content(DumpJson(json{{"object", "list"}, {"data", json::array({m})}}), "application/json");
}

std::optional<ApiError> Server::Impl::Tokenize(const CompletionRequest& r, std::vector<int32_t>* tokens) const {
  const Tokenizer& tok = model->tokenizer();
  const char* field = r.chat ? "messages" : "prompt";
  if (!r.chat) {
    *tokens = tok.Encode(r.prompt, true);  // as `dynakv generate`: the user's text stays text
  } else {
    if (!chat) return ServerError(chat_problem, "no_chat_template");
    StatusOr<std::string> text = FormatChat(*chat, r.messages);
    if (!text.ok()) return BadRequest(text.status());
    *tokens = tok.EncodeWithSpecial(*text, true);  // the template's markers become special tokens
  }
  if (tokens->empty()) return BadRequest(InvalidArgument(std::string(field) + ": empty (no tokens to continue)"));
  if (static_cast<int>(tokens->size()) > opt.n_ctx) {
    return BadRequest(InvalidArgument(std::string(field) + ": the prompt has " + std::to_string(tokens->size()) +
                                      " tokens, more than the context of " + std::to_string(opt.n_ctx) +
                                      " tokens per slot (-c)"),
                      "context_length_exceeded");
  }
  return std::nullopt;
}

// Parses, tokenizes and queues a request; on success the job holds a slot.
std::optional<ApiError> Server::Impl::Accept(const httplib::Request& req, const std::string& body, bool chat_api,
                                            GenerationJob* job, bool* stream) {
  if (std::optional<ApiError> e = Admission()) return e;
  StatusOr<CompletionRequest> parsed = ParseCompletionRequest(body, chat_api, limits);
  if (!parsed.ok()) return BadRequest(parsed.status());
  const CompletionRequest& r = *parsed;
  if (std::optional<ApiError> e = Tokenize(r, &job->prompt)) return e;
  job->params.max_tokens = r.max_tokens;
  job->params.sampling = r.sampling;
  job->params.stop = r.stop;
  if (r.chat && !chat->end_of_turn.empty()) job->params.stop.push_back(chat->end_of_turn);
  job->params.n_batch = opt.n_batch;
  job->include_usage = r.include_usage;
  *stream = r.stream;
  job->deadline = Clock::now() + std::chrono::microseconds(static_cast<int64_t>(opt.timeout_s * 1e6));
  job->fd = FindConnection(req);
  Refusal why = Refusal::kNone;
  const int fd = job->fd;
  job->lease = slots->Acquire(job->prompt, job->deadline, [this, fd] { return cancel_all.load() || PeerGone(fd); },
                              &why);
  switch (why) {
    case Refusal::kNone: break;
    case Refusal::kQueueFull:
      return Unavailable("all " + std::to_string(opt.n_slots) + " slots are busy and the queue of " +
                             std::to_string(opt.queue) + " waiting requests is full (--queue); retry later",
                         "queue_full");
    case Refusal::kShuttingDown: return CancelError(Cancel::kShutdown, opt.timeout_s);
    case Refusal::kTimeout: return CancelError(Cancel::kTimeout, opt.timeout_s);
    case Refusal::kCancelled: return CancelError(cancel_all ? Cancel::kShutdown : Cancel::kGone, opt.timeout_s);
  }
  job->head = {(r.chat ? "chatcmpl-" : "cmpl-") + std::to_string(created) + "-" + std::to_string(++ids),
               std::time(nullptr), model_id, r.chat};
  return std::nullopt;
}

bool Server::Impl::KeepGoing(GenerationJob& job) const {
  if (job.why == Cancel::kNone) {
    if (cancel_all) job.why = Cancel::kShutdown;
    else if (Clock::now() >= job.deadline) job.why = Cancel::kTimeout;
    else if (PeerGone(job.fd)) job.why = Cancel::kGone;
  }
  return job.why == Cancel::kNone;
}

// The body, read here rather than by httplib: httplib 0.11 holds a Content-Length body to
// --max-body (set_payload_max_length: 413 before reading it) but reads a chunked one whole, however
// large. Past max_body the bytes are dropped, not kept; up to kDrainBytes more are read so that a
// client that sends its whole body before reading the answer still gets the 413, then the reading
// stops and the connection is closed.
std::optional<ApiError> Server::Impl::ReadBody(const httplib::ContentReader& reader, httplib::Response& res,
                                               std::string* body) const {
  constexpr size_t kDrainBytes = 16u << 20;
  bool too_large = false;
  size_t dropped = 0;
  const bool read = reader([&](const char* data, size_t n) {
    if (!too_large && n <= opt.max_body - body->size()) {
      body->append(data, n);
      return true;
    }
    if (!too_large) {
      too_large = true;
      dropped = body->size();
      std::string().swap(*body);
    }
    dropped += n;
    return dropped - opt.max_body <= kDrainBytes;
  });
  if (too_large || res.status == 413) {  // 413: a Content-Length over the limit, refused by httplib
    if (!read) res.set_header("Connection", "close");  // the rest of the body was never read
    return HttpError(httplib::Request(), 413, opt.max_body);
  }
  if (!read) {
    res.set_header("Connection", "close");
    return BadRequest(InvalidArgument("invalid request: the body could not be read (malformed chunked encoding or "
                                      "a dropped connection)"),
                      "bad_body");
  }
  return std::nullopt;
}

void Server::Impl::Complete(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader,
                            bool chat_api) {
  auto job = std::make_shared<GenerationJob>();
  job->flight = Track();
  bool stream = false;
  std::string body;
  if (std::optional<ApiError> e = ReadBody(reader, res, &body)) return Send(res, *e);
  if (std::optional<ApiError> e = Accept(req, body, chat_api, job.get(), &stream)) return Send(res, *e);
  if (!stream) return RunWhole(*job, res);
  // The provider runs after this handler returns, on the same thread; it owns the job (and so
  // the slot) until the stream ends or the connection is dropped.
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider("text/event-stream", [this, job](size_t, httplib::DataSink& sink) {
    RunStream(*job, sink);
    return job->why != Cancel::kGone;  // false: httplib drops the connection
  });
}

void Server::Impl::RunWhole(GenerationJob& job, httplib::Response& res) {
  std::string text;
  StatusOr<GenerationResult> r = RunGeneration(
      *gate, job.lease.slot(), job.prompt, job.params,
      [&](const std::string& s) {
        text += s;
        return true;
      },
      [&] { return KeepGoing(job); }, &metrics);
  job.lease.Release();
  if (!r.ok()) return Send(res, ServerError("generation failed: " + r.status().message(), "generation_failed"));
  if (r->end == EndReason::kCancelled) return Send(res, CancelError(job.why, opt.timeout_s));
  const Usage usage{r->n_prompt, r->n_generated};
  res.set_content(DumpJson(CompletionBody(job.head, text, FinishOf(r->end), usage)), "application/json");
}

void Server::Impl::RunStream(GenerationJob& job, httplib::DataSink& sink) {
  bool first = true;
  // A failed write means the client is gone (it also ends the generation through on_text).
  auto send = [&](const std::string& event) {
    if (job.why != Cancel::kGone && !(sink.is_writable() && sink.write(event.data(), event.size())))
      job.why = Cancel::kGone;
    return job.why != Cancel::kGone;
  };
  auto on_text = [&](const std::string& delta) {
    const bool ok = send(SseEvent(StreamChunk(job.head, delta, first, nullptr, nullptr)));
    first = false;
    return ok;
  };
  StatusOr<GenerationResult> r = [&]() -> StatusOr<GenerationResult> {
    try {
      return RunGeneration(*gate, job.lease.slot(), job.prompt, job.params, on_text, [&] { return KeepGoing(job); },
                           &metrics);
    } catch (const std::exception& e) {  // nothing may escape a content provider
      return Internal(e.what());
    }
  }();
  job.lease.Release();
  if (job.why == Cancel::kGone) return;
  if (!r.ok() || r->end == EndReason::kCancelled) {
    const ApiError e = r.ok() ? CancelError(job.why, opt.timeout_s)
                              : ServerError("generation failed: " + r.status().message(), "generation_failed");
    send("data: " + e.Body() + "\n\n");
  } else {
    const FinishReason finish = FinishOf(r->end);
    const Usage usage{r->n_prompt, r->n_generated};
    send(SseEvent(StreamChunk(job.head, "", first, &finish, job.include_usage ? &usage : nullptr)));
    send("data: [DONE]\n\n");
  }
  if (job.why != Cancel::kGone) sink.done();
}

void Server::Impl::Routes() {
  using httplib::Request;
  using httplib::Response;
  http.Get("/health", [this](const Request&, Response& res) { Health(res); });
  http.Get("/metrics", [this](const Request&, Response& res) { Metrics(res); });
  http.Get("/v1/models", [this](const Request&, Response& res) { Models(res); });
  using httplib::ContentReader;
  http.Post("/v1/completions", [this](const Request& req, Response& res, const ContentReader& reader) {
    Complete(req, res, reader, false);
  });
  http.Post("/v1/chat/completions", [this](const Request& req, Response& res, const ContentReader& reader) {
    Complete(req, res, reader, true);
  });
  http.set_error_handler(httplib::Server::HandlerWithResponse([this](const Request& req, Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;  // ours already
    res.set_content(HttpError(req, res.status, opt.max_body).Body(), "application/json");
    return httplib::Server::HandlerResponse::Handled;
  }));
  http.set_exception_handler([](const Request&, Response& res, std::exception_ptr ep) {
    std::string what = "unknown exception";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    Send(res, ServerError("internal error: " + what, "internal"));
  });
  // Counted after routing and the error handler, before the response is written (httplib's logger
  // runs after: a client that reads /metrics right after a response could miss that request).
  http.set_post_routing_handler([this](const Request& req, Response& res) { metrics.CountRequest(req.path, res.status); });
  http.set_payload_max_length(opt.max_body);
  http.set_keep_alive_timeout(2);  // idle connections close soon, so shutdown is not held up
  http.set_read_timeout(10);
  http.set_write_timeout(10);
  // Every running or queued request holds a connection thread: room for all of them, and for
  // health checks and refusals besides.
  // A thread per connection (see ConnectionThreads), so a connection slow to send its request head
  // holds no thread a /health check or a queued request needs.
  const size_t workers = std::max(kMaxConnections, 2 * static_cast<size_t>(opt.n_slots + opt.queue) + 8);
  http.new_task_queue = [workers] { return new ConnectionThreads(workers); };
  http.set_pre_routing_handler([this](const Request& req, Response&) {
    MarkBusy(req, true);
    return httplib::Server::HandlerResponse::Unhandled;
  });
  http.set_logger([this](const Request& req, const Response&) { MarkBusy(req, false); });  // after the response
}

void Server::Impl::MarkBusy(const httplib::Request& req, bool busy) {
  std::lock_guard<std::mutex> lock(conn_mu);
  const Clock::time_point now = Clock::now();
  Connection& c = connections.try_emplace(PeerKey(req.remote_addr, req.remote_port), Connection{now, false, now}).first->second;
  c.busy = busy;
  c.since = now;
}

void Server::Impl::Sweep(bool waiting, bool all) {
  const auto open = AcceptedConnections(port);
  const Clock::time_point now = Clock::now();
  std::lock_guard<std::mutex> lock(conn_mu);
  for (const auto& [fd, key] : open) {
    auto it = connections.try_emplace(key, Connection{now, false, now}).first;
    Connection& c = it->second;
    c.seen = now;
    const bool late = std::chrono::duration<double>(now - c.since).count() > kHeadTimeoutS;
    if (all || (!c.busy && (waiting || late))) ::shutdown(fd, SHUT_RDWR);  // httplib's read ends; it closes
  }
  // Closed connections are forgotten; one inside a request only after a minute unseen (a request
  // is never cut off because one look at /proc missed its socket).
  for (auto it = connections.begin(); it != connections.end();) {
    const double unseen = std::chrono::duration<double>(now - it->second.seen).count();
    it = (unseen > 0 && (!it->second.busy || unseen > 60)) ? connections.erase(it) : std::next(it);
  }
}

void Server::Impl::Shutdown() {
  {
    std::unique_lock<std::mutex> lock(mu);
    if (stop_started) {  // another thread is at it: return when it is done
      cv.wait(lock, [this] { return stopped; });
      return;
    }
    stop_started = true;
    state = State::kStopping;
    if (slots) slots->Drain();  // queued requests are refused now
  }
  http.stop();  // no new connections; open ones end after their current request
  if (port > 0) Sweep(true, false);  // connections not inside a request: idle, or a head still coming
  auto idle = [this] { return in_flight == 0; };
  {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::microseconds(static_cast<int64_t>(opt.grace_s * 1e6)), idle)) {
      cancel_all = true;  // each running request stops before its next forward pass
      if (!cv.wait_for(lock, std::chrono::seconds(1), idle) && port > 0) {
        lock.unlock();
        Sweep(true, true);  // a request still reading its body: its connection ends now
        lock.lock();
      }
      cv.wait(lock, idle);
    }
  }
  // What is left (a request still sending its body, a response not read) ends now.
  if (port > 0 && listener.joinable()) {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(1), [this] { return listener_ended; })) {
      lock.unlock();
      Sweep(true, true);
    }
  }
  if (listener.joinable()) listener.join();  // httplib joins its connection threads
  {
    std::lock_guard<std::mutex> lock(mu);
    watchdog_stop = true;
  }
  cv.notify_all();
  if (watchdog.joinable()) watchdog.join();
  {
    std::lock_guard<std::mutex> lock(mu);
    stopped = true;
  }
  cv.notify_all();
}

Server::Server(ServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

Server::~Server() { impl_->Shutdown(); }

Status Server::Start() {
  Impl& s = *impl_;
  // httplib 0.11 writes without MSG_NOSIGNAL: a client that hung up would kill the process.
  std::signal(SIGPIPE, SIG_IGN);
  s.Routes();
  s.port = s.opt.port == 0 ? s.http.bind_to_any_port(s.opt.host)
                           : (s.http.bind_to_port(s.opt.host, s.opt.port) ? s.opt.port : -1);
  if (s.port < 0)
    return IoError("cannot listen on " + s.opt.host + ":" + std::to_string(s.opt.port) +
                   " (the port is in use, or the host is not an address of this machine)");
  RaiseListenBacklog(s.port);
  s.listener = std::thread([&s] {
    s.http.listen_after_bind();
    std::lock_guard<std::mutex> lock(s.mu);
    s.listener_ended = true;
    s.cv.notify_all();
  });
  // Stop must find the server running, or httplib's stop would be lost.
  for (int i = 0; i < 5000 && !s.http.is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (!s.http.is_running()) return Internal("the HTTP server did not start within 5 s");
  s.watchdog = std::thread([&s] {
    std::unique_lock<std::mutex> lock(s.mu);
    while (!s.cv.wait_for(lock, std::chrono::milliseconds(250), [&s] { return s.watchdog_stop; })) {
      const bool stopping = s.stop_started;
      lock.unlock();
      s.Sweep(stopping, false);
      lock.lock();
    }
  });
  return Status::Ok();
}

int Server::port() const { return impl_->port; }

namespace {

// The chat template: forced by name, else detected in the GGUF; "" and *problem when none.
std::optional<ChatTemplate> FindChatTemplate(const Model& model, const std::string& forced, std::string* problem) {
  const GgufFile& gguf = model.gguf();
  std::string text;
  if (gguf.Find("tokenizer.chat_template") != nullptr) {
    StatusOr<std::string> t = gguf.GetString("tokenizer.chat_template");
    if (t.ok()) text = *t;
  }
  if (!forced.empty()) {
    StatusOr<ChatFamily> f = ParseChatFamily(forced);
    if (!f.ok()) {
      *problem = f.status().message();
      return std::nullopt;
    }
    return ChatTemplate::For(*f, model.tokenizer(), text);
  }
  if (text.empty()) {
    *problem = "the model has no chat template (no tokenizer.chat_template in its GGUF file); start the server with "
               "--chat-template NAME (" + ChatFamilyNames() + ") to chat with it";
    return std::nullopt;
  }
  StatusOr<ChatFamily> f = DetectChatFamily(text);
  if (!f.ok()) {
    *problem = f.status().message();
    return std::nullopt;
  }
  return ChatTemplate::For(*f, model.tokenizer(), text);
}

}  // namespace

Status Server::Load(const std::string& model_path, const KvConfig& kv) {
  Impl& s = *impl_;
  StatusOr<std::unique_ptr<Model>> model = Model::Load(model_path);
  if (!model.ok()) return model.status();
  const ModelConfig& c = (*model)->config();
  const int n_ctx = s.opt.n_ctx > 0 ? s.opt.n_ctx : c.n_ctx_train;
  if (n_ctx <= 0) return InvalidArgument("-c: the model does not say its context size; give -c");
  const KvModelInfo info{c.kv_shape(), (*model)->fingerprint(), model_path};
  std::vector<std::unique_ptr<KvCache>> caches;
  size_t reserved = 0;
  for (int i = 0; i < s.opt.n_slots; ++i) {  // a profile is loaded once and shared (LoadSharedProfile)
    StatusOr<std::unique_ptr<KvCache>> cache = CreateKvCache(kv, info, n_ctx);
    if (!cache.ok()) return cache.status();
    reserved += (*cache)->BytesReserved();
    caches.push_back(std::move(cache).value());
  }
  std::string problem;
  std::optional<ChatTemplate> chat = FindChatTemplate(**model, s.opt.chat_template, &problem);
  auto gate = std::make_unique<ForwardGate>(**model, s.opt.threads);
  auto slots = std::make_unique<SlotPool>(std::move(caches), s.opt.queue);

  std::lock_guard<std::mutex> lock(s.mu);
  s.opt.n_ctx = n_ctx;
  s.model = std::move(model).value();
  s.model_id = s.opt.model_id.empty() ? BaseName(model_path) : s.opt.model_id;
  s.kv_desc = kv.Describe();
  s.gate = std::move(gate);
  s.slots = std::move(slots);
  s.chat = chat;
  s.chat_problem = problem;
  s.kv_reserved = reserved;
  s.limits.max_tokens = s.opt.max_tokens;
  s.loaded = true;
  if (s.stop_started) {
    s.slots->Drain();
  } else {
    s.state = Impl::State::kReady;
  }
  return Status::Ok();
}

std::string Server::Describe() const {
  const Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(impl_->mu);
  if (!s.loaded) return "(loading)";
  return s.model_id + ", kv " + s.kv_desc + ", " + std::to_string(s.opt.n_slots) + " slots x " +
         std::to_string(s.opt.n_ctx) + " tokens, queue " + std::to_string(s.opt.queue) + ", chat template " +
         (s.chat ? ChatFamilyName(s.chat->family) : "none");
}

void Server::Stop() { impl_->Shutdown(); }

void Server::Wait() {
  std::unique_lock<std::mutex> lock(impl_->mu);
  // The listener also ends on its own when accepting fails; the destructor then shuts down.
  impl_->cv.wait(lock, [this] { return impl_->stopped || (impl_->listener_ended && !impl_->stop_started); });
}

}  // namespace dk
