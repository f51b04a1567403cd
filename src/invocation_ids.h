// Calling-AP-invocation-ids for secured commands (DESIGN §2): interoperable values, durable
// block reservation per calling AP title, and the validity-window vs. wrap-horizon check.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::store {
class KeyStore;
}

namespace gs::ids {

// Ids are 1..0x7FFFFFFF without the values whose minimal BER INTEGER encoding starts with a 00
// byte (0x80–0xFF, 0x8000–0xFFFF, 0x800000–0xFFFFFF).
inline constexpr std::uint32_t kMaxInvocationId = 0x7FFFFFFF;
// How many such ids exist: one full cycle of the counter.
inline constexpr std::uint64_t kIdCycle = 127ULL + (0x8000 - 0x100) + (0x800000 - 0x10000) +
                                          (0x80000000ULL - 0x1000000);

// True when `id` may be issued (in range and no leading 00 byte in its minimal encoding).
bool is_interoperable(std::uint64_t id) noexcept;

// The id for a counter value: the (counter mod kIdCycle)-th interoperable id, so counter 0 is
// id 1, 127 is 0x100, and counter kIdCycle wraps back to 1. Deterministic and injective inside
// one cycle.
std::uint32_t id_for_counter(std::uint64_t counter) noexcept;
// The inverse inside one cycle (for tests and diagnostics); nullopt for non-issuable ids.
std::optional<std::uint64_t> counter_for_id(std::uint64_t id) noexcept;

// The minimal BER INTEGER content of an issued id (1..4 bytes, never a leading 00).
Bytes encode_id(std::uint32_t id);

// Seconds until the counter comes back to the same id when it advances at `peak_rate` values
// per second (ids issued plus ids lost with the blocks of crashed workers).
double wrap_horizon_seconds(double peak_rate) noexcept;

// Refuses (Errc::invalid_argument, naming the numbers) a validity window of `window_s` seconds
// unless window_s + max_block_age_s < the wrap horizon at peak_rate: an id issued from a block
// up to max_block_age_s old must not come round again while a command carrying it is valid.
Status check_window(std::uint64_t window_s, double peak_rate, std::uint64_t max_block_age_s);

// Reserves `count` consecutive counter values for a calling AP title, durably; returns the
// first. KeyStore::reserve_counter_block has this shape.
using ReserveFn = std::function<Result<std::uint64_t>(ByteView calling_title, std::uint64_t count)>;

struct AllocatorOptions {
  std::uint32_t block_size = 1024;       // counter values per reservation (1..1<<24)
  std::int64_t max_block_age_s = 60;     // a block older than this is abandoned (>= 1)
  std::size_t max_titles = 256;          // calling AP titles with a live block at once
  // Reserve each title's next block on a thread of the allocator once half of the current one
  // is issued, so that next() rarely waits for the store. A reservation is a write transaction
  // with an fsync that queues behind every other writer of the database (the audit writers of
  // all workers): 1-7 ms measured on the SES's 2-core bench machine, during which the worker's
  // handler thread, and every request behind it, waited. false: next() reserves when a block
  // runs out.
  bool prefetch = false;
};

struct AllocatorStats {
  std::uint64_t ids_issued = 0;
  std::uint64_t blocks_reserved = 0;
  std::uint64_t values_abandoned = 0;  // counter values dropped with expired/evicted blocks
  std::uint64_t waited = 0;            // reservations next() had to wait for
  std::uint64_t prefetch_failures = 0; // background reservations that failed (next() retries)
};

// Hands out ids from blocks of the per-title counter reserved through `reserve`. Each worker
// process owns one. A crash loses the rest of its blocks (they are never reserved again), so
// an id is never issued twice inside one counter cycle. Thread-safe: a mutex serializes calls;
// `reserve` is never called twice at once and must not call back. With prefetch, `reserve` is
// also called from the allocator's own thread, so whatever it uses must not be used elsewhere
// meanwhile.
class InvocationIdAllocator {
 public:
  static Result<InvocationIdAllocator> make(ReserveFn reserve, const AllocatorOptions& opt = {});
  // Over a KeyStore connection that nothing else uses concurrently (it is not thread-safe).
  static Result<InvocationIdAllocator> over(store::KeyStore& ks, const AllocatorOptions& opt = {});

  InvocationIdAllocator(InvocationIdAllocator&& o) noexcept;
  InvocationIdAllocator& operator=(InvocationIdAllocator&&) = delete;
  InvocationIdAllocator(const InvocationIdAllocator&) = delete;
  InvocationIdAllocator& operator=(const InvocationIdAllocator&) = delete;
  ~InvocationIdAllocator();  // stops and joins the prefetch thread

  // The next id for `calling_title` (absolute OID content, 1..255 bytes). `now_s` is any clock
  // in seconds used for block age; a clock that goes back also abandons the block. A block
  // reserved in the background counts its age from the next() call that asked for it.
  Result<std::uint32_t> next(ByteView calling_title, std::int64_t now_s);

  AllocatorStats stats() const;

 private:
  struct State;
  explicit InvocationIdAllocator(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
};

}  // namespace gs::ids
