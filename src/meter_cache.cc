// Meter record cache: hash map + LRU list + TTL, kept fresh by the store's change feed.
#include "src/meter_cache.h"

#include <cstdio>

namespace gs::store {

namespace {

std::string key_of(ByteView title) {
  return std::string(reinterpret_cast<const char*>(title.data()), title.size());
}

// From the row applied last (?1, which must still be there: once it is pruned, rows after it
// may be gone too) on, at most ?2 rows. One range scan of the primary key.
constexpr const char* kFeedReadSql =
    "SELECT seq, title FROM meter_changes WHERE seq >= ?1 ORDER BY seq LIMIT ?2";
constexpr const char* kFeedMaxSql = "SELECT coalesce(max(seq), 0) FROM meter_changes";

// Resets a statement however the reading ends, so that it keeps no read transaction open.
struct ResetOnExit {
  explicit ResetOnExit(db::Stmt& s) : st(s) {}
  db::Stmt& st;
  ResetOnExit(const ResetOnExit&) = delete;
  ResetOnExit& operator=(const ResetOnExit&) = delete;
  ~ResetOnExit() { st.reset(); }
};

}  // namespace

Result<std::shared_ptr<const Meter>> MeterCache::by_title(KeyStore& store, ByteView title,
                                                          Clock::time_point now) {
  // Not cacheable (TTL 0, or the feed unreadable): the map is empty and stays so.
  const bool cacheable = ttl_.count() > 0 && poll(store, now);
  std::string key = key_of(title);
  auto it = map_.find(key);
  if (it != map_.end()) {
    if (it->second.expires > now) {
      ++hits_;
      lru_.splice(lru_.begin(), lru_, it->second.lru);
      return it->second.meter;
    }
    lru_.erase(it->second.lru);
    map_.erase(it);
  }
  ++misses_;
  GS_ASSIGN(std::optional<Meter> m, store.meter_by_title(title));
  std::shared_ptr<const Meter> value;
  if (m) value = std::make_shared<const Meter>(std::move(*m));
  if (!cacheable) return value;
  if (map_.size() >= capacity_) {
    map_.erase(lru_.back());
    lru_.pop_back();
  }
  lru_.push_front(key);
  map_.emplace(std::move(key), Entry{value, now + ttl_, lru_.begin()});
  return value;
}

bool MeterCache::poll(KeyStore& store, Clock::time_point now) {
  const void* conn = store.db().raw();
  if (conn != feed_conn_) {
    // First lookup, or another connection: its feed position is unknown, start over there.
    // (A closed connection stays allocated until its statements are finalized, so a new one
    // never has the address of one whose statements are still held here.)
    if (!map_.empty()) ++feed_resets_;
    clear();
    feed_read_.reset();
    feed_max_.reset();
    feed_conn_ = conn;
    synced_ = false;
    next_poll_ = Clock::time_point::min();
  }
  // A failed feed is retried at the poll interval too, not on every lookup.
  if (poll_.count() > 0 && now < next_poll_) return synced_;
  next_poll_ = now + poll_;
  Status st = synced_ ? read_feed(store) : resync(store);
  if (st.ok()) return true;
  clear();
  synced_ = false;
  if (feed_errors_++ == 0) {
    std::fprintf(stderr,
                 "gridseal: meter cache: the change feed cannot be read (%s); meter records are "
                 "read from the store on every lookup until it can\n",
                 st.error().message().c_str());
  }
  return false;
}

Status MeterCache::resync(KeyStore& store) {
  if (!feed_max_) {
    GS_ASSIGN(auto st, store.db().prepare(kFeedMaxSql));
    feed_max_.emplace(std::move(st));
  }
  ResetOnExit done{*feed_max_};
  GS_ASSIGN(db::Step s, feed_max_->step());
  // Entries read before this point may predate changes the feed no longer holds; entries read
  // after it are at least as new as its last row.
  clear();
  last_seq_ = s == db::Step::row ? feed_max_->int64(0) : 0;
  synced_ = true;
  return {};
}

Status MeterCache::read_feed(KeyStore& store) {
  if (!feed_read_) {
    GS_ASSIGN(auto st, store.db().prepare(kFeedReadSql));
    feed_read_.emplace(std::move(st));
  }
  bool behind = false;
  {
    db::Stmt& st = *feed_read_;
    ResetOnExit done{st};
    const bool anchored = last_seq_ > 0;  // 0: the feed was empty, its first row is 1
    // The anchor, then one row more than a poll applies (to see that there are more).
    st.bind(1, last_seq_).bind(2, kFeedBatch + 2);
    bool first = true;
    std::int64_t fresh = 0;
    while (true) {
      GS_ASSIGN(db::Step s, st.step());
      if (s == db::Step::done) break;
      const std::int64_t seq = st.int64(0);
      if (first) {
        first = false;
        if (seq != (anchored ? last_seq_ : 1)) {  // pruned past what was applied, or reset
          behind = true;
          break;
        }
        if (anchored) continue;
      }
      if (++fresh > kFeedBatch) {
        behind = true;
        break;
      }
      if (invalidate(st.blob_view(1))) ++feed_invalidations_;
      last_seq_ = seq;
    }
    if (first && anchored) behind = true;  // the row applied last is gone: reset or pruned
  }
  if (!behind) return {};
  ++feed_resets_;
  return resync(store);
}

bool MeterCache::invalidate(ByteView title) {
  auto it = map_.find(key_of(title));
  if (it == map_.end()) return false;
  lru_.erase(it->second.lru);
  map_.erase(it);
  return true;
}

void MeterCache::clear() {
  map_.clear();
  lru_.clear();
}

}  // namespace gs::store
