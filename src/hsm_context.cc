// Opening the configured HSM.
#include "src/hsm_context.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "hsm/softhsm.h"

namespace gs {

Status prepare_embedded_softhsm(const config::HsmConfig& cfg) {
  if (cfg.softhsm_dir.empty()) return {};
  GS_ASSIGN(std::string conf, hsm::softhsm::write_config(cfg.softhsm_dir));
  return hsm::softhsm::use_config(conf);
}

Result<hsm::Secret> read_user_pin(const config::HsmConfig& cfg) {
  if (!cfg.pin_file.empty()) return hsm::read_pin_file(cfg.pin_file);
  if (!cfg.pin_env.empty()) return hsm::read_pin_env(cfg.pin_env.c_str());
  return {Errc::invalid_argument, "no user PIN source: set hsm.pin_file or hsm.pin_env"};
}

Result<HsmContext> open_hsm(const config::HsmConfig& cfg) {
  GS_TRY(prepare_embedded_softhsm(cfg));
  HsmContext ctx;
  GS_ASSIGN(ctx.module, hsm::Module::open(cfg.module));
  GS_ASSIGN(ctx.slot, ctx.module->find_slot(cfg.token_label));
  GS_ASSIGN(hsm::Secret pin, read_user_pin(cfg));
  GS_ASSIGN(ctx.pool, hsm::SessionPool::make(*ctx.module, ctx.slot, std::move(pin), cfg.sessions));
  if (cfg.bound_aes) {
    // Unless capped, bounded by the key caches (two sessions per cached key).
    const std::size_t cap = cfg.bound_aes_sessions == 0 ? SIZE_MAX : cfg.bound_aes_sessions;
    ctx.bound_aes = std::make_unique<hsm::BoundAesPool>(*ctx.module, ctx.slot, cap);
  }
  return ctx;
}

Result<c1222::EaxPrime> eax_for_key(hsm::HsmAes& aes, hsm::ObjectHandle key, hsm::KeyAux* aux) {
  aes.set_key(key);
  BlockCipher* cipher = &aes;
  if (aux != nullptr && aux->bound != nullptr && !aux->bound->broken()) {
    aux->bound->set_fallback(&aes);
    cipher = aux->bound;
  }
  if (aux != nullptr && aux->valid) {
    Block d{}, q{};
    std::memcpy(d.data(), aux->bytes.data(), 16);
    std::memcpy(q.data(), aux->bytes.data() + 16, 16);
    auto e = c1222::EaxPrime::with_subkeys(*cipher, d, q);
    secure_zero(d.data(), d.size());
    secure_zero(q.data(), q.size());
    return e;
  }
  GS_ASSIGN(auto e, c1222::EaxPrime::make(*cipher));
  if (aux != nullptr) {
    std::memcpy(aux->bytes.data(), e.d().data(), 16);
    std::memcpy(aux->bytes.data() + 16, e.q().data(), 16);
    aux->valid = true;
  }
  return e;
}

}  // namespace gs
