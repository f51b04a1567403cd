// Parsing and validation of the [server] and [ses] tables of gridseal-sesd's configuration.
#include "ses/ses_config.h"

#include <filesystem>

#include "src/daemon_config.h"
#include "src/toml_fields.h"

namespace gs::ses {

namespace fs = std::filesystem;

using namespace toml_fields;

Result<SesConfig> load_ses_config(const std::string& path) {
  SesConfig c;
  GS_ASSIGN(auto common, daemon::load_common(path, "gridseal-sesd", "ses"));
  c.base = std::move(common.base);
  c.base_oid = std::move(common.base_oid);
  const toml::table& root = common.root;
  const fs::path& dir = common.dir;

  // SoftHSM2 measurements: one handler thread per process and one process per core serve more
  // than several handler threads sharing a process (gridseal-bench ses, README).
  daemon::ProcessModel pm;
  pm.server.worker_threads = 1;
  // Event loops and audit writer under SCHED_BATCH: 5-12 % less SES CPU per command open loop
  // at 10,000 /s on 2 cores (README, session 15).
  pm.server.sched_batch = true;
  GS_TRY(daemon::parse_server_table(root, path, dir, 1, pm));
  c.server = std::move(pm.server);
  c.processes = pm.processes;
  c.drain = pm.drain;

  GS_ASSIGN(const toml::table* ses, get_table(root, "ses", path));
  if (ses == nullptr) return key_error(path, "ses", "table is required");
  const std::string p = "ses.";
  GS_TRY(check_keys(*ses, path, p,
                    {"head_end_title", "ses_title", "policy", "command_key", "metrics",
                     "metrics_address", "metrics_port", "meter_cache", "meter_cache_ttl_ms",
                     "meter_cache_poll_ms", "id_block_size", "require_approved_policy"}));
  GS_TRY(get_title(*ses, "head_end_title", path, p, c.head_end_title, true));
  GS_TRY(get_title(*ses, "ses_title", path, p, c.ses_title, true));
  GS_TRY(get_string(*ses, "policy", path, p, c.policy_file));
  if (c.policy_file.empty()) return key_error(path, "ses.policy", "is required");
  c.policy_file = resolve_path(dir, c.policy_file);
  GS_TRY(get_int(*ses, "command_key", path, p, 1, 255, c.command_key_id));
  GS_TRY(get_bool(*ses, "metrics", path, p, c.metrics_enabled));
  GS_TRY(get_string(*ses, "metrics_address", path, p, c.metrics.address));
  GS_TRY(get_int(*ses, "metrics_port", path, p, 0, 65535, c.metrics.port));
  GS_TRY(get_int(*ses, "meter_cache", path, p, 1, 10000000, c.meter_cache));
  GS_TRY(get_int(*ses, "meter_cache_ttl_ms", path, p, 0, 3600000, c.meter_cache_ttl_ms));
  GS_TRY(get_int(*ses, "meter_cache_poll_ms", path, p, 0, 60000, c.meter_cache_poll_ms));
  GS_TRY(get_int(*ses, "id_block_size", path, p, 1, 1 << 24, c.id_block_size));
  GS_TRY(get_bool(*ses, "require_approved_policy", path, p, c.require_approved_policy));

  // The handler commits its requests' records (audit.commit_on_handler): README, session 21;
  // they are fsync'd after the write lock is released (audit.fsync_outside_lock): session 22,
  // by the audit's sync thread while the handler goes on (audit.fsync_thread): session 23.
  c.audit.commit_on_handler = true;
  c.audit.fsync_outside_lock = true;
  c.audit.fsync_thread = true;
  GS_TRY(daemon::parse_audit_table(root, path, c.audit));
  return c;
}

}  // namespace gs::ses
