// gridseal-bench: the meters of a fleet file with their keys, for scenarios that seal messages
// as the meters themselves would: the manufacturer CSV with plain keys (`gridseal-bench
// make-fleet`, `gridseal-metersim export --keys plain`) or a gridseal-metersim state file
// (format version 1 or 2 of tools/metersim/fleet.h, any key mode: it holds every meter's keys).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "c1222/oid.h"
#include "gridseal/result.h"

namespace gs::bench {

struct FleetMeter {
  c1222::OwnedApTitle title;  // as in the file (CSV), or relative to the default base OID
                              // when the state file's absolute title lies under it
  std::uint8_t key_id = 0;    // the slot of the key (CSV key_slot, state file active slot)
  std::array<std::uint8_t, 16> key{};
  std::uint64_t counter = 0;  // state file: the meter's own invocation counter; CSV: 0
};

// The meters of a fleet; their keys are wiped when it goes.
class FleetKeys {
 public:
  FleetKeys() = default;
  FleetKeys(FleetKeys&&) = default;
  FleetKeys& operator=(FleetKeys&&) = default;
  FleetKeys(const FleetKeys&) = delete;
  FleetKeys& operator=(const FleetKeys&) = delete;
  ~FleetKeys();

  std::vector<FleetMeter> meters;
  bool from_state = false;  // read from a gridseal-metersim state file
};

// The first `limit` meters of the file (0: all). A state file is recognised by its magic;
// anything else is read as the CSV. Errors name the file and the line or meter: a CSV row whose
// key is not `plain:` cannot be sealed by the bench and is refused.
Result<FleetKeys> load_fleet(const std::string& path, std::size_t limit);

}  // namespace gs::bench
