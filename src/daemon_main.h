// What the two daemons' main() functions share: the command line (with the internal flags the
// supervisor gives its workers), opening the HSM in a worker, serving as a worker until SIGTERM,
// and starting the supervisor (port reservation, the "listening on" line).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "gridseal/clock.h"
#include "gridseal/result.h"
#include "src/config.h"
#include "src/hsm_context.h"
#include "src/metrics.h"
#include "src/server.h"
#include "src/supervisor.h"

namespace gs::daemon {

// An internal integer flag a worker receives ("--limiter-fd", "--started-at").
struct IntFlag {
  const char* name;
  long long lo;
  long long hi;
};

struct Args {
  std::string config;
  bool check = false;
  // Internal, set by the supervisor: worker index (-1: this is the supervisor), control channel,
  // port, and the daemon's own flags in the order given to parse_args.
  int worker = -1;
  int control_fd = -1;
  int port = -1;
  int balance_fd = -1;  // the supervisor's connection table (conn_balance.h); -1: none
  std::vector<long long> extra;
};

// `--config F [--check]`, plus the internal flags. Returns 0 to go on, else the exit code (help:
// 0 after printing `usage`, usage error: 2). A worker must have every internal flag.
int parse_args(int argc, char** argv, const std::string& name, const char* usage,
               const std::vector<IntFlag>& extra, Args& a);

// Prints "<name>: <what>" on stderr; returns 1.
int fail(const std::string& name, const std::string& what);

// `--check` with [audit] on: the trail in the store at `store_path` against the HSM anchor,
// read only; prints "<name>: audit trail <state>: <finding>". An error says what failed.
Status check_audit_trail(const std::string& name, const std::string& store_path, HsmContext& hsm);

// In a worker: the HSM with at least `threads` sessions; transient refusals (another process
// initialising the module at the same instant) are retried a few times.
Result<HsmContext> open_worker_hsm(config::HsmConfig cfg, std::size_t threads,
                                   const std::string& who);

// Everything a worker does once its service exists.
struct WorkerSpec {
  std::string name;  // "gridseal-sesd"
  int worker = 0;
  int control_fd = -1;
  int balance_fd = -1;          // Args::balance_fd
  server::ServerConfig server;  // port set to the supervisor's
  std::chrono::milliseconds drain{10000};
  server::Handler handler;
  metrics::Registry* registry = nullptr;
  std::function<metrics::Health()> health;
  std::function<void()> on_sighup;  // empty: logged and ignored
};

// Blocks the daemon signals (call first thing in a worker, before any thread starts).
void block_worker_signals();
// Starts the server, reports ready to the supervisor, serves until SIGTERM/SIGINT (or the
// supervisor is gone), drains within spec.drain. Returns the exit code.
int serve_worker(WorkerSpec spec);

// What every worker process gets as GLIBC_TUNABLES unless the operator set the variable: a
// larger per-thread cache of freed small blocks in glibc's allocator. SoftHSM2 and OpenSSL
// allocate and free dozens of small blocks per signature or EAX' operation, and a request
// allocates on the event-loop thread and frees on the handler thread; with glibc's default of 7
// blocks per size class many of those calls took the arena's slow paths. Measured on the SES
// (README "Performance"): those paths fell from 11.4 % to about 9 % of its CPU samples. It holds
// at most 1,000 freed blocks per size class up to 1 KiB per thread, so it can keep a few MiB per
// thread more than the default. It matters only in a build on glibc's malloc: the daemons are
// linked with jemalloc by default (allocator_name).
inline constexpr char kWorkerGlibcTunables[] = "glibc.malloc.tcache_count=1000";

// What every worker process gets as MALLOC_CONF unless the operator set the variable: jemalloc
// backs its heap and its own metadata with transparent huge pages (madvise(MADV_HUGEPAGE), so
// it works with the kernel's default THP mode "madvise"; with "never" it does nothing). The
// per-message path probes fleet-sized hash tables (meter records, key handles and subkeys,
// replay marks: about 1 GB per DKUS worker at 100,000 meters), and with 4 KiB pages nearly
// every probe also missed the TLB; the SES's handlers hold SoftHSM2's objects for as many keys.
// Measured at 100,000 meters, TLS 1.3 (README "Performance", session 16), alternating runs: the
// tuned SES at 32 x 16 spent 83-118 µs of CPU per command with it (8 runs) against 120-144
// without (4 runs); the DKUS at 16 x 16 15.8-17.6 against 16.7-21.5 µs per message (4 and 4).
// The cost: memory in 2 MiB steps (a worker's 16 MB start-up RSS becomes 34 MB) and, with the
// kernel's THP defrag "madvise", compaction on a page fault when memory is fragmented, which a
// warmed-up worker rarely takes (jemalloc keeps its pages). Glibc's malloc ignores the variable.
inline constexpr char kWorkerMallocConf[] = "thp:always,metadata_thp:always";

// The allocator of this process, for the start-up line: "jemalloc 5.3.0" when the daemon was
// linked with it (CMake GS_JEMALLOC, the default), else "default malloc" (glibc's, or a
// sanitizer's).
std::string allocator_name();

struct SupervisorSpec {
  std::string name;
  std::string config_path;
  const server::ServerConfig* server = nullptr;
  std::uint32_t processes = 0;  // 0: one per core
  std::size_t handler_threads = 1;
  std::chrono::milliseconds drain{10000};
  bool metrics_enabled = true;
  metrics::HttpConfig metrics;
  std::vector<std::string> extra_args;  // the daemon's internal flags with their values
  std::vector<int> inherit_fds;
  std::function<Status()> check_reload;
};

// Reserves the port when it is 0, runs the supervisor and prints, once every worker serves,
// "<name>: listening on ADDR:PORT (TLS 1.3|plain TCP), metrics on ADDR:PORT, N worker
// processes x M handler threads". Returns the exit code.
int supervise(const SupervisorSpec& spec);

}  // namespace gs::daemon
