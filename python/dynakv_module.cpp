// The `dynakv` Python module (pybind11): models, KV caches of every registered method, generation
// (whole or streamed), perplexity / KL, calibration and passkey retrieval, each the library call
// the CLI makes, so the numbers are the CLI's. The layer above tools/: it may include any src layer.
//
// Conventions (docs/python.md):
//  - long C++ calls run with the GIL released; no Python object is touched while it is;
//  - a failed Status raises: bad arguments ValueError, file system failures OSError, the rest
//    RuntimeError, always with the library's message (which names the CLI flag);
//  - text goes in as str (UTF-8) or bytes and comes out as str, bytes that are not UTF-8 replaced.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/memory.h"
#include "core/status.h"
#include "core/threads.h"
#include "eval/calibrate.h"
#include "eval/generate.h"
#include "eval/passkey.h"
#include "eval/perplexity.h"
#include "eval/sampler.h"
#include "kv/dynakv_cache.h"
#include "kv/kv_cache.h"
#include "kv/profile.h"
#include "kv/registry.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace py = pybind11;

namespace dk::python {

namespace {

// ---- Errors ------------------------------------------------------------------------------------

// Thrown (with or without the GIL) and translated to OSError by the registered translator.
struct OsError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void Throw(const Status& s) {
  switch (s.code()) {
    case Code::kInvalidArgument:
    case Code::kOutOfRange:
    case Code::kFailedPrecondition:
      throw py::value_error(s.message());
    case Code::kNotFound:
    case Code::kIoError:
      throw OsError(s.message());
    default:
      throw std::runtime_error(s.message());
  }
}

void Check(const Status& s) {
  if (!s.ok()) Throw(s);
}

template <typename T>
T Take(StatusOr<T> v) {
  if (!v.ok()) Throw(v.status());
  return std::move(v).value();
}

[[noreturn]] void BadArg(const std::string& message) { throw py::value_error(message); }

// ---- Small conversions -------------------------------------------------------------------------

// A path or flag value goes to C functions as a C string: an embedded NUL would silently cut it
// (open() refuses it with ValueError, and so do we).
void CheckNoNul(const std::string& text, const std::string& what) {
  const size_t at = text.find('\0');
  if (at != std::string::npos)
    BadArg(what + ": embedded null character at index " + std::to_string(at) + " of " + std::to_string(text.size()));
}

// str, bytes or os.PathLike -> a path.
std::string PathArg(const py::handle& obj, const char* what) {
  if (obj.is_none()) BadArg(std::string(what) + ": a path is required");
  py::object p = py::module_::import("os").attr("fspath")(obj);
  std::string path = p.cast<std::string>();
  CheckNoNul(path, what);
  return path;
}

// UTF-8 bytes -> str, bytes that are not UTF-8 replaced by U+FFFD (model output need not be valid).
py::str Utf8(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

// Length of the prefix of s that does not end inside an unfinished UTF-8 sequence (what a stream
// can hand out now; the rest waits for the next token's bytes).
size_t CompleteUtf8Prefix(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= 4 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
    return need > back ? n - back : n;
  }
  return n;
}

// The CLI's bound on -t: more threads than that is a mistake, and the pool would fail to start them.
constexpr int kMaxThreads = 1024;

int Threads(int threads) {
  if (threads < 0 || threads > kMaxThreads)
    BadArg("threads: must be 0 (all cores) or 1.." + std::to_string(kMaxThreads) + ", found " +
           std::to_string(threads));
  if (threads > 0) return threads;
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(std::min<unsigned>(n, kMaxThreads));
}

// Ctrl-C during a long call. Python runs its signal handlers only between bytecodes, and the call
// runs without the GIL, so it asks for them itself (taking the GIL for that moment, at most every
// 50 ms) between tokens or chunks. When a handler raised (KeyboardInterrupt), the call stops and the
// exception stays pending in this thread's state until RaiseIfInterrupted throws it.
class SignalCheck {
 public:
  // Without the GIL. False once a handler has raised.
  bool Continue() {
    if (raised_) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_) return true;
    next_ = now + std::chrono::milliseconds(50);
    py::gil_scoped_acquire gil;
    raised_ = PyErr_CheckSignals() != 0;
    return !raised_;
  }
  // For progress callbacks, which cannot say "stop": unwinds the library call to the catch
  // beside it (the library's state is all RAII, and the cache is cleared by the next call).
  void ThrowIfInterrupted() {
    if (!Continue()) throw Interrupted{};
  }
  // With the GIL, after the call: the handler's exception, if one raised.
  void RaiseIfInterrupted() const {
    if (raised_) throw py::error_already_set();
  }
  struct Interrupted {};

 private:
  std::chrono::steady_clock::time_point next_ = std::chrono::steady_clock::now();
  bool raised_ = false;
};

void CheckChunks(int chunks) {
  if (chunks == 0 || chunks < -1) BadArg("chunks: must be -1 (all) or positive, found " + std::to_string(chunks));
}

// ---- Model -------------------------------------------------------------------------------------

struct PyModel {
  std::unique_ptr<Model> model;
  std::string path;

  const Model& m() const { return *model; }
  const ModelConfig& c() const { return model->config(); }
  KvModelInfo Info() const { return KvModelInfo{c().kv_shape(), model->fingerprint(), path}; }

  std::vector<int32_t> Encode(const std::string& text, bool add_special) const {
    py::gil_scoped_release nogil;
    return model->tokenizer().Encode(text, add_special);
  }
  void CheckIds(const std::vector<int32_t>& ids, const char* what) const {
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= c().n_vocab)
        BadArg(std::string(what) + ": token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
               " is outside the vocabulary [0, " + std::to_string(c().n_vocab) + ")");
  }
};

