// gridseal-bench: raw HSM rates measured on the daemon's own token, the ceilings the daemons'
// request paths are compared with.
// - SES composite: one ECDSA P-256 C_Sign with gs-cmd-<n> plus one EAX' seal of a 200-byte EPSEM
//   through PKCS#11 (HsmAes on an unwrapped meter key, L = E_K(0) included as the SES computes
//   it per request).
// - DKUS EAX' open: one EAX' verify + decrypt of a 200-byte meter message through PKCS#11 on an
//   unwrapped meter key whose handle and EAX' subkeys are cached, as the DKUS's key cache holds
//   them (two CBC-MACs in one CBC operation, one CTR pass: two C_EncryptInit).
// Both use the meter key's bound AES operations when the config enables them (hsm.bound_aes,
// hsm/bound_aes.h), as the daemons do: EAX' is then three C_EncryptUpdate calls.
#pragma once

#include <cstdint>
#include <string>

#include "gridseal/result.h"

namespace gs::bench {

enum class RawOp : std::uint8_t { ses_composite, eax_open };

struct RawHsmOptions {
  RawOp op = RawOp::ses_composite;
  std::string config;          // ses.toml / dkus.toml / gridseal.toml ([hsm] is used)
  std::size_t threads = 2;     // per process, each with its own session
  std::size_t processes = 1;   // >1: forked, each with its own PKCS#11 module (as SES workers)
  double seconds = 3;
  std::size_t epsem_bytes = 200;  // EPSEM sealed (ses_composite) or opened (eax_open)
  std::uint8_t command_key = 1;
  // Meter keys each thread unwraps into its session first and keeps (as the SES's per-session
  // key cache holds them at steady state): SoftHSM2 gets slower with many session objects.
  std::size_t resident_keys = 0;
};

struct RawHsmResult {
  std::uint64_t composites = 0;  // operations done (composites or opens)
  double per_s = 0;  // sum over threads and processes of each one's rate
};

Result<RawHsmResult> measure_raw_hsm(const RawHsmOptions& options);

}  // namespace gs::bench
