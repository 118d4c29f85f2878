// A small fixed thread pool: ParallelFor splits [0, n) into contiguous ranges, one per thread,
// and the calling thread takes part. Also sets OpenBLAS's thread count so GEMMs use the same budget.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dk {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }
  // Calls fn(begin, end, thread_index) over disjoint ranges covering [0, n). Blocks until done.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn);

 private:
  void WorkerLoop(int index);

  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_start_;
  std::condition_variable cv_done_;
  const std::function<void(int64_t, int64_t, int)>* job_ = nullptr;
  int64_t job_n_ = 0;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

// Sets OpenBLAS's thread count (no-op when the library does not expose it).
void SetBlasThreads(int n);
// OpenBLAS's thread count now.
int BlasThreads();

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
