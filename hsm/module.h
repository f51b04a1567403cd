// A loaded PKCS#11 library (dlopen, C_Initialize with OS locking), token lookup and init.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gridseal/result.h"
#include "hsm/types.h"

namespace gs::hsm {

struct TokenInfo {
  SlotId slot = 0;
  std::string label;  // trailing blanks removed
  std::string manufacturer;
  std::string model;
  std::string serial;
  bool initialized = false;
  bool user_pin_initialized = false;
};

// One per PKCS#11 library per process: C_Initialize on open(), C_Finalize in the destructor.
// Thread-safe (the library is initialised with CKF_OS_LOCKING_OK); sessions are not.
class Module {
 public:
  // Loads `library_path`, calls C_GetFunctionList and C_Initialize. A library that is already
  // initialised in this process (another live Module) is refused.
  static Result<std::unique_ptr<Module>> open(const std::string& library_path);

  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;
  ~Module();

  const std::string& path() const noexcept { return path_; }
  std::string library_description() const;

  // Slots with a token present.
  Result<std::vector<TokenInfo>> tokens() const;
  // The slot whose token has exactly this label; Errc::not_found names the label otherwise.
  Result<SlotId> find_slot(std::string_view token_label) const;

  // SoftHSM2-style token creation: C_InitToken on a free (uninitialised) slot with the SO PIN,
  // then C_InitPIN with the user PIN. Returns the token's slot (SoftHSM2 renumbers slots).
  // A token with this label that already exists is refused with Errc::bad_value.
  Result<SlotId> init_token(std::string_view label, const Secret& so_pin, const Secret& user_pin);

  // C_CloseAllSessions (also logs the application out of the token).
  Status close_all_sessions(SlotId slot);

  // The CK_FUNCTION_LIST (opaque outside hsm/).
  const void* function_list() const noexcept { return functions_; }

 private:
  Module() = default;

  std::string path_;
  void* dl_ = nullptr;
  const void* functions_ = nullptr;
  bool initialized_ = false;
};

// "CKR_PIN_INCORRECT" (or "CKR_0x...").
std::string ckr_name(ReturnValue rv);
// Errc for a CK_RV (CKR_OK -> Errc::ok).
Errc ckr_errc(ReturnValue rv);
// An Error "C_Login: CKR_PIN_INCORRECT" with the mapped code.
Error ckr_error(const char* function, ReturnValue rv);
// True for the return values after which a session must be reopened.
bool ckr_session_lost(ReturnValue rv);

}  // namespace gs::hsm
