// Builds SES-secured commands (DESIGN §1.1, §3.1, §3.3): MT-2040 signed authorization, MT-2042
// receipt read, EAX' mode 2 under the meter's active key; and the signed DR broadcast (mode 0).
#pragma once

#include <cstdint>
#include <optional>

#include "c1222/eax_prime.h"
#include "c1222/message.h"
#include "c1222/oid.h"
#include "c1222/profile.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "hsm/session.h"
#include "hsm/types.h"
#include "src/key_store.h"

namespace gs {
class HostEcKey;
}

namespace gs::ses {

// Signs a 32-byte SHA-256 digest with one command key (gs-cmd-<n>); returns r || s.
class Signer {
 public:
  Signer() = default;
  Signer(const Signer&) = delete;
  Signer& operator=(const Signer&) = delete;
  virtual ~Signer() = default;

  virtual std::uint8_t key_id() const noexcept = 0;  // the MT-2040 signer key id
  virtual Result<c1222::Signature> sign(const c1222::Digest& digest) = 0;
};

// Over the HSM: one C_SignInit + C_Sign on a session the caller holds for the duration.
class HsmSigner final : public Signer {
 public:
  HsmSigner(hsm::Session& session, hsm::ObjectHandle private_key, std::uint8_t key_id)
      : session_(&session), key_(private_key), key_id_(key_id) {}
  std::uint8_t key_id() const noexcept override { return key_id_; }
  Result<c1222::Signature> sign(const c1222::Digest& digest) override;

 private:
  hsm::Session* session_;
  hsm::ObjectHandle key_;
  std::uint8_t key_id_;
};

// Over a host key (tests, simulations). The key must outlive the signer.
class HostSigner final : public Signer {
 public:
  HostSigner(const HostEcKey& key, std::uint8_t key_id) : key_(&key), key_id_(key_id) {}
  std::uint8_t key_id() const noexcept override { return key_id_; }
  Result<c1222::Signature> sign(const c1222::Digest& digest) override;

 private:
  const HostEcKey* key_;
  std::uint8_t key_id_;
};

// Why a meter cannot receive a command. The daemon answers unknown -> uat, others -> isc.
enum class MeterRefusal : std::uint8_t { none, unknown_meter, meter_revoked, meter_quarantined,
                                         no_active_key };
const char* meter_refusal_name(MeterRefusal r) noexcept;
// The C12.22 response code for a refusal (uat 0x0C or isc 0x03; 0 for none).
std::uint8_t response_code_for(MeterRefusal r) noexcept;

// The active key slot of a meter found by its title, or why there is none.
struct MeterKeyChoice {
  MeterRefusal refusal = MeterRefusal::none;
  const store::KeySlot* slot = nullptr;  // points into the Meter; set when refusal == none
};
// `meter` nullptr: unknown. The returned slot points into *meter, which must outlive it.
MeterKeyChoice choose_meter_key(const store::Meter* meter) noexcept;

// Everything the secured command binds. Times are UTC seconds.
struct CommandParams {
  c1222::CommandClass command_class = c1222::CommandClass::read;
  std::uint32_t not_before = 0;
  std::uint32_t not_after = 0;
  std::uint32_t now = 0;            // IV
  std::uint32_t invocation_id = 0;  // from ids::InvocationIdAllocator (1..0x7FFFFFFF)
  c1222::ApTitle head_end_title;    // calling title when the request has none
  ByteView base_oid;                // empty: default
};

// Builds and seals the command for `meter` from a decoded mode-0 request addressed to it:
// A2 = the request's called title (must equal the meter's), A6 = the request's calling title or
// head_end_title, A8 = invocation_id, AC = {meter_key_id, now}; no A1, A4 or 8B. EPSEM: the
// request's control byte (security bits set to mode 2) and ED class, MT-2040 first, the
// request's services, then `30 0F FA` for classes 2 and 4 unless the request already ends with
// it. The request's services must already have passed policy::classify (no MT-2040/41/42
// writes); a request whose first service is an MT-2040 write is refused here as well.
Result<Bytes> secure_command(const c1222::Message& request, const store::Meter& meter,
                             const CommandParams& params, Signer& signer,
                             c1222::EaxPrime& meter_key, std::uint8_t meter_key_id);

// The broadcast form (DESIGN §1.5, PROFILE-VECTORS example 4): mode 0, MT-2040 class 3, to the
// request's called title (a DR group the caller has checked), no AC, control byte forced to
// "never respond". params.command_class must be demand_response.
Result<Bytes> sign_broadcast(const c1222::Message& request, const CommandParams& params,
                             Signer& signer);

// The calling title a secured command carries.
c1222::ApTitle calling_title_for(const c1222::Message& request, const CommandParams& params);

}  // namespace gs::ses
