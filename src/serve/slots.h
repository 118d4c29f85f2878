// Slots and the queue in front of them. A slot is one sequence: its own KV cache (created once at
// start) and the tokens that cache holds. A request leases a free slot for its whole run; a slot
// whose tokens are a prefix of the new prompt (the next turn of a chat: the previous prompt and
// answer) is preferred, and only the new tokens are then computed, which gives exactly what a fresh
// slot would (slots whose cache is not batch-invariant, KvCache::BatchInvariant, are never
// reused: eviction and the energy policy with a byte budget start over). Requests that find every slot
// busy wait in a bounded FIFO queue; beyond it they are refused at once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "kv/kv_cache.h"

namespace dk {

struct Slot {
  int id = 0;
  std::unique_ptr<KvCache> cache;
  std::vector<int32_t> tokens;  // what the cache holds, in position order (touched by the lease holder only)
  // Published by the lease holder after each change, for /metrics (read without the lease).
  std::atomic<size_t> bytes_used{0};
  std::atomic<int64_t> n_tokens{0};
  void Publish() {
    bytes_used = cache->BytesUsed();
    n_tokens = cache->n_tokens();
  }
};

// How many leading tokens of `prompt` a cache holding `held` can keep: all of `held` when it is a
// proper prefix of the prompt (one new token at least must run, to give the next logits), else 0.
size_t ReusablePrefix(const std::vector<int32_t>& held, const std::vector<int32_t>& prompt);
// The tokens a slot offers for reuse: its tokens when its cache is batch-invariant
// (KvCache::BatchInvariant: extending the held prefix gives exactly what a fresh slot computes),
// nullptr otherwise (eviction, the energy policy with a byte budget): such a slot always starts over.
const std::vector<int32_t>* ReusableTokens(const Slot& slot);

// What ChooseSlot sees of a slot.
struct SlotView {
  bool busy = false;
  uint64_t last_used = 0;  // lease counter value when last released (0: never used)
  const std::vector<int32_t>* tokens = nullptr;
};
struct SlotChoice {
  int slot = -1;     // -1: every slot is busy
  size_t reuse = 0;  // prompt tokens the slot already holds
};
// The free slot that reuses the most prompt tokens; without reuse, the least recently used one
// (so a conversation's cache stays for its next turn as long as possible).
SlotChoice ChooseSlot(const std::vector<SlotView>& slots, const std::vector<int32_t>& prompt);

class SlotPool;

// A slot held by one request; released (and the next waiter woken) when destroyed.
class SlotLease {
 public:
  SlotLease() = default;
  SlotLease(SlotPool* pool, Slot* slot, size_t reuse) : pool_(pool), slot_(slot), reuse_(reuse) {}
  SlotLease(SlotLease&& o) noexcept { *this = std::move(o); }
  SlotLease& operator=(SlotLease&& o) noexcept;
  ~SlotLease() { Release(); }
  SlotLease(const SlotLease&) = delete;
  SlotLease& operator=(const SlotLease&) = delete;

  explicit operator bool() const { return slot_ != nullptr; }
  Slot& slot() const { return *slot_; }
  size_t reuse() const { return reuse_; }
  void Release();

 private:
  SlotPool* pool_ = nullptr;
  Slot* slot_ = nullptr;
  size_t reuse_ = 0;
};

// Why Acquire gave no slot.
enum class Refusal { kNone, kQueueFull, kShuttingDown, kTimeout, kCancelled };

class SlotPool {
 public:
  using Clock = std::chrono::steady_clock;

  SlotPool(std::vector<std::unique_ptr<KvCache>> caches, int queue_capacity);

  // A free slot for `prompt` (see ChooseSlot); waits in FIFO order behind earlier requests when
  // none is free, if the queue has room. Gives up at `deadline`, when `cancelled()` turns true
  // (polled while waiting: a client that hung up) or when Drain is called. An empty lease and
  // *why on refusal.
  SlotLease Acquire(const std::vector<int32_t>& prompt, Clock::time_point deadline,
                    const std::function<bool()>& cancelled, Refusal* why);
  // Refuses every waiting and future request (shutdown); leases already given stay valid.
  void Drain();

  int size() const { return static_cast<int>(slots_.size()); }
  int busy() const;
  int waiting() const;
  // Slots for /metrics (their published atomics) and for tests.
  const Slot& slot(int i) const { return *slots_[i]; }

 private:
  friend class SlotLease;
  void Release(Slot* slot);
  SlotLease TakeLocked(const std::vector<int32_t>& prompt);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<bool> busy_;
  std::vector<uint64_t> last_used_;
  uint64_t uses_ = 0;
  std::deque<uint64_t> queue_;  // tickets of waiting requests, oldest first
  uint64_t next_ticket_ = 0;
  int queue_capacity_;
  bool draining_ = false;
};

}  // namespace dk
