// gridseal-dkusd configuration: the shared config (base_oid, [hsm], [store]) plus the daemon's
// own [server], [dkus], [audit] and [rollover] tables, validated here with every key named in
// errors.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "c1222/oid.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/client.h"
#include "src/config.h"
#include "src/daemon_config.h"
#include "src/metrics.h"
#include "src/server.h"

namespace gs::dkus {

// Invocation-id blocks of the rollover engine are abandoned after this many seconds.
inline constexpr std::uint64_t kRolloverIdBlockAgeS = 60;

// [rollover]: the key-rollover engine (dkus/rollover_engine.h), run by worker 0 only.
struct RolloverConfig {
  bool enabled = false;  // rollover.enabled
  // The collection engine's relay endpoint the key updates go to (C12.22, TLS 1.3 with this
  // client certificate, or plain TCP): relay_address (an IP), relay_port, relay_tls_ca,
  // relay_tls_cert, relay_tls_key, relay_server_name, relay_plain_tcp. relay.timeout is
  // answer_timeout_ms (per connect, send and answer).
  server::ClientConfig relay;
  bool relay_plain_tcp_remote = false;  // rollover.relay_plain_tcp_remote
  std::uint8_t command_key_id = 1;      // rollover.command_key: gs-cmd-<n> (1..255), MT-2040 signer id
  std::uint32_t validity_s = 300;       // rollover.validity_s: class-4 window length
  std::uint32_t clock_skew_s = 60;      // rollover.clock_skew_s: not_before = now - skew
  std::uint32_t id_peak_rate = 50000;   // rollover.id_peak_rate: wrap-horizon check (ids/s)
  std::uint32_t id_block_size = 1024;   // rollover.id_block_size
  std::uint32_t connections = 2;        // rollover.connections to the relay
  std::uint32_t pipeline_depth = 16;    // rollover.pipeline_depth: per connection
  std::uint32_t batch = 256;            // rollover.batch: steps per transaction
  std::uint32_t max_attempts = 8;       // rollover.max_attempts: sends before a step fails
  std::chrono::milliseconds backoff_initial{1000};  // rollover.backoff_initial_ms
  std::chrono::milliseconds backoff_max{60000};     // rollover.backoff_max_ms
  std::chrono::milliseconds poll{500};              // rollover.poll_ms
  std::uint32_t standby_retention_s = 604800;       // rollover.standby_retention_s
  std::uint32_t key_cache = 1024;  // rollover.key_cache: unwrapped meter keys kept by the engine
  bool command_key_session_copy = true;  // hsm.command_key_session_copy (hsm::signing_handle)
  // rollover.challenge_ttl_s: an MT-2043 challenge (DESIGN §3.4) answered later than this after
  // it was issued is refused (a retry issues a fresh one).
  std::uint32_t challenge_ttl_s = 300;
};

struct DkusConfig {
  config::Config base;             // base_oid, [hsm], [store]
  Bytes base_oid;                  // absolute OID content of base.base_oid
  server::ServerConfig server;     // [server]; DKUS defaults: io_threads 2, worker_threads 0
  std::uint32_t processes = 0;     // server.processes: worker processes, 0 = number of cores
  std::chrono::milliseconds drain{10000};  // server.drain_ms
  c1222::OwnedApTitle dkus_title;      // dkus.dkus_title: calling title of error responses
  c1222::OwnedApTitle head_end_title;  // dkus.head_end_title: called title of error responses
                                       // to requests without a called title
  bool metrics_enabled = true;
  metrics::HttpConfig metrics;         // dkus.metrics_address / dkus.metrics_port
  std::uint32_t meter_cache = 100000;  // dkus.meter_cache: meter records per handler thread
  // dkus.meter_cache_ttl_ms: the longest an entry is trusted (a safety net: changes arrive by
  // the store's change feed, read every dkus.meter_cache_poll_ms; 0 = every lookup)
  std::uint32_t meter_cache_ttl_ms = 300000;
  std::uint32_t meter_cache_poll_ms = 100;
  std::uint32_t id_block_size = 1024;  // dkus.id_block_size: ids of error responses per DB write
  // Replay defence (DESIGN §2, §5).
  std::uint32_t iv_window_s = 300;           // dkus.iv_window_s: |IV time - now| allowed
  bool refuse_sealed_before_start = true;    // dkus.refuse_sealed_before_start
  std::uint32_t replay_marks = 1000000;      // dkus.replay_marks: in-memory marks per worker
  // dkus.reorder_window: ids per meter in the replay window (store::ReplayMark): an id up to
  // reorder_window-1 below the highest accepted one is still accepted once. 0: strictly rising.
  std::uint32_t reorder_window = 64;
  std::uint32_t commit_max_delay_us = 2000;  // dkus.commit_max_delay_us
  std::uint32_t commit_max_batch = 4096;     // dkus.commit_max_batch
  std::uint32_t max_pending = 65536;         // dkus.max_pending: updates awaiting commit
  // Meters whose MAC fails this many times in a row are flagged (metric, log line, audit record).
  std::uint32_t mac_failure_threshold = 5;   // dkus.mac_failure_threshold
  daemon::AuditConfig audit;                 // [audit]: as gridseal-sesd's
  // The calling AP title of the rollover engine's key updates is head_end_title (DESIGN §2).
  RolloverConfig rollover;
};

// Reads and validates the whole file. Relative paths resolve against the file's directory.
Result<DkusConfig> load_dkus_config(const std::string& path);

// Threads that run handlers (each with its own HSM session and store connection): the handler
// pool, or the event-loop threads when handlers run inline (worker_threads = 0).
inline std::size_t handler_threads(const DkusConfig& c) {
  return c.server.worker_threads > 0 ? c.server.worker_threads : c.server.io_threads;
}

}  // namespace gs::dkus
