// PKCS#11 operator keys (src/operator_token.h): signing on the operator's token. The URI
// parser is in src/operator_token_uri.cc.
#include "src/operator_token.h"

#include <algorithm>

#include "hsm/module.h"
#include "hsm/ops.h"
#include "hsm/session.h"
#include "hsm/types.h"

namespace gs::operators {

Result<EcSignature> sign_request_on_token(const Request& r, const TokenKeyUri& key) {
  GS_ASSIGN(auto digest, request_digest(r));
  GS_ASSIGN(hsm::Secret pin, key.pin_file.empty() ? hsm::read_pin_env(key.pin_env.c_str())
                                                 : hsm::read_pin_file(key.pin_file));
  auto module = hsm::Module::open(key.module_path);
  if (!module.ok()) {
    return Error(module.error().code,
                 "operator token module " + key.module_path + ": " + module.error().message());
  }
  auto slot = (*module)->find_slot(key.token);
  if (!slot.ok()) {
    return Error(slot.error().code, "operator token '" + key.token + "': " + slot.error().message());
  }
  GS_ASSIGN(auto session, hsm::Session::open(**module, *slot, /*read_write=*/false));
  if (auto st = session.login(hsm::UserType::user, pin); !st.ok()) {
    return Error(st.error().code, "operator token '" + key.token + "': login: " + st.error().message());
  }
  auto h = hsm::find_object(session, hsm::ObjectClass::private_key, key.object);
  if (!h.ok()) {
    (void)session.logout();
    return Error(h.error().code, "operator token '" + key.token + "': private key '" + key.object +
                                     "': " + h.error().message());
  }
  auto sig = hsm::sign_digest(session, *h, digest);
  (void)session.logout();
  if (!sig.ok()) {
    return Error(sig.error().code, "operator token '" + key.token + "': signing: " +
                                       sig.error().message());
  }
  EcSignature out{};
  std::copy(sig->begin(), sig->end(), out.begin());
  return out;
}

}  // namespace gs::operators
