// Meter record cache: hash map + LRU list + TTL.
#include "src/meter_cache.h"

namespace gs::store {

namespace {
std::string key_of(ByteView title) {
  return std::string(reinterpret_cast<const char*>(title.data()), title.size());
}
}  // namespace

Result<std::shared_ptr<const Meter>> MeterCache::by_title(KeyStore& store, ByteView title,
                                                          Clock::time_point now) {
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
  if (map_.size() >= capacity_) {
    map_.erase(lru_.back());
    lru_.pop_back();
  }
  lru_.push_front(key);
  map_.emplace(std::move(key), Entry{value, now + ttl_, lru_.begin()});
  return value;
}

void MeterCache::invalidate(ByteView title) {
  auto it = map_.find(key_of(title));
  if (it == map_.end()) return;
  lru_.erase(it->second.lru);
  map_.erase(it);
}

void MeterCache::clear() {
  map_.clear();
  lru_.clear();
}

}  // namespace gs::store
