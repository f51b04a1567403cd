// The parts of gridseal-sesd's and gridseal-dkusd's configuration files that are the same: the
// [server] table (listener, TLS, limits, timeouts, threads, processes, drain) and the [audit]
// table (the tamper-evident audit trail, src/audit.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <string>
#include <toml++/toml.h>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/audit.h"
#include "src/config.h"
#include "src/server.h"

namespace gs::daemon {

struct ProcessModel {
  server::ServerConfig server;
  std::uint32_t processes = 0;             // server.processes: 0 = one per CPU core
  std::chrono::milliseconds drain{10000};  // server.drain_ms
};

// Parses [server] of `root` (absent: the defaults already in `out`) and validates the result
// (server::validate). min_worker_threads: 0 when handlers may run on the event loop. Relative
// TLS paths resolve against `dir`. Every error names the file and the key.
Status parse_server_table(const toml::table& root, const std::string& file,
                          const std::filesystem::path& dir, std::int64_t min_worker_threads,
                          ProcessModel& out);

// [audit]: the tamper-evident audit trail (src/audit.h), the same keys for both daemons.
struct AuditConfig {
  bool enabled = true;                       // audit.enabled
  std::uint32_t checkpoint_interval_s = 60;  // audit.checkpoint_interval_s (0: every transaction)
  std::uint32_t anchor_interval_ms = 1000;   // audit.anchor_interval_ms (0: every transaction)
  std::uint32_t batch_max = 512;             // audit.batch_max: records per transaction
  std::uint32_t batch_delay_us = 1000;       // audit.batch_delay_us: wait for more records
  std::uint32_t max_pending = 65536;         // audit.max_pending: queued records (then bsy)
  // audit.commit_on_handler (gridseal-sesd only): the handler thread commits the records of
  // the requests it served once its queue runs empty (audit::WriterOptions::caller_commits).
  bool commit_on_handler = false;
  // audit.fsync_outside_lock: a batch's COMMIT writes the WAL without fsync, releasing SQLite's
  // write lock at once, and the batch fsyncs the WAL before it reports its records durable
  // (audit::WriterOptions::fsync_outside_lock). Default true in gridseal-sesd.
  bool fsync_outside_lock = false;
  // audit.fsync_thread: with fsync_outside_lock, the fsync and the release of each committed
  // batch happen on the writer's sync thread (audit::WriterOptions::fsync_thread).
  bool fsync_thread = false;
};

// Parses [audit] of `root` (absent: the defaults already in `out`); errors name the key.
Status parse_audit_table(const toml::table& root, const std::string& file, AuditConfig& out);
// The audit::Writer options [audit] gives, for `program`'s records; the writer thread follows
// server.sched_batch (`sched_batch`) as the event loops do.
audit::WriterOptions audit_writer_options(const AuditConfig& c, std::string program,
                                          bool sched_batch);

// The part of a daemon's file every program shares: base_oid, [hsm], [store] (config::load),
// the parsed TOML and the file's directory (relative paths resolve against it). Top-level
// tables of other programs are refused, naming the program and its own table; `also_own` names
// further top-level tables that belong to this program (the DKUS's [rollover]).
struct CommonConfig {
  config::Config base;
  Bytes base_oid;  // absolute OID content of base.base_oid
  toml::table root;
  std::filesystem::path dir;
};
Result<CommonConfig> load_common(const std::string& path, const std::string& program,
                                 const char* own_table,
                                 std::initializer_list<const char*> also_own = {});

}  // namespace gs::daemon