// pybind11 passes None as an empty pointer: every function that takes a model checks it here.
const std::shared_ptr<PyModel>& NeedModel(const std::shared_ptr<PyModel>& model) {
  if (!model) throw py::type_error("model: expected a dynakv.Model, got None");
  return model;
}

std::shared_ptr<PyModel> LoadModel(const py::object& path_obj) {
  auto pm = std::make_shared<PyModel>();
  pm->path = PathArg(path_obj, "Model");
  StatusOr<std::unique_ptr<Model>> loaded = Status(Code::kInternal, "not loaded");
  {
    py::gil_scoped_release nogil;
    loaded = Model::Load(pm->path);
  }
  pm->model = Take(std::move(loaded));
  return pm;
}

// A prompt as text (tokenized with BOS, as the CLI does) or as token ids (used as given).
std::vector<int32_t> PromptTokens(const PyModel& pm, const py::object& prompt) {
  if (py::isinstance<py::str>(prompt) || py::isinstance<py::bytes>(prompt))
    return pm.Encode(prompt.cast<std::string>(), true);
  std::vector<int32_t> ids;
  try {
    ids = prompt.cast<std::vector<int32_t>>();
  } catch (const py::cast_error&) {
    BadArg("prompt: expected str, bytes or a list of token ids");
  }
  pm.CheckIds(ids, "prompt");
  return ids;
}

// ---- Caches ------------------------------------------------------------------------------------

const KvFlag* FindKvFlag(const std::string& name) {
  for (const KvMethod* m : KvMethods())
    for (const KvFlag& f : m->flags)
      if (f.name == name) return &f;
  return nullptr;
}

// kv_budget -> --kv-budget; a name given with its dashes is taken as it is.
std::string FlagName(const std::string& key) {
  if (!key.empty() && key[0] == '-') return key;
  std::string flag = "--" + key;
  std::replace(flag.begin(), flag.end(), '_', '-');
  return flag;
}

// Sets one keyword argument on the config, as the CLI would have read it. None leaves it unset.
void SetFlag(KvConfig& config, const std::string& key, const py::handle& value) {
  const std::string flag = FlagName(key);
  if (value.is_none()) return;
  const KvFlag* f = FindKvFlag(flag);
  if (f != nullptr && f->metavar.empty()) {  // a switch: True sets it ("1", as the CLI does)
    if (!py::isinstance<py::bool_>(value) && !py::isinstance<py::int_>(value))
      BadArg(flag + ": a switch, give True or False (keyword " + key + ")");
    if (value.cast<bool>()) config.Set(flag, "1");
    return;
  }
  std::string text;
  if (py::isinstance<py::str>(value) || py::isinstance<py::bytes>(value)) {
    text = value.cast<std::string>();
  } else if (py::hasattr(value, "__fspath__")) {
    text = PathArg(value, flag.c_str());
  } else {
    text = py::str(value).cast<std::string>();  // numbers: Python's shortest round-trip text
  }
  CheckNoNul(text, flag);
  config.Set(flag, text);
}

struct PyCache {
  std::shared_ptr<PyModel> model;
  KvConfig config;
  std::unique_ptr<KvCache> cache;
  std::mutex mu;                   // held by every call that touches the cache
  const void* stream = nullptr;    // an unfinished generate_stream that owns the cache

  // The DynaKV storage under any eviction wrappers, or nullptr.
  const DynaKvCache* Dyna() const {
    const KvCache* c = cache.get();
    while (const auto* w = dynamic_cast<const KvCacheWrapper*>(c)) c = &w->inner();
    return dynamic_cast<const DynaKvCache*>(c);
  }
  void CheckLayer(int layer) const {
    const int L = cache->shape().n_layer;
    if (layer < 0 || layer >= L)
      BadArg("layer: " + std::to_string(layer) + " is outside [0, " + std::to_string(L) + ")");
  }
  double Fraction() const {
    const int n = cache->n_tokens();
    if (n == 0) return 0.0;
    return static_cast<double>(cache->BytesUsed()) /
           (static_cast<double>(Fp16FullBytesPerToken(cache->shape())) * n);
  }
};

// Exclusive use of a cache for one call. Never blocks (so it cannot deadlock with the GIL): a cache
// busy in another thread, or owned by an unfinished stream, is a RuntimeError. Reads (kRead) are
// allowed between a stream's steps.
class CacheLock {
 public:
  enum Mode { kRead, kWrite };
  CacheLock(PyCache& c, Mode mode, const void* owner = nullptr) : c_(c) {
    if (mode == kWrite && c.stream != nullptr && c.stream != owner)
      throw std::runtime_error("cache: in use by an unfinished generate_stream (exhaust it or call its close())");
    if (!c.mu.try_lock()) throw std::runtime_error("cache: in use by another thread");
  }
  ~CacheLock() { c_.mu.unlock(); }
  CacheLock(const CacheLock&) = delete;
  CacheLock& operator=(const CacheLock&) = delete;

 private:
  PyCache& c_;
};

std::shared_ptr<PyCache> MakeCache(const std::shared_ptr<PyModel>& model, const KvConfig& config, int capacity) {
  auto pc = std::make_shared<PyCache>();
  pc->model = model;
  pc->config = config;
  StatusOr<std::unique_ptr<KvCache>> made = Status(Code::kInternal, "not made");
  {
    py::gil_scoped_release nogil;  // a profile may be loaded
    made = CreateKvCache(config, model->Info(), capacity);
  }
  pc->cache = Take(std::move(made));
  return pc;
}

