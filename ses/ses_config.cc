// Parsing and validation of the [server] and [ses] tables of gridseal-sesd's configuration.
#include "ses/ses_config.h"

#include <filesystem>

#include "src/toml_fields.h"

namespace gs::ses {

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
                   c1222::OwnedApTitle& out, bool required) {
  std::string s;
  GS_TRY(get_string(t, key, file, "ses.", s));
  if (s.empty()) {
    if (required) return key_error(file, std::string("ses.") + key, "is required");
    return {};
  }
  auto title = c1222::OwnedApTitle::parse(s);
  if (!title.ok()) {
    return key_error(file, std::string("ses.") + key,
                     "not an AP title (" + title.error().message() + ")");
  }
  out = std::move(title).value();
  return {};
}

}  // namespace

Result<SesConfig> load_ses_config(const std::string& path) {
  SesConfig c;
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
  for (const char* unused : {"policy", "metrics", "tls", "dkus", "relay", "rollover", "log"}) {
    if (root.get(unused) != nullptr) {
      return key_error(path, unused, "not used by gridseal-sesd (see [ses] and [server])");
    }
  }

  // SoftHSM2 measurements: one handler thread per process and one process per core serve more
  // than several handler threads sharing a process (gridseal-bench ses, README).
  c.server.worker_threads = 1;
  GS_ASSIGN(const toml::table* srv, table(root, "server", path));
  if (srv != nullptr) {
    const std::string p = "server.";
    GS_TRY(check_keys(*srv, path, p,
                      {"address", "port", "plain_tcp", "plain_tcp_remote", "tls_ca", "tls_cert",
                       "tls_key", "max_frame", "max_in_flight", "max_connections",
                       "handshake_timeout_ms", "idle_timeout_ms", "read_timeout_ms",
                       "write_timeout_ms", "request_timeout_ms", "io_threads", "worker_threads",
                       "drain_ms", "processes"}));
    auto& s = c.server;
    GS_TRY(get_string(*srv, "address", path, p, s.address));
    GS_TRY(get_int(*srv, "port", path, p, 0, 65535, s.port));
    GS_TRY(get_bool(*srv, "plain_tcp", path, p, s.plain_tcp));
    GS_TRY(get_bool(*srv, "plain_tcp_remote", path, p, s.plain_tcp_remote));
    GS_TRY(get_string(*srv, "tls_ca", path, p, s.tls.ca_file));
    GS_TRY(get_string(*srv, "tls_cert", path, p, s.tls.cert_file));
    GS_TRY(get_string(*srv, "tls_key", path, p, s.tls.key_file));
    GS_TRY(get_int(*srv, "max_frame", path, p, 64, 65536, s.max_frame));
    GS_TRY(get_int(*srv, "max_in_flight", path, p, 1, 4096, s.max_in_flight));
    GS_TRY(get_int(*srv, "max_connections", path, p, 1, 100000, s.max_connections));
    GS_TRY(get_ms(*srv, "handshake_timeout_ms", path, p, 100, 600000, s.handshake_timeout));
    GS_TRY(get_ms(*srv, "idle_timeout_ms", path, p, 100, 86400000, s.idle_timeout));
    GS_TRY(get_ms(*srv, "read_timeout_ms", path, p, 100, 600000, s.read_timeout));
    GS_TRY(get_ms(*srv, "write_timeout_ms", path, p, 100, 600000, s.write_timeout));
    GS_TRY(get_ms(*srv, "request_timeout_ms", path, p, 100, 600000, s.request_timeout));
    GS_TRY(get_int(*srv, "io_threads", path, p, 1, 64, s.io_threads));
    GS_TRY(get_int(*srv, "worker_threads", path, p, 1, 256, s.worker_threads));
    GS_TRY(get_ms(*srv, "drain_ms", path, p, 0, 600000, c.drain));
    GS_TRY(get_int(*srv, "processes", path, p, 0, 64, c.processes));
    s.tls.ca_file = resolve_path(dir, s.tls.ca_file);
    s.tls.cert_file = resolve_path(dir, s.tls.cert_file);
    s.tls.key_file = resolve_path(dir, s.tls.key_file);
  }
  if (c.server.worker_threads == 0) c.server.worker_threads = 1;  // handlers block on the HSM
  if (auto st = server::validate(c.server); !st.ok()) {
    return key_error(path, "server", st.error().message());
  }

  GS_ASSIGN(const toml::table* ses, table(root, "ses", path));
  if (ses == nullptr) return key_error(path, "ses", "table is required");
  const std::string p = "ses.";
  GS_TRY(check_keys(*ses, path, p,
                    {"head_end_title", "ses_title", "policy", "command_key", "metrics",
                     "metrics_address", "metrics_port", "meter_cache", "meter_cache_ttl_ms",
                     "id_block_size"}));
  GS_TRY(parse_title(*ses, "head_end_title", path, c.head_end_title, true));
  GS_TRY(parse_title(*ses, "ses_title", path, c.ses_title, true));
  GS_TRY(get_string(*ses, "policy", path, p, c.policy_file));
  if (c.policy_file.empty()) return key_error(path, "ses.policy", "is required");
  c.policy_file = resolve_path(dir, c.policy_file);
  GS_TRY(get_int(*ses, "command_key", path, p, 1, 2, c.command_key_id));
  GS_TRY(get_bool(*ses, "metrics", path, p, c.metrics_enabled));
  GS_TRY(get_string(*ses, "metrics_address", path, p, c.metrics.address));
  GS_TRY(get_int(*ses, "metrics_port", path, p, 0, 65535, c.metrics.port));
  GS_TRY(get_int(*ses, "meter_cache", path, p, 1, 10000000, c.meter_cache));
  GS_TRY(get_int(*ses, "meter_cache_ttl_ms", path, p, 0, 3600000, c.meter_cache_ttl_ms));
  GS_TRY(get_int(*ses, "id_block_size", path, p, 1, 1 << 24, c.id_block_size));
  return c;
}

}  // namespace gs::ses
