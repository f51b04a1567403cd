// What one handler thread of a daemon holds while it serves a request, shared by the SES and
// the DKUS: a pooled PKCS#11 session with the KEK, one EAX' cipher and the cache of unwrapped
// meter keys (rebuilt after the session is lost), a store connection with a meter cache, and
// the pool that hands these states to handler threads.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "hsm/hsm_aes.h"
#include "hsm/key_cache.h"
#include "hsm/session.h"
#include "hsm/ops.h"
#include "src/hsm_context.h"
#include "src/metrics.h"
#include "src/kek_rotation.h"
#include "src/key_store.h"
#include "src/meter_cache.h"

namespace gs {

struct HsmThreadState {
  std::optional<hsm::SessionPool::Lease> lease;
  kek::KekHandles keks;  // the KEK generations met so far (src/kek_rotation.h)
  std::unique_ptr<hsm::MeterKeyCache> keys;
  std::unique_ptr<hsm::HsmAes> aes;

  // True while the session is open and the objects are usable.
  bool hsm_ready() { return lease && !(*lease)->lost(); }
  // Acquires a session when missing or lost; the key cache holds at most `key_cache` unwrapped
  // meter keys.
  Status ensure_hsm(HsmContext& hsm, std::size_t key_cache);
  // The unwrapped key of a stored slot (cached under `ref`), unwrapped with the KEK generation
  // its row names: slots re-wrapped by a rotation running in another process are read with the
  // new generation, the others with the old one, both live until the old one is destroyed.
  Result<hsm::ObjectHandle> meter_key(std::uint64_t ref, const store::KeySlot& slot,
                                      hsm::KeyAux** aux);
  // The handle of KEK generation `gen` (new keys go under kek::current_generation).
  Result<hsm::ObjectHandle> kek_handle(std::uint32_t gen);
  // The handle to sign with for the token private key `label` (a command key): found once per
  // session, and with `session_copy` a session copy of it when the token makes one
  // (hsm::signing_handle; its note says why not).
  Result<hsm::SigningHandle> signing_key(const std::string& label, bool session_copy);
  // Gives the session back (the cached key objects and the signing key's session copy are
  // destroyed, or forgotten when the session was lost with them).
  void drop_hsm();
  // meter_key() counts its lookups in gridseal_hsm_key_cache_{hits,misses}_total of `registry`
  // (a miss is a C_UnwrapKey) and reports the process's bound AES sessions in
  // gridseal_hsm_bound_aes_sessions{state="open"|"in_use"}. Call once, before the state is used.
  void count_key_lookups(metrics::Registry& registry);

 private:
  metrics::Counter* key_hits_ = nullptr;
  metrics::Counter* key_misses_ = nullptr;
  metrics::Gauge* bound_open_ = nullptr;
  metrics::Gauge* bound_in_use_ = nullptr;
  hsm::BoundAesPool* bound_pool_ = nullptr;
  std::optional<hsm::SigningHandle> signing_;
  std::string signing_label_;
};

struct StoreThreadState {
  // The meter cache: `meter_cache` records, trusted for `ttl` at most, the store's change feed
  // read every `poll` (src/meter_cache.h).
  StoreThreadState(std::size_t meter_cache, std::chrono::milliseconds ttl,
                   std::chrono::milliseconds poll = store::MeterCache::kDefaultPoll)
      : meters(meter_cache, ttl, poll) {}
  std::optional<store::KeyStore> store;
  store::MeterCache meters;

  // Opens the store connection on first use (the database must exist).
  Status ensure_store(const std::string& path);
};

// A fixed set of per-thread states: take() blocks until one is free.
template <typename State>
class StatePool {
 public:
  void add(std::unique_ptr<State> s) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(s));
  }
  std::unique_ptr<State> take() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return !free_.empty(); });
    auto s = std::move(free_.back());
    free_.pop_back();
    return s;
  }
  void give(std::unique_ptr<State> s) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(std::move(s));
    }
    cv_.notify_one();
  }
  // Runs fn on every state not taken, then forgets them (shutdown).
  void drain(const std::function<void(State&)>& fn) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& s : free_) fn(*s);
    free_.clear();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<State>> free_;
};

}  // namespace gs
