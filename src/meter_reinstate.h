// Lifting a meter's revocation (`gridseal meters reinstate`, issue 7). A
// revoked key is never returned to service (NIST SP 800-57: a compromised key
// is never active again), so lifting a revocation means putting the meter back
// on the road to service under a NEW key: the same one-meter revocation rekey
// `gridseal meters revoke` starts (RolloverStore::revoke_key), sealed under its
// compromised key, whose new key only the holder of the meter's registered
// private key can derive. The meter is served again only once it answers under
// that new key (the DKUS's confirm); until then the SES keeps refusing it
// (meter_quarantined).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "gridseal/result.h"
#include "src/key_store.h"

namespace gs::store {

inline constexpr std::size_t kMaxReinstateReason = 256;

struct ReinstateOutcome {
  MeterState before = MeterState::quarantined;
  MeterState after = MeterState::quarantined;
  std::int64_t campaign =
      0; // the revocation rekey campaign started (0: none, see below)
  std::uint8_t seal_slot = 0; // the compromised key that seals the update
  std::int64_t slots_destroyed =
      0;               // pending keys of an unfinished rollover, erased
  bool proven = false; // the meter has an MT-2043 proof and is not flagged
                       // (rekey can start)
};

// In the caller's transaction (so that its audit record commits with it):
//   quarantined with no live rollover step (its revocation rekey was aborted or
//   dropped): a new
//     revocation rekey campaign; its pending keys are destroyed;
//   quarantined that already holds an active key (replaced): back to active, no
//   campaign; compromised (`revoke --permanent`), only with `lift_permanent`:
//   quarantined, then as above.
//     Its keys stay compromised. Meant for a permanent revocation made in error
//     of a meter that never left the utility's custody: a stolen device may
//     have given up its private key, and any key derived for it is then no
//     better (re-provision such a meter instead);
// refused (nothing changed):
//   Errc::not_found      unknown meter;
//   Errc::conflict       active meter (not revoked), a quarantined meter whose
//   rekey is under
//                        way (it is served again when the meter answers),
//                        compromised without `lift_permanent`, no key slot a
//                        rekey could use;
//   Errc::invalid_argument  no registered public key (it cannot be rekeyed).
// A second run of the same request is refused (the rekey is then under way).
Result<ReinstateOutcome> reinstate_meter(KeyStore &ks,
                                         std::string_view meter_id,
                                         std::string_view reason,
                                         std::string_view created_by,
                                         bool lift_permanent);

} // namespace gs::store
