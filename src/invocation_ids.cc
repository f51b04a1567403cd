// Invocation-id allocation: counter -> interoperable id mapping and per-title reserved blocks.
#include "src/invocation_ids.h"

#include <cmath>
#include <condition_variable>
#include <deque>
#include <limits>
#include <string>
#include <thread>

#include "gridseal/thread_name.h"
#include "src/key_store.h"

namespace gs::ids {

namespace {

// The issuable ranges, in counter order.
struct Segment {
  std::uint64_t first;
  std::uint64_t last;  // inclusive
};
constexpr Segment kSegments[] = {
    {0x1, 0x7F},
    {0x100, 0x7FFF},
    {0x10000, 0x7FFFFF},
    {0x1000000, 0x7FFFFFFF},
};

constexpr std::uint64_t segment_total() {
  std::uint64_t n = 0;
  for (const auto& s : kSegments) n += s.last - s.first + 1;
  return n;
}
static_assert(segment_total() == kIdCycle);

constexpr std::size_t kMaxTitle = 255;

}  // namespace

bool is_interoperable(std::uint64_t id) noexcept {
  for (const auto& s : kSegments) {
    if (id >= s.first && id <= s.last) return true;
  }
  return false;
}

std::uint32_t id_for_counter(std::uint64_t counter) noexcept {
  std::uint64_t c = counter % kIdCycle;
  for (const auto& s : kSegments) {
    const std::uint64_t n = s.last - s.first + 1;
    if (c < n) return static_cast<std::uint32_t>(s.first + c);
    c -= n;
  }
  return 1;  // unreachable: c < kIdCycle
}

std::optional<std::uint64_t> counter_for_id(std::uint64_t id) noexcept {
  std::uint64_t base = 0;
  for (const auto& s : kSegments) {
    if (id >= s.first && id <= s.last) return base + (id - s.first);
    base += s.last - s.first + 1;
  }
  return std::nullopt;
}

Bytes encode_id(std::uint32_t id) {
  Bytes out;
  bool started = false;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const auto b = static_cast<std::uint8_t>((id >> shift) & 0xFF);
    if (!started && b == 0 && shift != 0) continue;
    if (!started && (b & 0x80) != 0) out.push_back(0);  // not for issued ids
    started = true;
    out.push_back(b);
  }
  return out;
}

double wrap_horizon_seconds(double peak_rate) noexcept {
  if (!(peak_rate > 0.0)) return 0.0;
  return static_cast<double>(kIdCycle) / peak_rate;
}

Status check_window(std::uint64_t window_s, double peak_rate, std::uint64_t max_block_age_s) {
  if (!(peak_rate > 0.0) || !std::isfinite(peak_rate)) {
    return {Errc::invalid_argument, "peak rate must be a positive number of ids per second"};
  }
  const double horizon = wrap_horizon_seconds(peak_rate);
  const double need = static_cast<double>(window_s) + static_cast<double>(max_block_age_s);
  if (need >= horizon) {
    return {Errc::invalid_argument,
            "validity window " + std::to_string(window_s) + " s plus block age " +
                std::to_string(max_block_age_s) + " s is not shorter than the id wrap horizon " +
                std::to_string(static_cast<std::uint64_t>(horizon)) + " s at " +
                std::to_string(static_cast<std::uint64_t>(peak_rate)) + " ids/s"};
  }
  return {};
}

struct InvocationIdAllocator::State {
  struct Block {
    std::uint64_t next = 0;  // counter value
    std::uint64_t end = 0;   // one past the last
    std::int64_t reserved_at = 0;
    std::uint64_t left() const { return end - next; }
  };
  struct Title {
    std::optional<Block> current;
    std::optional<Block> spare;  // reserved in the background, used when `current` runs out
    bool refilling = false;      // a background reservation for this title is queued or running
    std::int64_t prefetch_after = 0;  // after a failed one: not before this second
  };
  struct Want {
    std::string title;
    std::int64_t asked_at;
  };

  ReserveFn reserve;
  AllocatorOptions opt;

  mutable std::mutex mu;  // titles, stats, want, stopping
  std::map<std::string, Title> titles;  // key: title bytes
  AllocatorStats stats;
  std::deque<Want> want;
  bool stopping = false;
  std::condition_variable cv;

  std::mutex reserve_mu;  // reserve() is never called twice at once
  std::thread thread;

  State(ReserveFn r, const AllocatorOptions& o) : reserve(std::move(r)), opt(o) {}

  bool expired(const Block& b, std::int64_t now_s) const {
    return now_s < b.reserved_at || now_s - b.reserved_at > opt.max_block_age_s;
  }

  Result<Block> reserve_block(ByteView title, std::int64_t now_s) {
    std::lock_guard r(reserve_mu);
    GS_ASSIGN(std::uint64_t first, reserve(title, opt.block_size));
    if (first > UINT64_MAX - opt.block_size) {
      return {Errc::storage_failure, "invocation counter out of range"};
    }
    return Block{first, first + opt.block_size, now_s};
  }

