// Per handler-thread HSM and store state: see handler_state.h.
#include "src/handler_state.h"

#include "hsm/ops.h"

namespace gs {

Status HsmThreadState::ensure_hsm(HsmContext& hsm, std::size_t key_cache) {
  if (hsm_ready()) return {};
  drop_hsm();
  GS_ASSIGN(auto l, hsm.pool->acquire());
  lease.emplace(std::move(l));
  hsm::Session& s = lease->session();
  auto k = hsm::find_object(s, hsm::ObjectClass::secret_key, kLabelKek);
  if (!k.ok()) return Error(k.error().code, std::string(kLabelKek) + ": " + k.error().message());
  kek = *k;
  GS_ASSIGN(aes, hsm::HsmAes::make(s, kek));
  keys = std::make_unique<hsm::MeterKeyCache>(s, kek, key_cache);
  return {};
}

void HsmThreadState::drop_hsm() {
  const bool lost = lease && (*lease)->lost();
  if (keys) {
    if (lost) keys->reset(0);  // the objects are gone with the session
    keys.reset();
  }
  aes.reset();
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
