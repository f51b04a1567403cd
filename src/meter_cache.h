// A bounded in-memory cache of meter records in front of the key store, for the per-message
// path: SQLite does one point lookup in ~7 µs here, a cached record costs a hash probe.
// Entries (found or not found) expire after a TTL, so key-state changes made by other
// processes are seen within it; changes made through the owner are invalidated at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>

#include "src/key_store.h"

namespace gs::store {

class MeterCache {
 public:
  using Clock = std::chrono::steady_clock;
  MeterCache(std::size_t capacity, std::chrono::milliseconds ttl)
      : capacity_(capacity == 0 ? 1 : capacity), ttl_(ttl) {}

  // The meter for an absolute AP title (nullptr: no such meter), from the cache or the store.
  Result<std::shared_ptr<const Meter>> by_title(KeyStore& store, ByteView absolute_title,
                                                Clock::time_point now = Clock::now());
  void invalidate(ByteView absolute_title);
  void clear();

  std::size_t size() const noexcept { return map_.size(); }
  std::uint64_t hits() const noexcept { return hits_; }
  std::uint64_t misses() const noexcept { return misses_; }

 private:
  struct Entry {
    std::shared_ptr<const Meter> meter;  // nullptr caches "unknown meter"
    Clock::time_point expires;
    std::list<std::string>::iterator lru;
  };
  std::size_t capacity_;
  std::chrono::milliseconds ttl_;
  std::unordered_map<std::string, Entry> map_;
  std::list<std::string> lru_;  // front = most recently used
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;
};

}  // namespace gs::store
