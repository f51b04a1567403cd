// gridseal-sesd configuration: the shared config (base_oid, [hsm], [store]) plus the daemon's
// own [server] and [ses] tables, parsed and validated here with every key named in errors.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "c1222/oid.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/config.h"
#include "src/daemon_config.h"
#include "src/metrics.h"
#include "src/server.h"

namespace gs::ses {

// [audit]: the tamper-evident audit trail (src/audit.h), the same keys for both daemons.
using AuditConfig = daemon::AuditConfig;

struct SesConfig {
  config::Config base;             // base_oid, [hsm], [store]
  Bytes base_oid;                  // absolute OID content of base.base_oid
  server::ServerConfig server;     // [server]
  std::uint32_t processes = 0;     // server.processes: worker processes, 0 = number of cores
  std::chrono::milliseconds drain{10000};  // server.drain_ms: SIGTERM grace for requests in flight
  c1222::OwnedApTitle head_end_title;  // ses.head_end_title
  c1222::OwnedApTitle ses_title;       // ses.ses_title: calling title of error responses
  std::string policy_file;             // ses.policy
  std::uint8_t command_key_id = 1;     // ses.command_key: gs-cmd-<n>, 1..255 (`gridseal cmdkeys`)
  bool metrics_enabled = true;
  metrics::HttpConfig metrics;         // ses.metrics_address / ses.metrics_port
  std::uint32_t meter_cache = 100000;  // ses.meter_cache: meter records cached per worker thread
  // ses.meter_cache_ttl_ms: the longest an entry is trusted (a safety net: changes arrive by
  // the store's change feed, read every ses.meter_cache_poll_ms; 0 = every lookup)
  std::uint32_t meter_cache_ttl_ms = 300000;
  std::uint32_t meter_cache_poll_ms = 100;
  std::uint32_t id_block_size = 1024;  // ses.id_block_size: invocation ids reserved per DB write
  AuditConfig audit;                   // [audit]
  // ses.require_approved_policy: serve only a policy file whose SHA-256 is the newest one applied
  // with `gridseal policy apply` (until the first apply, a fresh install, any valid file with a
  // warning). At start an unapproved file is fatal; on SIGHUP it is refused and the current
  // policy stays.
  bool require_approved_policy = true;
};

// Reads and validates the whole file. Relative paths resolve against the file's directory.
Result<SesConfig> load_ses_config(const std::string& path);

}  // namespace gs::ses
