// Per handler-thread HSM and store state: see handler_state.h.
#include "src/handler_state.h"

#include <errno.h>

#include <atomic>
#include <cstdio>

#include "hsm/ops.h"

namespace gs {

Status HsmThreadState::ensure_hsm(HsmContext& hsm, std::size_t key_cache) {
  if (hsm_ready()) return {};
  drop_hsm();
  GS_ASSIGN(auto l, hsm.pool->acquire());
  lease.emplace(std::move(l));
  hsm::Session& s = lease->session();
  keks.clear();
  // The KEK of each slot is found by its generation on first use (meter_key), not here: after
  // a rotation gs-kek itself may be gone.
  GS_ASSIGN(aes, hsm::HsmAes::make(s, hsm::kNoObject));
  keys = std::make_unique<hsm::MeterKeyCache>(s, hsm::kNoObject, key_cache);
  keys->bind_operations(hsm.bound_aes.get());
  bound_pool_ = hsm.bound_aes.get();
  return {};
}

Result<hsm::ObjectHandle> HsmThreadState::kek_handle(std::uint32_t gen) {
  if (!lease) return Error(Errc::hsm_failure, "no HSM session");
  return keks.get(lease->session(), gen);
}

Result<hsm::ObjectHandle> HsmThreadState::meter_key(std::uint64_t ref, const store::KeySlot& slot,
                                                    hsm::KeyAux** aux) {
  if (!keys) return Error(Errc::hsm_failure, "no HSM session");
  GS_ASSIGN(const hsm::ObjectHandle k, kek_handle(slot.kek));
  const std::uint64_t misses = keys->misses();
  auto h = keys->get(ref, k, slot.wrapped, aux);
  if (keys->misses() != misses) {
    if (key_misses_ != nullptr) key_misses_->inc();
  } else if (h.ok() && key_hits_ != nullptr) {
    key_hits_->inc();
  }
  if (bound_pool_ != nullptr) {
    const hsm::BoundAesPool::Stats st = bound_pool_->stats();
    if (bound_open_ != nullptr) {
      bound_open_->set(static_cast<double>(st.sessions));
      bound_in_use_->set(static_cast<double>(st.in_use));
    }
    static std::atomic<bool> refusal_noted{false};
    if (st.open_failures > 0 && !refusal_noted.exchange(true)) {
      std::fprintf(stderr,
                   "%s: hsm.bound_aes: the token refused a session (%llu open for bound "
                   "operations); keys without them use one C_EncryptInit per EAX' step\n",
                   program_invocation_short_name, static_cast<unsigned long long>(st.sessions));
    }
  }
  return h;
}

void HsmThreadState::count_key_lookups(metrics::Registry& registry) {
  key_hits_ = &registry.counter("gridseal_hsm_key_cache_hits_total",
                                "Meter-key lookups answered by a handler's session key cache");
  key_misses_ = &registry.counter(
      "gridseal_hsm_key_cache_misses_total",
      "Meter-key lookups that unwrapped the key into the session (C_UnwrapKey)");
  const std::string help =
      "PKCS#11 sessions of the process's bound AES operations (hsm.bound_aes): opened, and "
      "holding a cached meter key's operations";
  bound_open_ = &registry.gauge("gridseal_hsm_bound_aes_sessions", help, {{"state", "open"}});
  bound_in_use_ = &registry.gauge("gridseal_hsm_bound_aes_sessions", help, {{"state", "in_use"}});
}

Result<hsm::SigningHandle> HsmThreadState::signing_key(const std::string& label,
                                                        bool session_copy) {
  if (!lease) return Error(Errc::hsm_failure, "no HSM session");
  if (signing_ && signing_label_ == label) return *signing_;
  hsm::Session& s = lease->session();
  if (signing_ && signing_->session_copy) (void)hsm::destroy_object(s, signing_->handle);
  signing_.reset();
  auto key = hsm::find_object(s, hsm::ObjectClass::private_key, label);
  if (!key.ok()) return Error(key.error().code, label + ": " + key.error().message());
  signing_ = hsm::signing_handle(s, *key, session_copy);
  signing_label_ = label;
  return *signing_;
}

void HsmThreadState::drop_hsm() {
  const bool lost = lease && (*lease)->lost();
  // The pool keeps the session open for the next lease: a copy left in it would outlive us.
  if (signing_ && signing_->session_copy && lease && !lost) {
    (void)hsm::destroy_object(lease->session(), signing_->handle);
  }
  signing_.reset();
  if (keys) {
    if (lost) keys->reset(0);  // the objects are gone with the session
    keys.reset();
  }
  aes.reset();
  keks.clear();
  lease.reset();
}

Status StoreThreadState::ensure_store(const std::string& path) {
  if (store) return {};
  db::OpenOptions opt;
  opt.create = false;
  GS_ASSIGN(auto ks, store::KeyStore::open(path, opt));
  store.emplace(std::move(ks));
  return {};
}

}  // namespace gs