  // Background reservations, one at a time, in the order asked.
  void run() {
    std::unique_lock lock(mu);
    for (;;) {
      cv.wait(lock, [this] { return stopping || !want.empty(); });
      if (stopping) return;
      Want w = std::move(want.front());
      want.pop_front();
      lock.unlock();
      auto b = reserve_block(as_bytes(w.title), w.asked_at);
      lock.lock();
      auto it = titles.find(w.title);
      if (!b.ok()) {
        ++stats.prefetch_failures;
        if (it != titles.end()) {
          it->second.refilling = false;
          it->second.prefetch_after = w.asked_at + 1;
        }
        continue;
      }
      ++stats.blocks_reserved;
      if (it == titles.end() || it->second.spare) {
        stats.values_abandoned += b->left();  // the title was evicted meanwhile
        continue;
      }
      it->second.refilling = false;
      it->second.spare = *b;
    }
  }
};

InvocationIdAllocator::InvocationIdAllocator(std::unique_ptr<State> s) : s_(std::move(s)) {}

InvocationIdAllocator::InvocationIdAllocator(InvocationIdAllocator&& o) noexcept
    : s_(std::move(o.s_)) {}

InvocationIdAllocator::~InvocationIdAllocator() {
  if (!s_ || !s_->thread.joinable()) return;
  {
    std::lock_guard lock(s_->mu);
    s_->stopping = true;
  }
  s_->cv.notify_all();
  s_->thread.join();
}

Result<InvocationIdAllocator> InvocationIdAllocator::make(ReserveFn reserve,
                                                          const AllocatorOptions& opt) {
  if (!reserve) return {Errc::invalid_argument, "no counter reservation function"};
  if (opt.block_size == 0 || opt.block_size > (1U << 24)) {
    return {Errc::invalid_argument, "block_size must be 1..16777216"};
  }
  if (opt.max_block_age_s < 1) return {Errc::invalid_argument, "max_block_age must be >= 1 s"};
  if (opt.max_titles == 0) return {Errc::invalid_argument, "max_titles must be >= 1"};
  auto s = std::make_unique<State>(std::move(reserve), opt);
  if (opt.prefetch) {
    State* raw = s.get();
    s->thread = std::thread([raw] {
      name_this_thread("gs-ids");
      raw->run();
    });
  }
  return InvocationIdAllocator(std::move(s));
}

Result<InvocationIdAllocator> InvocationIdAllocator::over(store::KeyStore& ks,
                                                          const AllocatorOptions& opt) {
  store::KeyStore* p = &ks;
  return make([p](ByteView title, std::uint64_t n) { return p->reserve_counter_block(title, n); },
              opt);
}

Result<std::uint32_t> InvocationIdAllocator::next(ByteView calling_title, std::int64_t now_s) {
  if (calling_title.empty() || calling_title.size() > kMaxTitle) {
    return {Errc::invalid_argument, "calling AP title must be 1..255 bytes"};
  }
  State& s = *s_;
  std::unique_lock lock(s.mu);
  std::string key(calling_title.begin(), calling_title.end());
  auto it = s.titles.find(key);
  if (it == s.titles.end()) {
    if (s.titles.size() >= s.opt.max_titles) {
      // Drop the title whose block is oldest: the rest of its blocks is skipped, never reused.
      auto age = [](const State::Title& t) {
        return t.current ? t.current->reserved_at : std::numeric_limits<std::int64_t>::min();
      };
      auto oldest = s.titles.begin();
      for (auto j = s.titles.begin(); j != s.titles.end(); ++j) {
        if (age(j->second) < age(oldest->second)) oldest = j;
      }
      if (oldest->second.current) s.stats.values_abandoned += oldest->second.current->left();
      if (oldest->second.spare) s.stats.values_abandoned += oldest->second.spare->left();
      s.titles.erase(oldest);
    }
    it = s.titles.emplace(key, State::Title{}).first;
  }
  State::Title& t = it->second;
  auto usable = [&](const std::optional<State::Block>& b) {
    return b && b->next < b->end && !s.expired(*b, now_s);
  };
  if (!usable(t.current)) {
    if (t.current) s.stats.values_abandoned += t.current->left();
    t.current.reset();
    if (usable(t.spare)) {
      t.current = t.spare;
    } else if (t.spare) {
      s.stats.values_abandoned += t.spare->left();
    }
    t.spare.reset();
  }
  if (!t.current) {
    // Nothing reserved ahead: wait for the store (and, behind the lock, for a background
    // reservation in progress, whose block then becomes the spare).
    ++s.stats.waited;
    GS_ASSIGN(State::Block b, s.reserve_block(calling_title, now_s));
    ++s.stats.blocks_reserved;
    t.current = b;
  }
  const std::uint32_t id = id_for_counter(t.current->next++);
  ++s.stats.ids_issued;
  if (s.opt.prefetch && !t.spare && !t.refilling && now_s >= t.prefetch_after &&
      t.current->left() <= s.opt.block_size / 2) {
    t.refilling = true;
    s.want.push_back({key, now_s});
    lock.unlock();
    s.cv.notify_one();
  }
  return id;
}

AllocatorStats InvocationIdAllocator::stats() const {
  std::lock_guard lock(s_->mu);
  return s_->stats;
}

}  // namespace gs::ids
