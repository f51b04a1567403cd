// Parsing and validation of gridseal-dkusd's [server], [dkus], [audit] and [rollover] tables.
#include "dkus/dkus_config.h"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <filesystem>
#include <utility>

#include "src/daemon_config.h"
#include "src/invocation_ids.h"
#include "src/key_store.h"
#include "src/toml_fields.h"

namespace gs::dkus {

namespace fs = std::filesystem;

using namespace toml_fields;

namespace {

// An IPv4 or IPv6 literal (the relay client connects to addresses, not names); *loopback tells
// whether it is 127.0.0.0/8 or ::1.
bool ip_literal(const std::string& s, bool* loopback) {
  in_addr v4{};
  in6_addr v6{};
  if (inet_pton(AF_INET, s.c_str(), &v4) == 1) {
    *loopback = (ntohl(v4.s_addr) >> 24) == 127;
    return true;
  }
  if (inet_pton(AF_INET6, s.c_str(), &v6) == 1) {
    *loopback = IN6_IS_ADDR_LOOPBACK(&v6);
    return true;
  }
  return false;
}

// [rollover] (DESIGN §1.3): see conf/dkus.toml for every key.
Status parse_rollover(const toml::table& root, const std::string& path, const fs::path& dir,
                      RolloverConfig& r) {
  GS_ASSIGN(const toml::table* t, get_table(root, "rollover", path));
  if (t == nullptr) return {};
  const std::string p = "rollover.";
  GS_TRY(check_keys(*t, path, p,
                    {"enabled", "relay_address", "relay_port", "relay_plain_tcp",
                     "relay_plain_tcp_remote", "relay_tls_ca", "relay_tls_cert",
                     "relay_tls_key", "relay_server_name", "command_key", "validity_s",
                     "clock_skew_s", "id_peak_rate", "id_block_size", "connections",
                     "pipeline_depth", "batch", "answer_timeout_ms", "max_attempts",
                     "backoff_initial_ms", "backoff_max_ms", "poll_ms", "standby_retention_s",
                     "key_cache", "challenge_ttl_s"}));
  GS_TRY(get_bool(*t, "enabled", path, p, r.enabled));
  r.relay.host.clear();
  GS_TRY(get_string(*t, "relay_address", path, p, r.relay.host));
  std::uint32_t port = 0;
  GS_TRY(get_int(*t, "relay_port", path, p, 1, 65535, port));
  r.relay.port = static_cast<std::uint16_t>(port);
  GS_TRY(get_bool(*t, "relay_plain_tcp", path, p, r.relay.plain_tcp));
  GS_TRY(get_bool(*t, "relay_plain_tcp_remote", path, p, r.relay_plain_tcp_remote));
  GS_TRY(get_string(*t, "relay_tls_ca", path, p, r.relay.tls.ca_file));
  GS_TRY(get_string(*t, "relay_tls_cert", path, p, r.relay.tls.cert_file));
  GS_TRY(get_string(*t, "relay_tls_key", path, p, r.relay.tls.key_file));
  GS_TRY(get_string(*t, "relay_server_name", path, p, r.relay.server_name));
  r.relay.tls.ca_file = resolve_path(dir, r.relay.tls.ca_file);
  r.relay.tls.cert_file = resolve_path(dir, r.relay.tls.cert_file);
  r.relay.tls.key_file = resolve_path(dir, r.relay.tls.key_file);
  GS_TRY(get_int(*t, "command_key", path, p, 1, 255, r.command_key_id));
  GS_TRY(get_int(*t, "validity_s", path, p, 1, 86400, r.validity_s));
  GS_TRY(get_int(*t, "clock_skew_s", path, p, 0, 3600, r.clock_skew_s));
  GS_TRY(get_int(*t, "id_peak_rate", path, p, 1, 100000000, r.id_peak_rate));
  GS_TRY(get_int(*t, "id_block_size", path, p, 1, 1 << 24, r.id_block_size));
  GS_TRY(get_int(*t, "connections", path, p, 1, 64, r.connections));
  GS_TRY(get_int(*t, "pipeline_depth", path, p, 1, 1024, r.pipeline_depth));
  GS_TRY(get_int(*t, "batch", path, p, 1, 10000, r.batch));
  GS_TRY(get_ms(*t, "answer_timeout_ms", path, p, 100, 600000, r.relay.timeout));
  GS_TRY(get_int(*t, "max_attempts", path, p, 1, 1000, r.max_attempts));
  GS_TRY(get_ms(*t, "backoff_initial_ms", path, p, 10, 3600000, r.backoff_initial));
  GS_TRY(get_ms(*t, "backoff_max_ms", path, p, 10, 86400000, r.backoff_max));
  GS_TRY(get_ms(*t, "poll_ms", path, p, 10, 60000, r.poll));
  GS_TRY(get_int(*t, "standby_retention_s", path, p, 0, 315360000, r.standby_retention_s));
  GS_TRY(get_int(*t, "key_cache", path, p, 16, 1000000, r.key_cache));
  GS_TRY(get_int(*t, "challenge_ttl_s", path, p, 1, 86400, r.challenge_ttl_s));
  if (r.backoff_max < r.backoff_initial) {
    return key_error(path, p + "backoff_max_ms", "must be at least rollover.backoff_initial_ms");
  }
  // An id issued from a block up to its maximum age must not come round again while the key
  // update carrying it is still valid (DESIGN §2).
  if (auto st =
          ids::check_window(std::uint64_t{r.validity_s}, r.id_peak_rate, kRolloverIdBlockAgeS);
      !st.ok()) {
    return key_error(path, p + "validity_s", st.error().message());
  }
  if (!r.enabled) return {};
  bool loopback = false;
  if (r.relay.host.empty()) return key_error(path, p + "relay_address", "is required");
  if (!ip_literal(r.relay.host, &loopback)) {
    return key_error(path, p + "relay_address", "must be an IPv4 or IPv6 address");
  }
  if (port == 0) return key_error(path, p + "relay_port", "is required");
  if (r.relay.plain_tcp) {
    if (!loopback && !r.relay_plain_tcp_remote) {
      return key_error(path, p + "relay_plain_tcp",
                       "plain TCP only to a loopback relay address (set "
                       "rollover.relay_plain_tcp_remote to allow it)");
    }
    return {};
  }
  for (const auto& [key, file] :
       {std::pair<const char*, const std::string*>{"relay_tls_ca", &r.relay.tls.ca_file},
        {"relay_tls_cert", &r.relay.tls.cert_file},
        {"relay_tls_key", &r.relay.tls.key_file}}) {
    if (file->empty()) {
      return key_error(path, p + key, "is required unless rollover.relay_plain_tcp is true");
    }
    std::error_code ec;
    if (!fs::is_regular_file(*file, ec)) {
      return key_error(path, p + key, "cannot read " + *file);
    }
  }
  return {};
}

}  // namespace

Result<DkusConfig> load_dkus_config(const std::string& path) {
  DkusConfig c;
  GS_ASSIGN(auto common,
            daemon::load_common(path, "gridseal-dkusd", "dkus", {"rollover", "audit"}));
  c.base = std::move(common.base);
  c.base_oid = std::move(common.base_oid);
  const toml::table& root = common.root;
  const fs::path& dir = common.dir;

  // DKUS defaults: handlers run on the event-loop threads (worker_threads = 0), so the messages
  // of one connection are processed in arrival order (a handler pool could reorder two
  // pipelined messages of one meter: harmless only within dkus.reorder_window).
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
                     "metrics_port", "meter_cache", "meter_cache_ttl_ms", "meter_cache_poll_ms",
                     "id_block_size", "iv_window_s", "refuse_sealed_before_start", "replay_marks",
                     "reorder_window", "commit_max_delay_us", "commit_max_batch", "max_pending",
                     "mac_failure_threshold"}));
  GS_TRY(get_title(*dk, "dkus_title", path, p, c.dkus_title, true));
  GS_TRY(get_title(*dk, "head_end_title", path, p, c.head_end_title, true));
  GS_TRY(get_bool(*dk, "metrics", path, p, c.metrics_enabled));
  GS_TRY(get_string(*dk, "metrics_address", path, p, c.metrics.address));
  GS_TRY(get_int(*dk, "metrics_port", path, p, 0, 65535, c.metrics.port));
  GS_TRY(get_int(*dk, "meter_cache", path, p, 1, 10000000, c.meter_cache));
  GS_TRY(get_int(*dk, "meter_cache_ttl_ms", path, p, 0, 3600000, c.meter_cache_ttl_ms));
  GS_TRY(get_int(*dk, "meter_cache_poll_ms", path, p, 0, 60000, c.meter_cache_poll_ms));
  GS_TRY(get_int(*dk, "id_block_size", path, p, 1, 1 << 24, c.id_block_size));
  GS_TRY(get_int(*dk, "iv_window_s", path, p, 1, 86400, c.iv_window_s));
  GS_TRY(get_bool(*dk, "refuse_sealed_before_start", path, p, c.refuse_sealed_before_start));
  GS_TRY(get_int(*dk, "replay_marks", path, p, 1024, 100000000, c.replay_marks));
  GS_TRY(get_int(*dk, "reorder_window", path, p, 0, store::kMaxReplayWindow, c.reorder_window));
  GS_TRY(get_int(*dk, "commit_max_delay_us", path, p, 0, 100000, c.commit_max_delay_us));
  GS_TRY(get_int(*dk, "commit_max_batch", path, p, 1, 100000, c.commit_max_batch));
  GS_TRY(get_int(*dk, "max_pending", path, p, 1, 10000000, c.max_pending));
  GS_TRY(get_int(*dk, "mac_failure_threshold", path, p, 1, 1000000, c.mac_failure_threshold));
  GS_TRY(daemon::parse_audit_table(root, path, c.audit));
  if (c.audit.commit_on_handler) {
    // The DKUS's records are few (refusals, operator events); its opens commit with the
    // replay state on their own committer, which this key does not govern.
    return key_error(path, "audit.commit_on_handler", "is a gridseal-sesd setting");
  }
  GS_TRY(parse_rollover(root, path, dir, c.rollover));
  c.rollover.relay.max_frame = c.server.max_frame;
  c.rollover.command_key_session_copy = c.base.hsm.command_key_session_copy;
  return c;
}

}  // namespace gs::dkus