std::shared_ptr<PyCache> NewCache(const std::shared_ptr<PyModel>& model, const std::string& kv,
                                  const std::string& evict, const py::object& capacity, const py::kwargs& flags) {
  NeedModel(model);
  KvConfig config;
  config.method = kv;
  config.evict = evict;
  for (const auto& [key, value] : flags) SetFlag(config, key.cast<std::string>(), value);
  int cap = model->c().n_ctx_train;
  if (!capacity.is_none()) {
    if (!py::isinstance<py::int_>(capacity) || py::isinstance<py::bool_>(capacity))
      BadArg("capacity: expected an integer number of tokens");
    const long long v = capacity.cast<long long>();
    if (v < 1 || v > (1 << 24)) BadArg("capacity: expected 1..16777216 tokens, found " + std::to_string(v));
    cap = static_cast<int>(v);
  }
  return MakeCache(model, config, cap);
}

// The cache a call runs on: the caller's (checked against the model) or a fresh one.
std::shared_ptr<PyCache> CacheFor(const std::shared_ptr<PyModel>& model, const std::shared_ptr<PyCache>& given,
                                  const KvConfig& fallback, int capacity) {
  if (!given) return MakeCache(model, fallback, capacity);
  const Model& a = given->model->m();
  if (a.fingerprint() != model->m().fingerprint() || !(a.config().kv_shape().n_layer == model->c().n_layer &&
                                                       a.config().kv_shape().kv_dim() == model->c().kv_shape().kv_dim()))
    BadArg("cache: built for the model " + given->model->path + ", not " + model->path);
  return given;
}

py::dict MethodDict(const KvMethod& m) {
  py::list flags;
  for (const KvFlag& f : m.flags) {
    std::string kw = f.name.substr(f.name.find_first_not_of('-'));
    std::replace(kw.begin(), kw.end(), '-', '_');
    flags.append(py::dict(py::arg("name") = f.name, py::arg("keyword") = kw, py::arg("metavar") = f.metavar,
                          py::arg("switch") = f.metavar.empty(), py::arg("help") = f.help));
  }
  return py::dict(py::arg("name") = m.name, py::arg("summary") = m.summary,
                  py::arg("kind") = m.is_wrapper() ? "evict" : "kv", py::arg("flags") = flags);
}

// ---- Generation --------------------------------------------------------------------------------

struct GenerateArgs {
  int n_predict = 64;
  SamplerOptions sampler;
  int threads = 0;
  int batch = 512;
};

GenerateArgs CheckGenerateArgs(int n_predict, double temperature, int top_k, double top_p, uint64_t seed, int threads,
                               int batch) {
  if (n_predict < 0) BadArg("n_predict: must be 0 or more, found " + std::to_string(n_predict));
  if (!(temperature >= 0.0 && temperature <= 100.0)) BadArg("temperature: expected a number in [0, 100]");
  if (top_k < 0) BadArg("top_k: must be 0 (off) or positive, found " + std::to_string(top_k));
  if (!(top_p >= 0.0 && top_p <= 1.0)) BadArg("top_p: expected a number in [0, 1]");
  if (batch < 1) BadArg("batch: must be positive, found " + std::to_string(batch));
  GenerateArgs a;
  a.n_predict = n_predict;
  a.sampler = SamplerOptions{static_cast<float>(temperature), top_k, static_cast<float>(top_p), seed};
  a.threads = Threads(threads);
  a.batch = batch;
  return a;
}

int ContextFor(const PyModel& pm, int ctx) {
  if (ctx < 0) BadArg("ctx: must be 0 (the model's training context) or positive, found " + std::to_string(ctx));
  return ctx > 0 ? ctx : pm.c().n_ctx_train;
}

const char* StopReason(bool eog, bool capacity) { return eog ? "eog" : capacity ? "capacity" : "length"; }

py::dict Generate(const std::shared_ptr<PyModel>& model, const py::object& prompt,
                  const std::shared_ptr<PyCache>& cache_arg, int n_predict, double temperature, int top_k,
                  double top_p, uint64_t seed, int threads, int ctx, int batch) {
  NeedModel(model);
  const GenerateArgs a = CheckGenerateArgs(n_predict, temperature, top_k, top_p, seed, threads, batch);
  const std::vector<int32_t> tokens = PromptTokens(*model, prompt);
  auto pc = CacheFor(model, cache_arg, KvConfig{}, ContextFor(*model, ctx));
  CacheLock lock(*pc, CacheLock::kWrite);
  const Model& m = model->m();
  std::vector<int32_t> out;
  std::string text;
  StatusOr<GenerateStats> stats = Status(Code::kInternal, "not run");
  SignalCheck signals;
  {
    py::gil_scoped_release nogil;
    pc->cache->Clear();
    ThreadPool pool(a.threads);
    ConfigureBlasFor(a.threads);
    Sampler sampler(a.sampler);
    stats = dk::Generate(m, tokens, a.n_predict, a.batch, *pc->cache, sampler, pool, [&](int32_t tok) {
      out.push_back(tok);
      if (!m.tokenizer().IsEog(tok)) text += m.tokenizer().TokenToPiece(tok, /*special=*/false);
      return signals.Continue();
    });
  }
  signals.RaiseIfInterrupted();
  const GenerateStats s = Take(std::move(stats));
  return py::dict(py::arg("text") = Utf8(text), py::arg("tokens") = out, py::arg("n_prompt") = s.n_prompt,
                  py::arg("n_decoded") = s.n_decoded, py::arg("prefill_seconds") = s.prefill_seconds,
                  py::arg("decode_seconds") = s.decode_seconds,
                  py::arg("stop_reason") = StopReason(s.stopped_at_eog, s.stopped_at_capacity),
                  py::arg("kv_bytes") = pc->cache->BytesUsed(), py::arg("kv_fraction") = pc->Fraction());
}

