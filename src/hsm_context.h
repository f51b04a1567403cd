// Opens the configured HSM for a process: SoftHSM2 setup when embedded, module, token, user
// login through a session pool, and the handles of gridseal's own key objects.
#pragma once

#include <memory>
#include <string>

#include "c1222/eax_prime.h"
#include "hsm/bound_aes.h"
#include "hsm/hsm_aes.h"
#include "hsm/key_cache.h"
#include "hsm/module.h"
#include "hsm/session.h"
#include "src/config.h"

namespace gs {

// Labels of the objects of DESIGN §4.
inline constexpr const char* kLabelKek = "gs-kek";
inline constexpr const char* kLabelProvision = "gs-provision";
inline constexpr const char* kLabelAudit = "gs-audit";
inline constexpr const char* kLabelRevocation = "gs-revocation";
inline constexpr const char* kLabelCommandKey1 = "gs-cmd-1";
inline constexpr const char* kLabelCommandKey2 = "gs-cmd-2";

struct HsmContext {
  std::unique_ptr<hsm::Module> module;
  hsm::SlotId slot = 0;
  std::unique_ptr<hsm::SessionPool> pool;
  // The sessions of bound AES operations (hsm.bound_aes), null when off. Declared after the
  // module: destroyed before its C_Finalize.
  std::unique_ptr<hsm::BoundAesPool> bound_aes;
};

// Points SOFTHSM2_CONF at the embedded token's configuration when hsm.softhsm_dir is set.
Status prepare_embedded_softhsm(const config::HsmConfig& cfg);

// The user PIN from hsm.pin_file or hsm.pin_env.
Result<hsm::Secret> read_user_pin(const config::HsmConfig& cfg);

// Module + token + logged-in pool. Errors name the module path, token label or PIN source.
Result<HsmContext> open_hsm(const config::HsmConfig& cfg);

// EAX' on the meter key `key` through `aes` (pointed at it): the subkeys come from `aux` when
// it holds them, else they are derived (one HSM call) and kept there. When the key has bound
// operations (aux->bound), EAX' runs on them with `aes` as their fallback.
Result<c1222::EaxPrime> eax_for_key(hsm::HsmAes& aes, hsm::ObjectHandle key, hsm::KeyAux* aux);

}  // namespace gs
