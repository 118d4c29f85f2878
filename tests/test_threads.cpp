#include <gtest/gtest.h>

#include <atomic>
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
