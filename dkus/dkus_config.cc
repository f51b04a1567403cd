// Parsing and validation of the [server] and [dkus] tables of gridseal-dkusd's configuration.
#include "dkus/dkus_config.h"

#include <filesystem>

#include "src/daemon_config.h"
#include "src/toml_fields.h"

namespace gs::dkus {

namespace fs = std::filesystem;

using namespace toml_fields;

Result<DkusConfig> load_dkus_config(const std::string& path) {
  DkusConfig c;
  GS_ASSIGN(auto common, daemon::load_common(path, "gridseal-dkusd", "dkus"));
  c.base = std::move(common.base);
  c.base_oid = std::move(common.base_oid);
  const toml::table& root = common.root;
  const fs::path& dir = common.dir;

  // DKUS defaults: handlers run on the event-loop threads (worker_threads = 0), so the messages
  // of one connection are processed in arrival order (a meter's ids must rise strictly; a
  // handler pool could reorder two pipelined messages of one meter and refuse the later one).
  daemon::ProcessModel pm;
  pm.server.worker_threads = 0;
  pm.server.io_threads = 2;
  GS_TRY(daemon::parse_server_table(root, path, dir, 0, pm));
  c.server = std::move(pm.server);
  c.processes = pm.processes;
  c.drain = pm.drain;

  GS_ASSIGN(const toml::table* dk, get_table(root, "dkus", path));
  if (dk == nullptr) return key_error(path, "dkus", "table is required");
  const std::string p = "dkus.";
  GS_TRY(check_keys(*dk, path, p,
                    {"dkus_title", "head_end_title", "metrics", "metrics_address",
                     "metrics_port", "meter_cache", "meter_cache_ttl_ms", "id_block_size",
                     "iv_window_s", "refuse_sealed_before_start", "replay_marks",
                     "commit_max_delay_us", "commit_max_batch", "max_pending",
                     "mac_failure_threshold"}));
  GS_TRY(get_title(*dk, "dkus_title", path, p, c.dkus_title, true));
  GS_TRY(get_title(*dk, "head_end_title", path, p, c.head_end_title, true));
  GS_TRY(get_bool(*dk, "metrics", path, p, c.metrics_enabled));
  GS_TRY(get_string(*dk, "metrics_address", path, p, c.metrics.address));
  GS_TRY(get_int(*dk, "metrics_port", path, p, 0, 65535, c.metrics.port));
  GS_TRY(get_int(*dk, "meter_cache", path, p, 1, 10000000, c.meter_cache));
  GS_TRY(get_int(*dk, "meter_cache_ttl_ms", path, p, 0, 3600000, c.meter_cache_ttl_ms));
  GS_TRY(get_int(*dk, "id_block_size", path, p, 1, 1 << 24, c.id_block_size));
  GS_TRY(get_int(*dk, "iv_window_s", path, p, 1, 86400, c.iv_window_s));
  GS_TRY(get_bool(*dk, "refuse_sealed_before_start", path, p, c.refuse_sealed_before_start));
  GS_TRY(get_int(*dk, "replay_marks", path, p, 1024, 100000000, c.replay_marks));
  GS_TRY(get_int(*dk, "commit_max_delay_us", path, p, 0, 100000, c.commit_max_delay_us));
  GS_TRY(get_int(*dk, "commit_max_batch", path, p, 1, 100000, c.commit_max_batch));
  GS_TRY(get_int(*dk, "max_pending", path, p, 1, 10000000, c.max_pending));
  GS_TRY(get_int(*dk, "mac_failure_threshold", path, p, 1, 1000000, c.mac_failure_threshold));
  return c;
}

}  // namespace gs::dkus
