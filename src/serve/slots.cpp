#include "serve/slots.h"

#include <algorithm>

namespace dk {

size_t ReusablePrefix(const std::vector<int32_t>& held, const std::vector<int32_t>& prompt) {
  if (held.empty() || held.size() >= prompt.size()) return 0;
  return std::equal(held.begin(), held.end(), prompt.begin()) ? held.size() : 0;
}

const std::vector<int32_t>* ReusableTokens(const Slot& slot) {
  return slot.cache->BatchInvariant() ? &slot.tokens : nullptr;
}

SlotChoice ChooseSlot(const std::vector<SlotView>& slots, const std::vector<int32_t>& prompt) {
  SlotChoice best;
  uint64_t best_used = 0;
  for (size_t i = 0; i < slots.size(); ++i) {
    const SlotView& s = slots[i];
    if (s.busy) continue;  // a busy slot's tokens belong to its lease holder: not read
    const size_t reuse = s.tokens != nullptr ? ReusablePrefix(*s.tokens, prompt) : 0;
    const bool better = best.slot < 0 || reuse > best.reuse || (reuse == best.reuse && s.last_used < best_used);
    if (better) {
      best = {static_cast<int>(i), reuse};
      best_used = s.last_used;
    }
  }
  return best;
}

SlotLease& SlotLease::operator=(SlotLease&& o) noexcept {
  if (this != &o) {
    Release();
    pool_ = o.pool_;
    slot_ = o.slot_;
    reuse_ = o.reuse_;
    o.pool_ = nullptr;
    o.slot_ = nullptr;
  }
  return *this;
}

void SlotLease::Release() {
  if (slot_ != nullptr) pool_->Release(slot_);
  pool_ = nullptr;
  slot_ = nullptr;
}

SlotPool::SlotPool(std::vector<std::unique_ptr<KvCache>> caches, int queue_capacity)
    : busy_(caches.size(), false), last_used_(caches.size(), 0), queue_capacity_(queue_capacity) {
  for (size_t i = 0; i < caches.size(); ++i) {
    auto slot = std::make_unique<Slot>();
    slot->id = static_cast<int>(i);
    slot->cache = std::move(caches[i]);
    slot->Publish();
    slots_.push_back(std::move(slot));
  }
}

SlotLease SlotPool::TakeLocked(const std::vector<int32_t>& prompt) {
  std::vector<SlotView> views(slots_.size());
  for (size_t i = 0; i < slots_.size(); ++i) views[i] = {busy_[i], last_used_[i],
                                                   ReusableTokens(*slots_[i])};
  const SlotChoice c = ChooseSlot(views, prompt);
  if (c.slot < 0) return SlotLease();
  busy_[c.slot] = true;
  return SlotLease(this, slots_[c.slot].get(), c.reuse);
}

SlotLease SlotPool::Acquire(const std::vector<int32_t>& prompt, Clock::time_point deadline,
                            const std::function<bool()>& cancelled, Refusal* why) {
  std::unique_lock<std::mutex> lock(mu_);
  *why = Refusal::kNone;
  if (draining_) {
    *why = Refusal::kShuttingDown;
    return SlotLease();
  }
  if (queue_.empty()) {
    if (SlotLease lease = TakeLocked(prompt)) return lease;
  }
  if (static_cast<int>(queue_.size()) >= queue_capacity_) {
    *why = Refusal::kQueueFull;
    return SlotLease();
  }
  const uint64_t ticket = next_ticket_++;
  queue_.push_back(ticket);
  auto leave = [&](Refusal r) {
    queue_.erase(std::find(queue_.begin(), queue_.end(), ticket));
    cv_.notify_all();  // the next in line may be the head now
    *why = r;
    return SlotLease();
  };
  while (true) {
    // Woken by a release; the timeout polls the client's connection and the deadline.
    cv_.wait_for(lock, std::chrono::milliseconds(50));
    if (draining_) return leave(Refusal::kShuttingDown);
    if (queue_.front() == ticket) {
      if (SlotLease lease = TakeLocked(prompt)) {
        queue_.pop_front();
        cv_.notify_all();
        return lease;
      }
    }
    if (Clock::now() >= deadline) return leave(Refusal::kTimeout);
    if (cancelled && cancelled()) return leave(Refusal::kCancelled);
  }
}

void SlotPool::Release(Slot* slot) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    busy_[slot->id] = false;
    last_used_[slot->id] = ++uses_;
  }
  cv_.notify_all();
}

void SlotPool::Drain() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    draining_ = true;
  }
  cv_.notify_all();
}

int SlotPool::busy() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(std::count(busy_.begin(), busy_.end(), true));
}

int SlotPool::waiting() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(queue_.size());
}

}  // namespace dk
