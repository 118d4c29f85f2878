#include "core/threads.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>

#include "core/env.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

extern "C" void openblas_set_num_threads(int);
extern "C" int openblas_get_num_threads(void);

namespace dk {
namespace {

// How long an idle worker (or a caller whose chunks are all taken) spins before it sleeps: long
// enough to cover the gap between two kernels of one token, short enough that a busy machine
// loses little to it.
constexpr int64_t kSpinNs = 50'000;
constexpr uint32_t kMaxChunks = (1u << 20) - 1;
constexpr uint32_t kGenMask = (1u << 24) - 1;

// The pool whose chunk this thread is running (nested calls run inline).
thread_local const ThreadPool* tls_pool = nullptr;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#else
  std::this_thread::yield();
#endif
}

inline uint64_t Pack(uint32_t gen, uint32_t chunks, uint32_t next) {
  return (static_cast<uint64_t>(gen & kGenMask) << 40) | (static_cast<uint64_t>(chunks) << 20) | next;
}

void RangeOf(int64_t n, int64_t parts, int64_t index, int64_t* begin, int64_t* end) {
  const int64_t base = n / parts, extra = n % parts;
  *begin = index * base + std::min<int64_t>(index, extra);
  *end = *begin + base + (index < extra ? 1 : 0);
}

// Spins until pred() or kSpinNs passed; returns pred().
template <typename Pred>
bool SpinFor(Pred pred) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 1;; ++i) {
    if (pred()) return true;
    CpuRelax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(kSpinNs)) return pred();
  }
}

class ScopedPool {
 public:
  explicit ScopedPool(const ThreadPool* p) : before_(tls_pool) { tls_pool = p; }
  ~ScopedPool() { tls_pool = before_; }
  ScopedPool(const ScopedPool&) = delete;
  ScopedPool& operator=(const ScopedPool&) = delete;

 private:
  const ThreadPool* before_;
};

}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
  workers_.reserve(static_cast<size_t>(n_threads_ - 1));
  for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_seq_cst);
  generation_.fetch_add(1, std::memory_order_seq_cst);
  generation_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  Run(n, static_cast<uint32_t>(n_threads_), &fn, nullptr);
}

