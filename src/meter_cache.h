// A bounded in-memory cache of meter records in front of the key store, for the per-message
// path: SQLite does one point lookup in ~7 µs here, a cached record costs a hash probe.
// Changes made by any process reach the cache through the store's change feed (schema v13:
// triggers append the AP title of every meter whose record changes to meter_changes): at most
// every `poll` interval one bounded query reads the new feed rows and drops those titles, found
// or not found. Entries also expire after a TTL, a safety net only. Changes made through the
// owner can be invalidated at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>

#include "src/key_store.h"

namespace gs::store {

class MeterCache {
 public:
  using Clock = std::chrono::steady_clock;
  // How often the feed is read by default: a change made elsewhere is seen within this time.
  static constexpr std::chrono::milliseconds kDefaultPoll{100};
  // Feed rows read per poll at most; a cache further behind than this starts over (clear()).
  static constexpr std::int64_t kFeedBatch = 1024;

  // `ttl` 0: nothing is cached (every lookup reads the store). `poll` 0: the feed is read on
  // every lookup.
  MeterCache(std::size_t capacity, std::chrono::milliseconds ttl,
             std::chrono::milliseconds poll = kDefaultPoll)
      : capacity_(capacity == 0 ? 1 : capacity), ttl_(ttl), poll_(poll) {}

  // The meter for an absolute AP title (nullptr: no such meter), from the cache or the store.
  // The feed is read on `store`'s connection first when the poll interval has passed; when it
  // cannot be read, the record comes from the store and is not cached until it can.
  Result<std::shared_ptr<const Meter>> by_title(KeyStore& store, ByteView absolute_title,
                                                Clock::time_point now = Clock::now());
  // True when an entry was dropped.
  bool invalidate(ByteView absolute_title);
  void clear();

  std::size_t size() const noexcept { return map_.size(); }
  std::uint64_t hits() const noexcept { return hits_; }
  std::uint64_t misses() const noexcept { return misses_; }
  // Entries dropped because the feed named their title.
  std::uint64_t feed_invalidations() const noexcept { return feed_invalidations_; }
  // Times everything was dropped: the cache fell behind the feed (more than kFeedBatch rows, or
  // rows it had not read were pruned), the feed was reset, or another connection was used.
  std::uint64_t feed_resets() const noexcept { return feed_resets_; }
  // Feed queries that failed (each clears the cache; the first is logged).
  std::uint64_t feed_errors() const noexcept { return feed_errors_; }

 private:
  struct Entry {
    std::shared_ptr<const Meter> meter;  // nullptr caches "unknown meter"
    Clock::time_point expires;
    std::list<std::string>::iterator lru;
  };
  // Reads the feed when due. False: the feed could not be read (the cache is empty then).
  bool poll(KeyStore& store, Clock::time_point now);
  // Applies the feed rows after last_seq_ (resync() when it fell behind).
  Status read_feed(KeyStore& store);
  // Starts over: clears the cache and records the feed's last row.
  Status resync(KeyStore& store);

  std::size_t capacity_;
  std::chrono::milliseconds ttl_;
  std::chrono::milliseconds poll_;
  std::unordered_map<std::string, Entry> map_;
  std::list<std::string> lru_;  // front = most recently used
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;

  // The feed statements, prepared once on the connection of the first lookup (a lookup through
  // another connection starts over on that one).
  const void* feed_conn_ = nullptr;  // the sqlite3* the statements belong to
  std::optional<db::Stmt> feed_read_;
  std::optional<db::Stmt> feed_max_;
  bool synced_ = false;           // last_seq_ is a position in the feed of feed_conn_
  std::int64_t last_seq_ = 0;     // the last feed row applied (0: none yet)
  Clock::time_point next_poll_ = Clock::time_point::min();
  std::uint64_t feed_invalidations_ = 0;
  std::uint64_t feed_resets_ = 0;
  std::uint64_t feed_errors_ = 0;
};

}  // namespace gs::store
