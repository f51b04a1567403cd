// MeterKeyCache: LRU of unwrapped meter-key session objects, destroyed on eviction.
#include "hsm/key_cache.h"

#include <algorithm>
#include <cstring>

#include "hsm/ops.h"

namespace gs::hsm {

MeterKeyCache::MeterKeyCache(Session& session, ObjectHandle kek, std::size_t capacity)
    : session_(&session), kek_(kek), capacity_(std::max<std::size_t>(capacity, 1)) {}

MeterKeyCache::~MeterKeyCache() { clear(); }

void MeterKeyCache::drop(std::list<Entry>::iterator it) {
  it->bound.reset();  // the operations end before the key they run on
  if (session_->is_open()) {
    destroy_object(*session_, it->handle).ok();  // a stale handle is gone anyway
  }
  secure_zero(it->aux.bytes.data(), it->aux.bytes.size());
  map_.erase(it->id);
  lru_.erase(it);
}

Result<ObjectHandle> MeterKeyCache::get(std::uint64_t id, ObjectHandle kek, ByteView wrapped,
                                        KeyAux** aux) {
  if (wrapped.empty() || wrapped.size() > kMaxWrappedKeySize) {
    return Error(Errc::bad_length, "wrapped meter key size");
  }
  auto found = map_.find(id);
  if (found != map_.end()) {
    auto it = found->second;
    if (it->kek == kek && it->wrapped_len == wrapped.size() &&
        std::memcmp(it->wrapped.data(), wrapped.data(), wrapped.size()) == 0) {
      lru_.splice(lru_.begin(), lru_, it);
      ++hits_;
      // Bound on the first hit, not on the miss: binding costs two C_EncryptInit, what one
      // EAX' step saves, so a key used once (a fleet far larger than the cache) would pay it
      // for nothing. A key whose operations the token ended (an HSM error) is bound afresh.
      if (bound_pool_ != nullptr && (!it->bound || it->bound->broken())) {
        it->bound.reset();
        it->bound = bound_pool_->bind(it->handle);
        it->aux.bound = it->bound.get();
      }
      if (aux != nullptr) *aux = &it->aux;
      return it->handle;
    }
    drop(it);  // a new key for this id
  }
  ++misses_;
  GS_ASSIGN(ObjectHandle h, unwrap_meter_key(*session_, kek, wrapped));
  while (lru_.size() >= capacity_) {
    drop(std::prev(lru_.end()));
  }
  Entry e{id, h, kek, {}, wrapped.size(), {}, nullptr};
  std::memcpy(e.wrapped.data(), wrapped.data(), wrapped.size());
  lru_.push_front(std::move(e));
  map_[id] = lru_.begin();
  if (aux != nullptr) *aux = &lru_.front().aux;
  return h;
}

void MeterKeyCache::erase(std::uint64_t id) {
  auto found = map_.find(id);
  if (found != map_.end()) {
    drop(found->second);
  }
}

void MeterKeyCache::clear() {
  while (!lru_.empty()) {
    drop(lru_.begin());
  }
}

void MeterKeyCache::reset(ObjectHandle kek) {
  for (Entry& e : lru_) {
    if (e.bound) e.bound->abandon();  // its session numbers may belong to new sessions by now
    e.bound.reset();
    secure_zero(e.aux.bytes.data(), e.aux.bytes.size());
  }
  lru_.clear();
  map_.clear();
  kek_ = kek;
}

}  // namespace gs::hsm