void ThreadPool::ParallelForChunked(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk) {
  if (n <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  const int64_t want = n_threads_ == 1 ? 1 : std::min<int64_t>((n + min_chunk - 1) / min_chunk,
                                         static_cast<int64_t>(n_threads_) * kChunksPerThread);
  Run(n, static_cast<uint32_t>(std::clamp<int64_t>(want, 1, kMaxChunks)), nullptr, &fn);
}

Status ThreadPool::TryParallelFor(int64_t n, const std::function<Status(int64_t, int64_t, int)>& fn) {
  std::vector<Status> status(static_cast<size_t>(n_threads_));
  ParallelFor(n, [&](int64_t b, int64_t e, int part) { status[static_cast<size_t>(part)] = fn(b, e, part); });
  for (Status& s : status)
    if (!s.ok()) return s;
  return Status::Ok();
}

void ThreadPool::RunInline(int64_t n, uint32_t chunks, const std::function<void(int64_t, int64_t, int)>* fn3,
                           const std::function<void(int64_t, int64_t)>* fn2) {
  std::exception_ptr first;
  for (uint32_t c = 0; c < chunks; ++c) {
    int64_t b, e;
    RangeOf(n, chunks, c, &b, &e);
    if (b >= e) continue;
    try {
      if (fn3 != nullptr) {
        (*fn3)(b, e, static_cast<int>(c));
      } else {
        (*fn2)(b, e);
      }
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

void ThreadPool::Run(int64_t n, uint32_t chunks, const std::function<void(int64_t, int64_t, int)>* fn3,
                     const std::function<void(int64_t, int64_t)>* fn2) {
  // One thread, one chunk, or a call from inside one of this pool's own chunks: no hand-off.
  if (n_threads_ == 1 || chunks <= 1 || n == 1 || tls_pool == this) {
    RunInline(n, chunks, fn3, fn2);
    return;
  }
  const std::lock_guard<std::mutex> submit(submit_mu_);
  const ScopedPool in_pool(this);
  job_n_ = n;
  job_chunks_ = chunks;
  job_fn3_ = fn3;
  job_fn2_ = fn2;
  error_ = nullptr;
  done_.store(0, std::memory_order_relaxed);
  const uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
  claim_.store(Pack(gen, chunks, 0), std::memory_order_release);
  generation_.store(gen, std::memory_order_seq_cst);
  // Wake only as many sleeping workers as there are chunks beyond the caller's first.
  const int sleeping = sleepers_.load(std::memory_order_seq_cst);
  for (int i = 0; i < std::min<int>(sleeping, static_cast<int>(chunks) - 1); ++i) generation_.notify_one();

  ClaimAndRun(gen);  // the caller works too: with every worker descheduled, it does the whole job

  if (!SpinFor([&] { return done_.load(std::memory_order_acquire) == chunks; })) {
    for (;;) {
      caller_sleeping_.store(true, std::memory_order_seq_cst);
      const uint32_t d = done_.load(std::memory_order_seq_cst);
      if (d == chunks) break;
      done_.wait(d, std::memory_order_seq_cst);
    }
    caller_sleeping_.store(false, std::memory_order_relaxed);
  }
  job_fn3_ = nullptr;
  job_fn2_ = nullptr;
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

bool ThreadPool::ClaimAndRun(uint32_t gen) {
  bool ran = false;
  uint64_t c = claim_.load(std::memory_order_acquire);
  for (;;) {
    if (static_cast<uint32_t>(c >> 40) != (gen & kGenMask)) return ran;
    const uint32_t chunks = static_cast<uint32_t>(c >> 20) & kMaxChunks, next = static_cast<uint32_t>(c) & kMaxChunks;
    if (next >= chunks) return ran;
    if (!claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    // Chunk `next` is ours: the job cannot end (nor its fields change) before we count it done.
    RunChunk(next);
    ran = true;
    if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == chunks &&
        caller_sleeping_.load(std::memory_order_seq_cst))
      done_.notify_one();
    c = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::RunChunk(uint32_t chunk) {
  int64_t b, e;
  RangeOf(job_n_, job_chunks_, chunk, &b, &e);
  if (b >= e) return;
  try {
    if (job_fn3_ != nullptr) {
      (*job_fn3_)(b, e, static_cast<int>(chunk));
    } else {
      (*job_fn2_)(b, e);
    }
  } catch (...) {
    const std::lock_guard<std::mutex> lock(error_mu_);
    if (!error_) error_ = std::current_exception();
  }
}

void ThreadPool::WorkerLoop() {
  const ScopedPool in_pool(this);
  uint32_t seen = 0;  // the generation at construction: a job submitted before we start is still seen
  for (;;) {
    uint32_t g = generation_.load(std::memory_order_acquire);
    if (g == seen && !SpinFor([&] { return (g = generation_.load(std::memory_order_acquire)) != seen; })) {
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      while ((g = generation_.load(std::memory_order_seq_cst)) == seen) generation_.wait(seen, std::memory_order_seq_cst);
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = g;
    ClaimAndRun(g);
  }
}

void SetBlasThreads(int n) { openblas_set_num_threads(std::max(1, n)); }

int BlasThreads() { return openblas_get_num_threads(); }

int BlasThreadsFor(int pool_threads) {
  pool_threads = std::max(1, pool_threads);
  if (const std::optional<long> v = EnvInt("DYNAKV_BLAS_THREADS")) return *v == 0 ? pool_threads : static_cast<int>(*v);
  return 1;
}

void ConfigureBlasFor(int pool_threads) { SetBlasThreads(BlasThreadsFor(pool_threads)); }

}  // namespace dk