// generate_stream: dk::Generate's loop one token at a time, so that Python sees each piece as soon
// as it is sampled (the tests check that the pieces join to generate()'s text).
class PyStream {
 public:
  PyStream(std::shared_ptr<PyModel> model, std::shared_ptr<PyCache> cache, std::vector<int32_t> prompt,
           const GenerateArgs& args)
      : model_(std::move(model)), cache_(std::move(cache)), prompt_(std::move(prompt)), args_(args),
        sampler_(args.sampler) {
    if (prompt_.empty()) BadArg("prompt: empty");
    CacheLock lock(*cache_, CacheLock::kWrite);
    cache_->cache->Clear();
    if (static_cast<int>(prompt_.size()) > cache_->cache->capacity())
      BadArg("generate: the prompt has " + std::to_string(prompt_.size()) + " tokens but the context holds " +
             std::to_string(cache_->cache->capacity()) + " (raise ctx or the cache's capacity, or shorten the prompt)");
    cache_->stream = this;
  }
  ~PyStream() { Release(); }
  PyStream(const PyStream&) = delete;
  PyStream& operator=(const PyStream&) = delete;

  py::str Next() {
    const auto guard = Guard();
    for (;;) {
      if (done_) {
        Release();
        if (pending_.empty()) throw py::stop_iteration();
        std::string rest;
        rest.swap(pending_);
        return Utf8(rest);
      }
      CacheLock lock(*cache_, CacheLock::kWrite, this);
      Status status;
      {
        py::gil_scoped_release nogil;
        status = Step();
      }
      if (!status.ok()) {
        done_ = true;
        error_ = true;
        Release();
        Throw(status);
      }
      const size_t ready = CompleteUtf8Prefix(pending_);
      if (ready > 0) {
        py::str piece = Utf8(pending_.substr(0, ready));
        pending_.erase(0, ready);
        return piece;
      }
    }
  }

  void Close() {
    const auto guard = Guard();
    done_ = true;
    pending_.clear();
    Release();
  }

  std::vector<int32_t> tokens() {
    const auto guard = Guard();
    return tokens_;
  }
  int n_prompt() const { return static_cast<int>(prompt_.size()); }
  int n_decoded() {
    const auto guard = Guard();
    return n_decoded_;
  }
  double prefill_seconds() {
    const auto guard = Guard();
    return prefill_seconds_;
  }
  double decode_seconds() {
    const auto guard = Guard();
    return decode_seconds_;
  }
  py::object stop_reason() {
    const auto guard = Guard();
    if (!done_) return py::none();
    return py::str(error_ ? "error" : !finished_ ? "closed" : StopReason(eog_, at_capacity_));
  }

 private:
  // One token: the prefill first (or the forward pass of the previous token), then one sample.
  // Its piece goes to pending_. Runs without the GIL. Timed as dk::Generate times it: the prefill
  // apart, everything after it (forward passes and sampling) as decode time.
  Status Step() {
    auto t = std::chrono::steady_clock::now();
    Status s = StepUntimed(&t);
    decode_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
    return s;
  }
  Status StepUntimed(std::chrono::steady_clock::time_point* decode_start) {
    const Model& m = model_->m();
    KvCache& cache = *cache_->cache;
    const auto t0 = *decode_start;
    if (!pool_) {
      pool_ = std::make_unique<ThreadPool>(args_.threads);
      ConfigureBlasFor(args_.threads);
      st_ = std::make_unique<ForwardState>(m.config(), std::min<int>(args_.batch, static_cast<int>(prompt_.size())));
      logits_.resize(m.config().n_vocab);
      for (size_t b = 0; b < prompt_.size(); b += st_->max_batch) {
        const int n = static_cast<int>(std::min<size_t>(st_->max_batch, prompt_.size() - b));
        DK_RETURN_IF_ERROR(m.Forward(prompt_.data() + b, n, cache, *st_, logits_.data(), false, *pool_));
      }
      DK_RETURN_IF_ERROR(cache.EndPrompt(*pool_));  // eviction wrappers compress the prompt now
      *decode_start = std::chrono::steady_clock::now();
      prefill_seconds_ = std::chrono::duration<double>(*decode_start - t0).count();
    } else if (forward_next_) {
      forward_next_ = false;
      if (!cache.Plan(1).ok()) {
        at_capacity_ = true;
        return Finish();
      }
      const int32_t tok = tokens_.back();
      DK_RETURN_IF_ERROR(m.Forward(&tok, 1, cache, *st_, logits_.data(), false, *pool_));
      ++n_decoded_;
    }
    if (static_cast<int>(tokens_.size()) >= args_.n_predict) return Finish();
    const int32_t tok = sampler_.Sample(logits_.data(), m.config().n_vocab);
    tokens_.push_back(tok);
    if (m.tokenizer().IsEog(tok)) {
      eog_ = true;
      return Finish();
    }
    pending_ += m.tokenizer().TokenToPiece(tok, /*special=*/false);
    if (static_cast<int>(tokens_.size()) == args_.n_predict) return Finish();
    forward_next_ = true;
    return Status::Ok();
  }
  Status Finish() {
    done_ = true;
    finished_ = true;
    return Status::Ok();
  }
  void Release() {
    if (cache_ && cache_->stream == this) cache_->stream = nullptr;
  }
  // The stream's state is the running call's while it runs (without the GIL): another thread's
  // call raises rather than waits.
  std::unique_lock<std::mutex> Guard() {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    if (!lock.owns_lock()) throw std::runtime_error("generate_stream: in use by another thread");
    return lock;
  }

