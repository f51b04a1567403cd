// The shared [server] and [audit] tables of the daemons' configuration files.
#include "src/daemon_config.h"

#include "src/toml_fields.h"
#include "src/toml_text.h"

namespace gs::daemon {

using namespace toml_fields;

Status parse_server_table(const toml::table& root, const std::string& file,
                          const std::filesystem::path& dir, std::int64_t min_worker_threads,
                          ProcessModel& out) {
  GS_ASSIGN(const toml::table* srv, get_table(root, "server", file));
  if (srv != nullptr) {
    const std::string p = "server.";
    GS_TRY(check_keys(*srv, file, p,
                      {"address", "port", "plain_tcp", "plain_tcp_remote", "tls_ca", "tls_cert",
                       "tls_key", "max_frame", "max_in_flight", "max_connections",
                       "handshake_timeout_ms", "idle_timeout_ms", "read_timeout_ms",
                       "write_timeout_ms", "request_timeout_ms", "io_threads", "worker_threads",
                       "drain_ms", "processes", "sched_batch", "balance_connections"}));
    auto& s = out.server;
    GS_TRY(get_string(*srv, "address", file, p, s.address));
    GS_TRY(get_int(*srv, "port", file, p, 0, 65535, s.port));
    GS_TRY(get_bool(*srv, "plain_tcp", file, p, s.plain_tcp));
    GS_TRY(get_bool(*srv, "plain_tcp_remote", file, p, s.plain_tcp_remote));
    GS_TRY(get_string(*srv, "tls_ca", file, p, s.tls.ca_file));
    GS_TRY(get_string(*srv, "tls_cert", file, p, s.tls.cert_file));
    GS_TRY(get_string(*srv, "tls_key", file, p, s.tls.key_file));
    GS_TRY(get_int(*srv, "max_frame", file, p, 64, 65536, s.max_frame));
    GS_TRY(get_int(*srv, "max_in_flight", file, p, 1, 4096, s.max_in_flight));
    GS_TRY(get_int(*srv, "max_connections", file, p, 1, 100000, s.max_connections));
    GS_TRY(get_ms(*srv, "handshake_timeout_ms", file, p, 100, 600000, s.handshake_timeout));
    GS_TRY(get_ms(*srv, "idle_timeout_ms", file, p, 100, 86400000, s.idle_timeout));
    GS_TRY(get_ms(*srv, "read_timeout_ms", file, p, 100, 600000, s.read_timeout));
    GS_TRY(get_ms(*srv, "write_timeout_ms", file, p, 100, 600000, s.write_timeout));
    GS_TRY(get_ms(*srv, "request_timeout_ms", file, p, 100, 600000, s.request_timeout));
    GS_TRY(get_int(*srv, "io_threads", file, p, 1, 64, s.io_threads));
    GS_TRY(get_int(*srv, "worker_threads", file, p, min_worker_threads, 256, s.worker_threads));
    GS_TRY(get_ms(*srv, "drain_ms", file, p, 0, 600000, out.drain));
    GS_TRY(get_int(*srv, "processes", file, p, 0, 64, out.processes));
    GS_TRY(get_bool(*srv, "sched_batch", file, p, s.sched_batch));
    GS_TRY(get_bool(*srv, "balance_connections", file, p, s.balance_connections));
    s.tls.ca_file = resolve_path(dir, s.tls.ca_file);
    s.tls.cert_file = resolve_path(dir, s.tls.cert_file);
    s.tls.key_file = resolve_path(dir, s.tls.key_file);
  }
  if (auto st = server::validate(out.server); !st.ok()) {
    return key_error(file, "server", st.error().message());
  }
  return {};
}

Status parse_audit_table(const toml::table& root, const std::string& file, AuditConfig& out) {
  GS_ASSIGN(const toml::table* au, get_table(root, "audit", file));
  if (au == nullptr) return {};
  const std::string a = "audit.";
  GS_TRY(check_keys(*au, file, a,
                    {"enabled", "checkpoint_interval_s", "anchor_interval_ms", "batch_max",
                     "batch_delay_us", "max_pending", "commit_on_handler",
                     "fsync_outside_lock", "fsync_thread"}));
  GS_TRY(get_bool(*au, "enabled", file, a, out.enabled));
  GS_TRY(get_int(*au, "checkpoint_interval_s", file, a, 0, 86400, out.checkpoint_interval_s));
  GS_TRY(get_int(*au, "anchor_interval_ms", file, a, 0, 3600000, out.anchor_interval_ms));
  GS_TRY(get_int(*au, "batch_max", file, a, 1, 65536, out.batch_max));
  GS_TRY(get_int(*au, "batch_delay_us", file, a, 0, 1000000, out.batch_delay_us));
  GS_TRY(get_int(*au, "max_pending", file, a, 1, 1 << 24, out.max_pending));
  GS_TRY(get_bool(*au, "commit_on_handler", file, a, out.commit_on_handler));
  GS_TRY(get_bool(*au, "fsync_outside_lock", file, a, out.fsync_outside_lock));
  // The sync thread fsyncs what COMMIT left unsynced: without fsync_outside_lock it has no
  // work, so it is off unless asked for, and asking for it is an error.
  const bool asked = au->contains("fsync_thread");
  GS_TRY(get_bool(*au, "fsync_thread", file, a, out.fsync_thread));
  if (!out.fsync_outside_lock && out.fsync_thread) {
    if (asked) {
      return key_error(file, "audit.fsync_thread",
                       "needs audit.fsync_outside_lock = true (with the fsync inside COMMIT "
                       "there is nothing for the thread to do)");
    }
    out.fsync_thread = false;
  }
  return {};
}

audit::WriterOptions audit_writer_options(const AuditConfig& c, std::string program,
                                          bool sched_batch) {
  audit::WriterOptions wo;
  wo.max_batch = c.batch_max;
  wo.max_delay = std::chrono::microseconds(c.batch_delay_us);
  wo.max_pending = c.max_pending;
  wo.checkpoint_interval = std::chrono::seconds(c.checkpoint_interval_s);
  wo.anchor_interval = std::chrono::milliseconds(c.anchor_interval_ms);
  wo.program = std::move(program);
  wo.around_done = server::run_batched;  // a commit's responses reach the event loop together
  wo.sched_batch = sched_batch;
  wo.caller_commits = c.commit_on_handler;
  wo.fsync_outside_lock = c.fsync_outside_lock;
  wo.fsync_thread = c.fsync_thread;
  return wo;
}

Result<CommonConfig> load_common(const std::string& path, const std::string& program,
                                 const char* own_table,
                                 std::initializer_list<const char*> also_own) {
  CommonConfig c;
  GS_ASSIGN(c.base, config::load(path));
  auto base = c1222::oid_from_dotted(c.base.base_oid);
  if (!base.ok()) return key_error(path, "base_oid", base.error().message());
  c.base_oid = std::move(base).value();
  GS_ASSIGN(c.root, toml_text::parse_file(path));
  c.dir = std::filesystem::absolute(path).parent_path();
  for (const char* foreign : {"ses", "dkus", "policy", "metrics", "tls", "relay", "rollover", "log"}) {
    bool own = std::string(foreign) == own_table;
    for (const char* t : also_own) own = own || std::string(foreign) == t;
    if (!own && c.root.get(foreign) != nullptr) {
      return key_error(path, foreign,
                       "not used by " + program + " (see [" + own_table + "] and [server])");
    }
  }
  return c;
}

}  // namespace gs::daemon
