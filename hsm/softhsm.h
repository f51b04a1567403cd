// SoftHSM2 specifics: a private softhsm2.conf with its own token directory (tests, `hsm init`).
#pragma once

#include <string>

#include "gridseal/result.h"

namespace gs::hsm::softhsm {

inline constexpr const char* kDefaultModule = "/usr/lib/softhsm/libsofthsm2.so";

// Creates `dir`/tokens (0700) and `dir`/softhsm2.conf (0600) pointing at it (file backend,
// log level ERROR) unless the conf exists. Returns the conf path.
Result<std::string> write_config(const std::string& dir);

// Points SOFTHSM2_CONF at `conf_path` for this process; must precede Module::open.
Status use_config(const std::string& conf_path);

}  // namespace gs::hsm::softhsm