  std::mutex busy_;
  std::shared_ptr<PyModel> model_;
  std::shared_ptr<PyCache> cache_;
  std::vector<int32_t> prompt_;
  GenerateArgs args_;
  Sampler sampler_;
  std::unique_ptr<ThreadPool> pool_;
  std::unique_ptr<ForwardState> st_;
  std::vector<float> logits_;
  std::vector<int32_t> tokens_;
  std::string pending_;  // bytes sampled but not yet handed out (an unfinished UTF-8 sequence)
  bool forward_next_ = false;
  bool done_ = false, finished_ = false, eog_ = false, at_capacity_ = false, error_ = false;
  int n_decoded_ = 0;
  double prefill_seconds_ = 0.0, decode_seconds_ = 0.0;
};

std::shared_ptr<PyStream> GenerateStream(const std::shared_ptr<PyModel>& model, const py::object& prompt,
                                         const std::shared_ptr<PyCache>& cache_arg, int n_predict, double temperature,
                                         int top_k, double top_p, uint64_t seed, int threads, int ctx, int batch) {
  NeedModel(model);
  const GenerateArgs a = CheckGenerateArgs(n_predict, temperature, top_k, top_p, seed, threads, batch);
  std::vector<int32_t> tokens = PromptTokens(*model, prompt);
  auto pc = CacheFor(model, cache_arg, KvConfig{}, ContextFor(*model, ctx));
  return std::make_shared<PyStream>(model, pc, std::move(tokens), a);
}

// ---- Perplexity, calibration, passkey ----------------------------------------------------------

py::dict Perplexity(const std::shared_ptr<PyModel>& model, const std::string& text,
                    const std::shared_ptr<PyCache>& cache_arg, int ctx, int chunks, bool kl, int threads, int batch,
                    const py::object& prompt_then_decode, int decode_batch) {
  NeedModel(model);
  if (ctx < 4) BadArg("ctx: the context size must be at least 4, found " + std::to_string(ctx));
  if (batch < 1) BadArg("batch: must be positive, found " + std::to_string(batch));
  if (decode_batch < 1) BadArg("decode_batch: must be positive, found " + std::to_string(decode_batch));
  CheckChunks(chunks);
  const int n_threads = Threads(threads);
  const std::vector<int32_t> tokens = model->Encode(text, true);
  // As the CLI: checks that cost nothing before anything is allocated for the run.
  if (static_cast<int64_t>(tokens.size()) < 2LL * ctx)
    BadArg("ctx " + std::to_string(ctx) + ": the text has " + std::to_string(tokens.size()) +
           " tokens; at least 2 * ctx = " + std::to_string(2LL * ctx) + " are needed (use a smaller ctx)");
  const uint64_t logit_bytes = static_cast<uint64_t>(ctx) * model->c().n_vocab * 4 * (kl ? 2 : 1);
  Check(CheckMemory(logit_bytes, "ctx " + std::to_string(ctx) + ": the logits of a chunk"));
  auto pc = CacheFor(model, cache_arg, KvConfig{}, ctx);
  std::shared_ptr<PyCache> reference;
  if (kl) reference = MakeCache(model, KvConfig{}, ctx);
  // The CLI's --prompt-then-decode, on by default with eviction.
  const bool ptd = prompt_then_decode.is_none() ? !pc->config.evict.empty() : prompt_then_decode.cast<bool>();
  const PerplexityOptions opt{ctx, batch, chunks, ptd, decode_batch};
  CacheLock lock(*pc, CacheLock::kWrite);
  StatusOr<PerplexityResult> result = Status(Code::kInternal, "not run");
  SignalCheck signals;
  {
    py::gil_scoped_release nogil;
    ThreadPool pool(n_threads);
    ConfigureBlasFor(n_threads);
    try {
      result = ComputePerplexity(model->m(), tokens, *pc->cache, reference ? reference->cache.get() : nullptr, opt,
                                 pool, [&](int, int, double) { signals.ThrowIfInterrupted(); });
    } catch (const SignalCheck::Interrupted&) {
    }
  }
  signals.RaiseIfInterrupted();
  const PerplexityResult r = Take(std::move(result));
  py::object none = py::none();
  return py::dict(
      py::arg("ppl") = r.ppl, py::arg("ppl_err") = r.ppl_err,
      py::arg("kl") = r.has_kl ? py::object(py::float_(r.kl_mean)) : none,
      py::arg("kl_err") = r.has_kl ? py::object(py::float_(r.kl_err)) : none,
      py::arg("top1") = r.has_kl ? py::object(py::float_(r.same_top1)) : none, py::arg("kv_fraction") = r.kv_fraction,
      py::arg("kv_fraction_prompt") = ptd ? py::object(py::float_(r.kv_fraction_prompt)) : none,
      py::arg("kv_bytes_per_token") = r.kv_bytes_per_token,
      py::arg("tokens_per_s") = r.n_chunks * static_cast<double>(ctx) / r.seconds, py::arg("seconds") = r.seconds,
      py::arg("n_chunks") = r.n_chunks, py::arg("n_scored") = r.n_scored, py::arg("n_tokens") = tokens.size(),
      py::arg("running_ppl") = r.running_ppl);
}

