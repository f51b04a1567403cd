// gridseal-bench: the raw HSM composite of one secured command, measured on the daemon's own
// token: one ECDSA P-256 C_Sign with gs-cmd-<n> plus one EAX' seal of a 200-byte EPSEM through
// PKCS#11 (HsmAes on an unwrapped meter key, L = E_K(0) included as the SES computes it per
// request). The ceiling the SES request path is compared with.
#pragma once

#include <cstdint>
#include <string>

#include "gridseal/result.h"

namespace gs::bench {

struct RawHsmOptions {
  std::string config;          // ses.toml / gridseal.toml ([hsm] is used)
  std::size_t threads = 2;     // per process, each with its own session
  std::size_t processes = 1;   // >1: forked, each with its own PKCS#11 module (as SES workers)
  double seconds = 3;
  std::size_t epsem_bytes = 200;
  std::uint8_t command_key = 1;
  // Meter keys each thread unwraps into its session first and keeps (as the SES's per-session
  // key cache holds them at steady state): SoftHSM2 gets slower with many session objects.
  std::size_t resident_keys = 0;
};

struct RawHsmResult {
  std::uint64_t composites = 0;
  double per_s = 0;  // sum over threads and processes of each one's rate
};

Result<RawHsmResult> measure_raw_hsm(const RawHsmOptions& options);

}  // namespace gs::bench
