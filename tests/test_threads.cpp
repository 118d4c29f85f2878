#include <gtest/gtest.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "core/threads.h"

namespace dk {
namespace {

TEST(ThreadPool, CoversEveryIndexExactlyOnce) {
  for (int threads : {1, 2, 3, 7}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 2, 5, 64, 1000}) {
      std::vector<std::atomic<int>> hits(n);
      for (int rep = 0; rep < 3; ++rep)
        pool.ParallelFor(n, [&](int64_t b, int64_t e, int tid) {
          EXPECT_GE(tid, 0);
          EXPECT_LT(tid, threads);
          for (int64_t i = b; i < e; ++i) hits[i]++;
        });
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 3) << "threads " << threads << " n " << n << " i " << i;
    }
  }
}

}  // namespace
}  // namespace dk

// ---- The scheduler (docs/architecture.md, Threads) ----

namespace dk {
namespace {

TEST(ThreadPool, PartsAreTheFixedRangesWhoeverRunsThem) {
  // Part p is always the same range: kernels keeping one accumulator per part get the same bits.
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 7, 100, 1001}) {
      std::vector<std::pair<int64_t, int64_t>> seen(threads, {-1, -1});
      std::vector<std::atomic<int>> calls(threads);
      pool.ParallelFor(n, [&](int64_t b, int64_t e, int part) {
        seen[part] = {b, e};
        calls[part]++;
      });
      const int64_t base = n / threads, extra = n % threads;
      for (int p = 0; p < threads; ++p) {
        const int64_t b = p * base + std::min<int64_t>(p, extra), e = b + base + (p < extra ? 1 : 0);
        if (b == e) {
          EXPECT_EQ(calls[p].load(), 0);
          continue;
        }
        EXPECT_EQ(calls[p].load(), 1) << "threads " << threads << " n " << n << " part " << p;
        EXPECT_EQ(seen[p], std::make_pair(b, e)) << "threads " << threads << " n " << n << " part " << p;
      }
    }
  }
}

TEST(ThreadPool, ChunkedCoversEveryIndexExactlyOnce) {
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 3, 64, 1000, 100000}) {
      for (int64_t grain : {1, 7, 1000}) {
        std::vector<std::atomic<int>> hits(n);
        pool.ParallelForChunked(
            n,
            [&](int64_t b, int64_t e) {
              ASSERT_LT(b, e);
              for (int64_t i = b; i < e; ++i) hits[i]++;
            },
            grain);
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "threads " << threads << " n " << n;
      }
    }
  }
}

TEST(ThreadPool, ManyTinyJobs) {
  ThreadPool pool(3);
  std::atomic<int64_t> sum{0};
  for (int rep = 0; rep < 20000; ++rep) {
    pool.ParallelFor(3, [&](int64_t b, int64_t e, int) { sum += e - b; });
    pool.ParallelForChunked(5, [&](int64_t b, int64_t e) { sum += e - b; });
  }
  EXPECT_EQ(sum.load(), 20000 * 8);
}

TEST(ThreadPool, APoolOfOneRunsOnTheCaller) {
  ThreadPool pool(1);
  EXPECT_EQ(pool.size(), 1);
  const auto me = std::this_thread::get_id();
  int calls = 0;
  pool.ParallelFor(10, [&](int64_t b, int64_t e, int part) {
    EXPECT_EQ(std::this_thread::get_id(), me);
    EXPECT_EQ(b, 0);
    EXPECT_EQ(e, 10);
    EXPECT_EQ(part, 0);
    ++calls;
  });
  pool.ParallelForChunked(10, [&](int64_t, int64_t) {
    EXPECT_EQ(std::this_thread::get_id(), me);
    ++calls;
  });
  EXPECT_GE(calls, 2);
  EXPECT_EQ(ThreadPool(0).size(), 1);
  EXPECT_EQ(ThreadPool(-3).size(), 1);
}

TEST(ThreadPool, ExceptionsReachTheCallerAndThePoolGoesOn) {
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    std::atomic<int> ran{0};
    EXPECT_THROW(pool.ParallelFor(100,
                                  [&](int64_t b, int64_t, int) {
                                    ran++;
                                    if (b == 0) throw std::runtime_error("part 0");
                                  }),
                 std::runtime_error);
    EXPECT_EQ(ran.load(), threads);  // the other parts still ran
    EXPECT_THROW(pool.ParallelForChunked(1000, [&](int64_t, int64_t e) {
      if (e == 1000) throw std::logic_error("last chunk");
    }),
                 std::logic_error);
    std::atomic<int64_t> covered{0};
    pool.ParallelFor(100, [&](int64_t b, int64_t e, int) { covered += e - b; });
    EXPECT_EQ(covered.load(), 100);
  }
}

TEST(ThreadPool, TryParallelForReturnsTheFirstErrorInPartOrder) {
  ThreadPool pool(4);
  const Status ok = pool.TryParallelFor(40, [](int64_t, int64_t, int) { return Status::Ok(); });
  EXPECT_TRUE(ok.ok());
  for (int rep = 0; rep < 50; ++rep) {
    const Status s = pool.TryParallelFor(40, [](int64_t, int64_t, int part) {
      if (part == 1) return InvalidArgument("part one");
      if (part == 3) return InvalidArgument("part three");
      return Status::Ok();
    });
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.message(), "part one");
  }
}

TEST(ThreadPool, NestedCallsRunInline) {
  ThreadPool pool(3);
  std::vector<std::atomic<int>> hits(30 * 30);
  pool.ParallelForChunked(30, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      pool.ParallelFor(30, [&](int64_t jb, int64_t je, int) {
        for (int64_t j = jb; j < je; ++j) hits[i * 30 + j]++;
      });
  });
  for (auto& h : hits) ASSERT_EQ(h.load(), 1);
}

TEST(ThreadPool, ConcurrentCallersAreServedOneJobAtATime) {
  ThreadPool pool(3);
  constexpr int kCallers = 4, kJobs = 500;
  std::vector<int64_t> sums(kCallers, 0);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c)
    callers.emplace_back([&, c] {
      for (int j = 0; j < kJobs; ++j) {
        std::vector<std::atomic<int>> hits(97);
        pool.ParallelForChunked(97, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[i]++;
        });
        for (auto& h : hits) sums[c] += h.load();
      }
    });
  for (auto& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) EXPECT_EQ(sums[c], int64_t{97} * kJobs);
}

TEST(ThreadPool, AThreadStuckInAChunkDoesNotHoldTheOthers) {
  // Whichever thread is stuck in chunk 0 (a descheduled worker, say), the other takes every other chunk.
  ThreadPool pool(2);
  std::atomic<bool> release{false};
  std::atomic<int> done{0};
  std::thread unblock([&] {
    while (done.load() < 15) std::this_thread::yield();
    release = true;
  });
  pool.ParallelForChunked(16, [&](int64_t b, int64_t) {
    if (b == 0) {
      while (!release.load()) std::this_thread::yield();
    } else {
      done++;
    }
  });
  unblock.join();
  EXPECT_EQ(done.load(), 15);
}

TEST(ThreadPool, BlasThreadsForThePool) {
  EXPECT_GE(BlasThreadsFor(4), 1);
  EXPECT_LE(BlasThreadsFor(4), 4096);
}

}  // namespace
}  // namespace dk
