// Parsing and validation of the [server] and [dkus] tables of gridseal-dkusd's configuration.
#include "dkus/dkus_config.h"

#include <filesystem>

#include "src/toml_fields.h"

namespace gs::dkus {

namespace fs = std::filesystem;

namespace {

using namespace toml_fields;

Status get_ms(const toml::table& t, const char* key, const std::string& file,
              const std::string& prefix, std::int64_t lo, std::int64_t hi,
              std::chrono::milliseconds& out) {
  std::int64_t v = out.count();
  GS_TRY(get_int(t, key, file, prefix, lo, hi, v));
  out = std::chrono::milliseconds(v);
  return {};
}

Result<const toml::table*> table(const toml::table& root, const char* name,
                                 const std::string& file) {
  const toml::node* n = root.get(name);
  if (n == nullptr) return static_cast<const toml::table*>(nullptr);
  const toml::table* t = n->as_table();
  if (t == nullptr) return key_error(file, name, "must be a table");
  return t;
}

Status parse_title(const toml::table& t, const char* key, const std::string& file,
                   c1222::OwnedApTitle& out) {
  std::string s;
  GS_TRY(get_string(t, key, file, "dkus.", s));
  if (s.empty()) return key_error(file, std::string("dkus.") + key, "is required");
  auto title = c1222::OwnedApTitle::parse(s);
  if (!title.ok()) {
    return key_error(file, std::string("dkus.") + key,
                     "not an AP title (" + title.error().message() + ")");
  }
  out = std::move(title).value();
  return {};
}

Status parse_server(const toml::table& srv, const std::string& path, const fs::path& dir,
                    DkusConfig& c) {
  const std::string p = "server.";
  GS_TRY(check_keys(srv, path, p,
                    {"address", "port", "plain_tcp", "plain_tcp_remote", "tls_ca", "tls_cert",
                     "tls_key", "max_frame", "max_in_flight", "max_connections",
                     "handshake_timeout_ms", "idle_timeout_ms", "read_timeout_ms",
                     "write_timeout_ms", "request_timeout_ms", "io_threads", "worker_threads",
                     "drain_ms", "processes"}));
  auto& s = c.server;
  GS_TRY(get_string(srv, "address", path, p, s.address));
  GS_TRY(get_int(srv, "port", path, p, 0, 65535, s.port));
  GS_TRY(get_bool(srv, "plain_tcp", path, p, s.plain_tcp));
  GS_TRY(get_bool(srv, "plain_tcp_remote", path, p, s.plain_tcp_remote));
  GS_TRY(get_string(srv, "tls_ca", path, p, s.tls.ca_file));
  GS_TRY(get_string(srv, "tls_cert", path, p, s.tls.cert_file));
  GS_TRY(get_string(srv, "tls_key", path, p, s.tls.key_file));
  GS_TRY(get_int(srv, "max_frame", path, p, 64, 65536, s.max_frame));
  GS_TRY(get_int(srv, "max_in_flight", path, p, 1, 4096, s.max_in_flight));
  GS_TRY(get_int(srv, "max_connections", path, p, 1, 100000, s.max_connections));
  GS_TRY(get_ms(srv, "handshake_timeout_ms", path, p, 100, 600000, s.handshake_timeout));
  GS_TRY(get_ms(srv, "idle_timeout_ms", path, p, 100, 86400000, s.idle_timeout));
  GS_TRY(get_ms(srv, "read_timeout_ms", path, p, 100, 600000, s.read_timeout));
  GS_TRY(get_ms(srv, "write_timeout_ms", path, p, 100, 600000, s.write_timeout));
  GS_TRY(get_ms(srv, "request_timeout_ms", path, p, 100, 600000, s.request_timeout));
  GS_TRY(get_int(srv, "io_threads", path, p, 1, 64, s.io_threads));
  GS_TRY(get_int(srv, "worker_threads", path, p, 0, 256, s.worker_threads));
  GS_TRY(get_ms(srv, "drain_ms", path, p, 0, 600000, c.drain));
  GS_TRY(get_int(srv, "processes", path, p, 0, 64, c.processes));
  s.tls.ca_file = resolve_path(dir, s.tls.ca_file);
  s.tls.cert_file = resolve_path(dir, s.tls.cert_file);
  s.tls.key_file = resolve_path(dir, s.tls.key_file);
  return {};
}

}  // namespace

Result<DkusConfig> load_dkus_config(const std::string& path) {
  DkusConfig c;
  GS_ASSIGN(c.base, config::load(path));
  auto base = c1222::oid_from_dotted(c.base.base_oid);
  if (!base.ok()) return key_error(path, "base_oid", base.error().message());
  c.base_oid = std::move(base).value();

  toml::table root;
  try {
    root = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    return Error(Errc::invalid_argument, path + ": " + std::string(e.description()));
  }
  const fs::path dir = fs::absolute(path).parent_path();
  for (const char* unused : {"policy", "metrics", "tls", "ses", "relay", "rollover", "log"}) {
    if (root.get(unused) != nullptr) {
      return key_error(path, unused, "not used by gridseal-dkusd (see [dkus] and [server])");
    }
  }

  // DKUS defaults: handlers run on the event-loop threads (worker_threads = 0), so the messages
  // of one connection are processed in arrival order (a meter's ids must rise strictly; a
  // handler pool could reorder two pipelined messages of one meter and refuse the later one).
  c.server.worker_threads = 0;
  c.server.io_threads = 2;
  GS_ASSIGN(const toml::table* srv, table(root, "server", path));
  if (srv != nullptr) GS_TRY(parse_server(*srv, path, dir, c));
  if (auto st = server::validate(c.server); !st.ok()) {
    return key_error(path, "server", st.error().message());
  }

  GS_ASSIGN(const toml::table* dk, table(root, "dkus", path));
  if (dk == nullptr) return key_error(path, "dkus", "table is required");
  const std::string p = "dkus.";
  GS_TRY(check_keys(*dk, path, p,
                    {"dkus_title", "head_end_title", "metrics", "metrics_address",
                     "metrics_port", "meter_cache", "meter_cache_ttl_ms", "id_block_size",
                     "iv_window_s", "refuse_sealed_before_start", "replay_marks",
                     "commit_max_delay_us", "commit_max_batch", "max_pending",
                     "mac_failure_threshold"}));
  GS_TRY(parse_title(*dk, "dkus_title", path, c.dkus_title));
  GS_TRY(parse_title(*dk, "head_end_title", path, c.head_end_title));
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
