// The one scheduler for the engine's own kernels: a fixed pool whose workers spin briefly, then
// sleep on a futex (std::atomic wait/notify), and a calling thread that works instead of waiting.
//
// Work is cut into chunks that threads claim one at a time from an atomic counter, so a worker the
// OS has descheduled (a busy machine, a server's other slots) holds back at most the chunk it is
// in: the caller and the other workers take the rest. No condition variable, no lock per job.
//
// ParallelFor keeps the ranges of the old fixed split (part p of size() parts is always the same
// range), so kernels that keep one accumulator per part get the same bits whoever runs the part.
// ParallelForChunked is for index-independent work and cuts finer.
//
// OpenBLAS runs beside the pool; see SetBlasThreads and BlasThreadsFor for the budget.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "core/status.h"

namespace dk {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(begin, end, part) over size() disjoint ranges covering [0, n) (empty ranges are
  // skipped); part in [0, size()) names the range, which is the same for a given n and size()
  // whichever thread runs it, and no two calls with the same part overlap in time. Blocks until
  // all parts ran. An exception thrown by fn is rethrown here (the first one; the other parts
  // still run). Called from inside one of this pool's jobs, it runs the parts inline in order.
  // Callers on several threads are served one job at a time.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn);

  // Calls fn(begin, end) over chunks covering [0, n), each of at least `min_chunk` indices (but
  // the last), about kChunksPerThread per thread, claimed dynamically. For work whose result per
  // index does not depend on the chunk it lands in. Same blocking and exception rules.
  void ParallelForChunked(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t min_chunk = 1);

  // ParallelFor for fallible work: the first non-ok Status in part order (not in time order).
  Status TryParallelFor(int64_t n, const std::function<Status(int64_t, int64_t, int)>& fn);

  static constexpr int kChunksPerThread = 8;

 private:
  void Run(int64_t n, uint32_t chunks, const std::function<void(int64_t, int64_t, int)>* fn3,
           const std::function<void(int64_t, int64_t)>* fn2);
  void RunInline(int64_t n, uint32_t chunks, const std::function<void(int64_t, int64_t, int)>* fn3,
                 const std::function<void(int64_t, int64_t)>* fn2);
  bool ClaimAndRun(uint32_t gen);  // runs chunks of job `gen` until none is left; false if none was
  void RunChunk(uint32_t chunk);
  void WorkerLoop();

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex submit_mu_;  // one job at a time

  // The job (written by the submitting thread before claim_ is published; read after a claim).
  int64_t job_n_ = 0;
  uint32_t job_chunks_ = 0;
  const std::function<void(int64_t, int64_t, int)>* job_fn3_ = nullptr;
  const std::function<void(int64_t, int64_t)>* job_fn2_ = nullptr;
  std::mutex error_mu_;
  std::exception_ptr error_;

  // [generation:24][chunks:20][next chunk:20]: a claim is one CAS, and a late worker's claim on a
  // finished job fails on the generation.
  std::atomic<uint64_t> claim_{0};
  std::atomic<uint32_t> done_{0};        // chunks finished in the current job
  std::atomic<uint32_t> generation_{0};  // bumped per job; workers wait on it
  std::atomic<int> sleepers_{0};         // workers asleep (or about to be) on generation_
  std::atomic<bool> caller_sleeping_{false};
  std::atomic<bool> stop_{false};
};

// Sets OpenBLAS's thread count (no-op when the library does not expose it).
void SetBlasThreads(int n);
// OpenBLAS's thread count now.
int BlasThreads();
// The OpenBLAS thread count that goes with a pool of `pool_threads`: 1 (OpenBLAS's threads would
// otherwise compete with the pool's for the same cores, and spin after each call while the pool
// needs the core), unless DYNAKV_BLAS_THREADS=N overrides it (N = 0: the pool's count).
int BlasThreadsFor(int pool_threads);
// SetBlasThreads(BlasThreadsFor(pool_threads)): what every command calls after making its pool.
void ConfigureBlasFor(int pool_threads);

// OpenBLAS at `n` threads until the end of the scope, then back to the count before. For results
// that must not depend on -t: OpenBLAS splits some reductions (inside LAPACK's eigensolver) across
// its threads, so their rounding would change with the thread count.
class ScopedBlasThreads {
 public:
  explicit ScopedBlasThreads(int n) : before_(BlasThreads()) { SetBlasThreads(n); }
  ~ScopedBlasThreads() { SetBlasThreads(before_); }
  ScopedBlasThreads(const ScopedBlasThreads&) = delete;
  ScopedBlasThreads& operator=(const ScopedBlasThreads&) = delete;

 private:
  int before_;
};

}  // namespace dk
