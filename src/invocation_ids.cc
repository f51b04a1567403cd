// Invocation-id allocation: counter -> interoperable id mapping and per-title reserved blocks.
#include "src/invocation_ids.h"

#include <cmath>
#include <string>

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

Result<InvocationIdAllocator> InvocationIdAllocator::make(ReserveFn reserve,
                                                          const AllocatorOptions& opt) {
  if (!reserve) return {Errc::invalid_argument, "no counter reservation function"};
  if (opt.block_size == 0 || opt.block_size > (1U << 24)) {
    return {Errc::invalid_argument, "block_size must be 1..16777216"};
  }
  if (opt.max_block_age_s < 1) return {Errc::invalid_argument, "max_block_age must be >= 1 s"};
  if (opt.max_titles == 0) return {Errc::invalid_argument, "max_titles must be >= 1"};
  return InvocationIdAllocator(std::move(reserve), opt);
}

Result<InvocationIdAllocator> InvocationIdAllocator::over(store::KeyStore& ks,
                                                          const AllocatorOptions& opt) {
  store::KeyStore* p = &ks;
  return make([p](ByteView title, std::uint64_t n) { return p->reserve_counter_block(title, n); },
              opt);
}

InvocationIdAllocator::InvocationIdAllocator(InvocationIdAllocator&& o) noexcept
    : reserve_(std::move(o.reserve_)), opt_(o.opt_) {
  std::lock_guard lock(o.mu_);
  blocks_ = std::move(o.blocks_);
  stats_ = o.stats_;
}

Result<std::uint32_t> InvocationIdAllocator::next(ByteView calling_title, std::int64_t now_s) {
  if (calling_title.empty() || calling_title.size() > kMaxTitle) {
    return {Errc::invalid_argument, "calling AP title must be 1..255 bytes"};
  }
  std::lock_guard lock(mu_);
  std::string key(calling_title.begin(), calling_title.end());
  auto it = blocks_.find(key);
  if (it != blocks_.end()) {
    Block& b = it->second;
    const bool expired = now_s < b.reserved_at || now_s - b.reserved_at > opt_.max_block_age_s;
    if (expired || b.next >= b.end) {
      stats_.values_abandoned += b.end - b.next;
      blocks_.erase(it);
      it = blocks_.end();
    }
  }
  if (it == blocks_.end()) {
    if (blocks_.size() >= opt_.max_titles) {
      // Drop the oldest block: its rest is skipped, never reused.
      auto oldest = blocks_.begin();
      for (auto j = blocks_.begin(); j != blocks_.end(); ++j) {
        if (j->second.reserved_at < oldest->second.reserved_at) oldest = j;
      }
      stats_.values_abandoned += oldest->second.end - oldest->second.next;
      blocks_.erase(oldest);
    }
    GS_ASSIGN(std::uint64_t first, reserve_(calling_title, opt_.block_size));
    if (first > UINT64_MAX - opt_.block_size) {
      return {Errc::storage_failure, "invocation counter out of range"};
    }
    ++stats_.blocks_reserved;
    it = blocks_.emplace(std::move(key), Block{first, first + opt_.block_size, now_s}).first;
  }
  const std::uint32_t id = id_for_counter(it->second.next++);
  ++stats_.ids_issued;
  return id;
}

AllocatorStats InvocationIdAllocator::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

}  // namespace gs::ids