py::dict CalibrateProfile(const std::shared_ptr<PyModel>& model, const std::string& text, const py::object& out_path,
                          int ctx, int chunks, const std::optional<std::vector<int>>& levels, int threads, int batch) {
  NeedModel(model);
  if (ctx < 2) BadArg("ctx: the context size must be at least 2, found " + std::to_string(ctx));
  if (batch < 1) BadArg("batch: must be positive, found " + std::to_string(batch));
  CheckChunks(chunks);
  const int n_threads = Threads(threads);
  std::string path;
  if (!out_path.is_none()) path = PathArg(out_path, "out_path");
  CalibrateOptions opt{ctx, batch, chunks, {}};
  if (levels) {
    if (levels->empty()) BadArg("levels: the list is empty (give None for the default levels)");
    opt.levels = Take(NormalizeLevels(*levels, model->c().kv_shape().kv_dim()));
  }
  const std::vector<int32_t> tokens = model->Encode(text, true);
  StatusOr<DynaKvProfile> profile = Status(Code::kInternal, "not run");
  Status saved;
  double seconds = 0.0;
  SignalCheck signals;
  {
    py::gil_scoped_release nogil;
    ThreadPool pool(n_threads);
    ConfigureBlasFor(n_threads);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      profile = Calibrate(model->m(), tokens, opt, pool, [&](int, int) { signals.ThrowIfInterrupted(); });
    } catch (const SignalCheck::Interrupted&) {
    }
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (profile.ok() && !path.empty() && signals.Continue()) saved = SaveProfile(*profile, path);
  }
  signals.RaiseIfInterrupted();
  const DynaKvProfile p = Take(std::move(profile));
  Check(saved);
  py::list k, v;
  for (int l = 0; l < p.n_layer; ++l) {
    std::vector<double> kl, vl;
    for (int r : p.levels) {
      kl.push_back(p.ExplainedVariance(p.k[l], r));
      vl.push_back(p.ExplainedVariance(p.v[l], r));
    }
    k.append(py::cast(kl));
    v.append(py::cast(vl));
  }
  return py::dict(py::arg("n_calib_tokens") = p.n_calib_tokens, py::arg("levels") = p.levels,
                  py::arg("explained_variance_k") = k, py::arg("explained_variance_v") = v,
                  py::arg("table") = ExplainedVarianceTable(p), py::arg("seconds") = seconds,
                  py::arg("path") = path.empty() ? py::object(py::none()) : py::object(py::str(path)),
                  py::arg("bytes") = ProfileFileBytes(p));
}

py::list BucketList(const std::vector<PasskeyBucket>& buckets, const char* name, bool integer) {
  py::list out;
  for (const PasskeyBucket& b : buckets) {
    py::dict d;
    d[name] = integer ? py::object(py::int_(static_cast<int>(b.value))) : py::object(py::float_(b.value));
    d["n"] = b.n;
    d["correct"] = b.correct;
    d["accuracy"] = b.accuracy();
    out.append(d);
  }
  return out;
}

py::dict Passkey(const std::shared_ptr<PyModel>& model, const std::string& text,
                 const std::shared_ptr<PyCache>& cache_arg, const std::optional<std::vector<int>>& lengths,
                 const std::optional<std::vector<double>>& depths, int per_cell, uint64_t seed, int n_predict, int ctx,
                 int threads) {
  NeedModel(model);
  PasskeyOptions opt;
  if (lengths) opt.lengths = *lengths;
  if (depths) opt.depths = *depths;
  opt.per_cell = per_cell;
  opt.seed = seed;
  opt.n_predict = n_predict;
  Check(ValidatePasskeyOptions(opt));
  const int n_threads = Threads(threads);
  const int n_ctx = cache_arg ? cache_arg->cache->capacity() : ContextFor(*model, ctx);
  const int max_prompt_tokens = n_ctx - (opt.n_predict - 1);
  if (max_prompt_tokens < 1) BadArg("ctx: the context must hold more than n_predict tokens");
  StatusOr<std::vector<PasskeyCase>> cases = Status(Code::kInternal, "not made");
  {
    py::gil_scoped_release nogil;
    cases = MakePasskeyCases(text, opt, &model->m().tokenizer(), max_prompt_tokens);
  }
  const std::vector<PasskeyCase> made = Take(std::move(cases));
  auto pc = CacheFor(model, cache_arg, KvConfig{}, n_ctx);
  CacheLock lock(*pc, CacheLock::kWrite);
  StatusOr<std::vector<PasskeyResult>> results = Status(Code::kInternal, "not run");
  SignalCheck signals;
  {
    py::gil_scoped_release nogil;
    ThreadPool pool(n_threads);
    ConfigureBlasFor(n_threads);
    try {
      results = RunPasskey(model->m(), made, opt.n_predict, *pc->cache, pool,
                           [&](int, const PasskeyResult&) { signals.ThrowIfInterrupted(); });
    } catch (const SignalCheck::Interrupted&) {
    }
  }
  signals.RaiseIfInterrupted();
  const std::vector<PasskeyResult> rs = Take(std::move(results));
  const PasskeySummary s = SummarizePasskey(rs);
  py::list list;
  for (size_t i = 0; i < rs.size(); ++i) {
    const PasskeyResult& r = rs[i];
    list.append(py::dict(py::arg("length") = r.length, py::arg("depth") = r.depth, py::arg("phrase") = r.phrase,
                         py::arg("key") = r.key, py::arg("offset") = made[i].offset,
                         py::arg("continuation") = Utf8(r.continuation), py::arg("correct") = r.correct,
                         py::arg("n_prompt") = r.n_prompt, py::arg("n_generated") = r.n_generated,
                         py::arg("kv_bytes") = r.kv_bytes, py::arg("kv_fraction") = r.kv_fraction,
                         py::arg("seconds") = r.seconds));
  }
  return py::dict(py::arg("accuracy") = s.accuracy, py::arg("correct") = s.correct, py::arg("n") = s.n,
                  py::arg("kv_fraction") = s.mean_kv_fraction, py::arg("seconds") = s.seconds,
                  py::arg("prompt_tokens") = s.n_prompt_tokens,
                  py::arg("by_length") = BucketList(s.by_length, "length", true),
                  py::arg("by_depth") = BucketList(s.by_depth, "depth", false), py::arg("cases") = list);
}

}  // namespace

}  // namespace dk::python

// ---- The module ----------------------------------------------------------------------------------

