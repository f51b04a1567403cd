// A bounded LRU of unwrapped meter keys (session objects) for one Session.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "hsm/bound_aes.h"
#include "hsm/session.h"
#include "hsm/types.h"

namespace gs::hsm {

// Maps a caller's key id (e.g. meter row id * 4 + slot) to a meter-key session object unwrapped
// from its stored form under the KEK. An entry whose stored (wrapped) form differs from the one
// asked for is replaced, so a new key version is never served from the old handle. Evicted and
// replaced objects are destroyed. Lives with its Session, used by one thread at a time.
// Bytes a caller derives once from a cached key and keeps with it (EAX' subkeys D || Q): no
// token call on the next use. Zeroed when the entry goes. `bound`: the entry's open AES
// operations when the cache binds them (bind_operations), else null; owned by the entry.
struct KeyAux {
  std::array<std::uint8_t, 32> bytes{};
  bool valid = false;
  BoundAes* bound = nullptr;
};

class MeterKeyCache {
 public:
  MeterKeyCache(Session& session, ObjectHandle kek, std::size_t capacity);
  MeterKeyCache(const MeterKeyCache&) = delete;
  MeterKeyCache& operator=(const MeterKeyCache&) = delete;
  ~MeterKeyCache();

  // The handle of the unwrapped key; with `aux`, also the entry's KeyAux (valid until the next
  // call on this cache).
  Result<ObjectHandle> get(std::uint64_t id, ByteView wrapped, KeyAux** aux = nullptr) {
    return get(id, kek_, wrapped, aux);
  }
  // The same, unwrapping with `kek` (the KEK generation the stored form names); an entry is
  // reused only for the same KEK and the same stored form.
  Result<ObjectHandle> get(std::uint64_t id, ObjectHandle kek, ByteView wrapped,
                           KeyAux** aux = nullptr);
  // From now on each cached key gets open ECB and CBC operations from `pool` (KeyAux::bound)
  // on its first hit (a key looked up once never pays for them), while the pool has sessions;
  // they end before the key object is destroyed, and are bound afresh on the next hit after
  // the token ended one (BoundAes::broken). `pool` must outlive the cache.
  void bind_operations(BoundAesPool* pool) noexcept { bound_pool_ = pool; }
  // Destroys the entry (key state changed: compromised, destroyed, ...).
  void erase(std::uint64_t id);
  // Destroys every entry.
  void clear();
  // Forgets every entry without a token call (after the session was lost: the objects are gone
  // already, and the bound operations' sessions are forgotten, BoundAes::abandon), and takes the
  // KEK handle to use from now on.
  void reset(ObjectHandle kek);

  std::size_t size() const noexcept { return map_.size(); }
  std::uint64_t hits() const noexcept { return hits_; }
  std::uint64_t misses() const noexcept { return misses_; }

 private:
  static constexpr std::size_t kMaxWrappedKeySize = 64;
  struct Entry {
    std::uint64_t id;
    ObjectHandle handle;
    ObjectHandle kek;
    std::array<std::uint8_t, kMaxWrappedKeySize> wrapped;
    std::size_t wrapped_len;
    KeyAux aux;
    std::unique_ptr<BoundAes> bound;
  };
  void drop(std::list<Entry>::iterator it);

  Session* session_;
  ObjectHandle kek_;
  std::size_t capacity_;
  BoundAesPool* bound_pool_ = nullptr;
  std::list<Entry> lru_;  // front = most recent
  std::unordered_map<std::uint64_t, std::list<Entry>::iterator> map_;
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;
};

}  // namespace gs::hsm
