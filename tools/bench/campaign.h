// gridseal-bench rollover: drives a key-rollover campaign through the real `gridseal rollover`
// CLI (start, then status polls) as an operator would; the bench never writes the store.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "gridseal/result.h"

namespace gs::bench {

// What `gridseal rollover status ID --json` reported.
struct CampaignStatus {
  std::int64_t id = 0;
  std::string state;  // running, done, aborted
  std::int64_t total = 0;
  std::int64_t queued = 0;
  std::int64_t prepared = 0;  // in flight
  std::int64_t sent = 0;
  std::int64_t confirmed = 0;
  std::int64_t failed = 0;
  std::int64_t aborted = 0;
  std::int64_t created_at = 0;  // UTC seconds, the DKUS store's clock
  std::int64_t first_confirm_at = 0;
  std::int64_t last_confirm_at = 0;
  std::int64_t confirm_rate_per_hour = 0;
  bool finished = false;
  std::vector<std::pair<std::string, std::string>> failed_meters;  // id, error (first 20)
};

// The `gridseal` CLI and the configuration it reads (the DKUS's, for the store path).
struct CampaignCli {
  std::string gridseal;                      // path of the binary
  std::string config;                        // dkus.toml
  std::chrono::milliseconds timeout{30000};  // per CLI call
};

// `gridseal` next to this program (/proc/self/exe), or "" when it is not there.
std::string gridseal_next_to_self();

// The meter ids of the AP titles `prefix.first` .. `prefix.(first+count-1)`, read from the
// store named by the configuration (read-only). A title that is not registered is an error
// naming it.
Result<std::vector<std::string>> meter_ids_for_titles(const std::string& config_path,
                                                      const std::string& prefix,
                                                      std::uint64_t first, std::uint64_t count);

// `gridseal rollover start --file F [--rate R] --json`: the new campaign's id. The ids go to a
// temporary file that is removed again. `skipped` gets how many meters the CLI skipped.
Result<std::int64_t> start_campaign(const CampaignCli& cli, const std::vector<std::string>& ids,
                                    double rate, std::int64_t* skipped);

// `gridseal rollover status ID --json`.
Result<CampaignStatus> campaign_status(const CampaignCli& cli, std::int64_t id);

// Parses the status JSON (exposed for tests and diagnostics).
Result<CampaignStatus> parse_campaign_status(const std::string& json);

}  // namespace gs::bench