PYBIND11_MODULE(dynakv, mod) {
  using namespace dk;
  using namespace dk::python;
  using namespace pybind11::literals;
  mod.doc() = "dynakv: Llama-family inference on CPU with compressed KV caches (DynaKV, quantized, eviction)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OsError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });

  py::class_<PyModel, std::shared_ptr<PyModel>>(mod, "Model", "A GGUF model (llama / qwen2), loaded once.")
      .def(py::init(&LoadModel), "path"_a)
      .def_property_readonly("path", [](const PyModel& p) { return p.path; })
      .def_property_readonly("name", [](const PyModel& p) { return p.c().name; })
      .def_property_readonly("arch", [](const PyModel& p) { return p.c().arch; })
      .def_property_readonly("n_layer", [](const PyModel& p) { return p.c().n_layer; })
      .def_property_readonly("n_head", [](const PyModel& p) { return p.c().n_head; })
      .def_property_readonly("n_head_kv", [](const PyModel& p) { return p.c().n_head_kv; })
      .def_property_readonly("head_dim", [](const PyModel& p) { return p.c().head_dim; })
      .def_property_readonly("n_embd", [](const PyModel& p) { return p.c().n_embd; })
      .def_property_readonly("n_ff", [](const PyModel& p) { return p.c().n_ff; })
      .def_property_readonly("n_vocab", [](const PyModel& p) { return p.c().n_vocab; })
      .def_property_readonly("n_ctx_train", [](const PyModel& p) { return p.c().n_ctx_train; })
      .def_property_readonly("kv_dim", [](const PyModel& p) { return p.c().kv_shape().kv_dim(); })
      .def_property_readonly("kv_bytes_per_token",
                             [](const PyModel& p) { return Fp16FullBytesPerToken(p.c().kv_shape()); },
                             "bytes per token of the fp16 full cache: the denominator of every cache fraction")
      .def_property_readonly("bos_id", [](const PyModel& p) { return p.m().tokenizer().bos_id(); })
      .def_property_readonly("eos_id", [](const PyModel& p) { return p.m().tokenizer().eos_id(); })
      .def_property_readonly("fingerprint", [](const PyModel& p) { return p.m().fingerprint(); })
      .def(
          "tokenize", [](const PyModel& p, const std::string& text, bool bos) { return p.Encode(text, bos); }, "text"_a,
          "bos"_a = true, "token ids; bos: add BOS (and EOS where the file says so), as the CLI does")
      .def(
          "detokenize",
          [](const PyModel& p, const std::vector<int32_t>& ids, bool special) {
            p.CheckIds(ids, "ids");
            return Utf8(p.m().tokenizer().Decode(ids, special));
          },
          "ids"_a, "special"_a = true,
          "text of token ids (SentencePiece's leading space kept); special: control tokens as their text "
          "(BOS as '<s>', as llama.cpp detokenizes), else left out, as generated text shows them")
      .def(
          "token_to_piece",
          [](const PyModel& p, int32_t id, bool special) {
            p.CheckIds({id}, "id");
            return Utf8(p.m().tokenizer().TokenToPiece(id, special));
          },
          "id"_a, "special"_a = true)
      .def("__repr__", [](const PyModel& p) {
        return "<dynakv.Model '" + p.c().name + "' " + p.c().arch + ", " + std::to_string(p.c().n_layer) +
               " layers, from " + p.path + ">";
      });

  py::class_<PyCache, std::shared_ptr<PyCache>>(mod, "Cache",
                                                "A KV cache of any registered method (kv=) and eviction wrapper "
                                                "(evict=); the methods' flags as keywords: kv_budget=0.25 is "
                                                "--kv-budget 0.25")
      .def(py::init(&NewCache), "model"_a, "kv"_a = "full", "evict"_a = "", "capacity"_a = py::none())
      .def_property_readonly("model", [](const PyCache& c) { return c.model; })
      .def_property_readonly("name", [](PyCache& c) {
        CacheLock lock(c, CacheLock::kRead);
        return c.cache->name();
      })
      .def_property_readonly("method", [](const PyCache& c) { return c.config.method; })
      .def_property_readonly("evict", [](const PyCache& c) { return c.config.evict; })
      .def_property_readonly("flags", [](const PyCache& c) { return c.config.options.values(); })
      .def_property_readonly("config", [](const PyCache& c) { return c.config.Describe(); },
                             "the configuration as the CLI would name it: 'dynakv --profile p.dkv ...'")
      .def_property_readonly("capacity", [](const PyCache& c) { return c.cache->capacity(); })
      .def_property_readonly("n_layer", [](const PyCache& c) { return c.cache->shape().n_layer; })
      .def_property_readonly("kv_dim", [](const PyCache& c) { return c.cache->shape().kv_dim(); })
      .def_property_readonly("n_tokens", [](PyCache& c) {
        CacheLock lock(c, CacheLock::kRead);
        return c.cache->n_tokens();
      })
      .def_property_readonly("bytes_used", [](PyCache& c) {
        CacheLock lock(c, CacheLock::kRead);
        return c.cache->BytesUsed();
      })
      .def_property_readonly("bytes_reserved", [](PyCache& c) {
        CacheLock lock(c, CacheLock::kRead);
        return c.cache->BytesReserved();
      })
      .def_property_readonly(
          "fraction",
          [](PyCache& c) {
            CacheLock lock(c, CacheLock::kRead);
            return c.Fraction();
          },
          "bytes_used / the fp16 full cache's bytes for the tokens seen (n_tokens); 0 when empty")
      .def("clear", [](PyCache& c) {
        CacheLock lock(c, CacheLock::kWrite);
        c.cache->Clear();
      })
      .def(
          "stored",
          [](PyCache& c, int layer) {
            CacheLock lock(c, CacheLock::kRead);
            c.CheckLayer(layer);
            return c.cache->Stored(layer);
          },
          "layer"_a, "tokens the layer stores (fewer than n_tokens after eviction)")
      .def(
          "ranks",
          [](PyCache& c, const std::optional<int>& layer) {
            CacheLock lock(c, CacheLock::kRead);
            const DynaKvCache* d = c.Dyna();
            if (d == nullptr)
              BadArg("ranks: the cache is " + c.cache->name() + ", not a DynaKV cache (kv=\"dynakv\")");
            const int L = c.cache->shape().n_layer;
            const int first = layer ? *layer : 0, last = layer ? *layer + 1 : L;
            if (layer) c.CheckLayer(*layer);
            const int S = d->Stored(first);
            for (int l = first; l < last; ++l)
              if (d->Stored(l) != S)
                BadArg("ranks: the layers store different numbers of tokens after eviction; ask per layer: "
                       "ranks(layer)");
            py::array_t<int32_t> out(layer ? std::vector<py::ssize_t>{S, 2} : std::vector<py::ssize_t>{L, S, 2});
            int32_t* o = out.mutable_data();
            for (int l = first; l < last; ++l)
              for (int t = 0; t < S; ++t) {
                const TokenRanks r = d->Ranks(l, t);
                *o++ = r.r_k;
                *o++ = r.r_v;
              }
            return out;
          },
          "layer"_a = py::none(),
          "DynaKV only: int32 (r_K, r_V) of every stored token, [n_layer][stored][2] (or [stored][2] for one "
          "layer)")
      .def(
          "keys",
          [](PyCache& c, int layer) {
            CacheLock lock(c, CacheLock::kRead);
            c.CheckLayer(layer);
            const int S = c.cache->Stored(layer), D = c.cache->shape().kv_dim();
            py::array_t<float> out(std::vector<py::ssize_t>{S, D});
            if (S > 0) c.cache->ReadKeys(layer, 0, S, out.mutable_data());
            return out;
          },
          "layer"_a, "float32 [stored][kv_dim]: the stored keys (after RoPE) as attention sees them")
      .def(
          "values",
          [](PyCache& c, int layer) {
            CacheLock lock(c, CacheLock::kRead);
            c.CheckLayer(layer);
            const int S = c.cache->Stored(layer), D = c.cache->shape().kv_dim();
            py::array_t<float> out(std::vector<py::ssize_t>{S, D});
            if (S > 0) c.cache->ReadValues(layer, 0, S, out.mutable_data());
            return out;
          },
          "layer"_a, "float32 [stored][kv_dim]: the stored values as attention sees them")
      .def("__repr__", [](PyCache& c) { return "<dynakv.Cache " + c.config.Describe() + ">"; });

  py::class_<PyStream, std::shared_ptr<PyStream>>(mod, "GenerateStream",
                                                  "Iterator over the text pieces of a generation")
      .def("__iter__", [](py::object self) { return self; })
      .def("__next__", &PyStream::Next)
      .def("close", &PyStream::Close, "stop early; the cache is free again")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyStream& s, const py::args&) { s.Close(); })
      .def_property_readonly("tokens", &PyStream::tokens)
      .def_property_readonly("n_prompt", &PyStream::n_prompt)
      .def_property_readonly("n_decoded", &PyStream::n_decoded)
      .def_property_readonly("prefill_seconds", &PyStream::prefill_seconds)
      .def_property_readonly("decode_seconds", &PyStream::decode_seconds)
      .def_property_readonly("stop_reason", &PyStream::stop_reason,
                             "None while running, then 'length', 'eog', 'capacity', 'closed' or 'error'");

  mod.def(
      "methods",
      [] {
        py::list out;
        for (const KvMethod* m : KvMethods()) out.append(MethodDict(*m));
        return out;
      },
      "the registered KV cache methods (kind 'kv') and eviction wrappers (kind 'evict'), with their flags");

  mod.def("generate", &dk::python::Generate, "model"_a, "prompt"_a, "cache"_a = py::none(), "n_predict"_a = 64,
          "temperature"_a = 0.0, "top_k"_a = 40, "top_p"_a = 0.95, "seed"_a = 0, "threads"_a = 0, "ctx"_a = 0,
          "batch"_a = 512,
          "prefill the prompt (text with BOS, or token ids) into the cache (cleared first; a full cache of ctx "
          "tokens when None), then sample n_predict tokens (greedy at temperature 0)");
  mod.def("generate_stream", &GenerateStream, "model"_a, "prompt"_a, "cache"_a = py::none(), "n_predict"_a = 64,
          "temperature"_a = 0.0, "top_k"_a = 40, "top_p"_a = 0.95, "seed"_a = 0, "threads"_a = 0, "ctx"_a = 0,
          "batch"_a = 512, "generate() as an iterator of text pieces");
  mod.def("perplexity", &Perplexity, "model"_a, "text"_a, "cache"_a = py::none(), "ctx"_a = 512, "chunks"_a = -1,
          "kl"_a = false, "threads"_a = 0, "batch"_a = 2048, "prompt_then_decode"_a = py::none(),
          "decode_batch"_a = 16, "perplexity of a text as 'dynakv perplexity' (llama.cpp's procedure)");
  mod.def("calibrate", &CalibrateProfile, "model"_a, "text"_a, "out_path"_a = py::none(), "ctx"_a = 512,
          "chunks"_a = -1, "levels"_a = py::none(), "threads"_a = 0, "batch"_a = 512,
          "fit a DynaKV profile as 'dynakv calibrate' and write it to out_path");
  mod.def("passkey", &Passkey, "model"_a, "text"_a, "cache"_a = py::none(), "lengths"_a = py::none(),
          "depths"_a = py::none(), "per_cell"_a = 2, "seed"_a = 1, "n_predict"_a = 8, "ctx"_a = 0, "threads"_a = 0,
          "passkey retrieval as 'dynakv passkey'");
}
