// The process model both daemons share: a supervisor that starts N worker processes (fork and
// exec of the daemon's own binary, so no PKCS#11 or SQLite state ever crosses a fork), restarts
// any that dies, forwards SIGHUP and SIGTERM, serves /metrics (every worker's metrics merged,
// one `worker` label each) and /healthz, and reports to systemd (READY, STOPPING, WATCHDOG).
//
// Workers share the listening port with SO_REUSEPORT; each one has its own PKCS#11 sessions and
// SQLite connections. A worker talks to its supervisor over a socketpair given by
// `--control-fd`: one "ready" message, then answers to metrics and health queries.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gridseal/result.h"
#include "src/metrics.h"

namespace gs::supervisor {

struct Options {
  std::string name = "gridseal";  // log prefix: "<name>: worker 1 (pid 42) ..."
  std::size_t processes = 2;      // worker processes, >= 1
  std::string exe = "/proc/self/exe";  // what is executed (the running binary by default)
  std::string argv0;                   // workers' argv[0]; empty: the resolved path of exe
  // Arguments after argv[0] for every worker; the supervisor appends
  // `--worker <index> --control-fd <fd>`.
  std::vector<std::string> worker_args;
  std::vector<int> inherit_fds;  // stay open (same numbers) in every worker
  // Environment variables every worker gets unless the supervisor's own environment already
  // has the name (what the operator set wins): name, value.
  std::vector<std::pair<std::string, std::string>> worker_env_defaults;
  std::chrono::milliseconds drain{10000};  // SIGTERM: workers get this long, plus 5 s, then KILL
  std::chrono::milliseconds ready_timeout{120000};  // a starting worker must report ready
  std::chrono::milliseconds health_interval{2000};  // health query to every ready worker
  std::chrono::milliseconds hang_timeout{30000};  // no health answer for this long: KILL
  bool metrics_enabled = true;
  metrics::HttpConfig metrics;
  // SIGHUP: runs in the supervisor first (e.g. parses the new policy file); the workers get
  // SIGHUP only when it returns ok. Empty: always forwarded.
  std::function<Status()> check_reload;
  // After a worker process is reaped (its index), before its replacement starts.
  std::function<void(std::size_t index)> on_worker_exit;
  // Once, when every worker has reported ready for the first time (metrics port or 0).
  std::function<void(std::uint16_t metrics_port)> on_ready;
};

// Runs until SIGTERM/SIGINT (returns 0 once the workers stopped) or a start-up failure: a worker
// that exits or misses ready_timeout before all workers were first ready (returns 1). Later
// deaths are logged and the worker is restarted (at once when it ran for 10 s or more, else
// after a backoff doubling from 250 ms to 30 s). Blocks SIGCHLD/SIGTERM/SIGINT/SIGHUP in the
// calling thread; call it from the main thread before other threads exist.
int run(const Options& options);

// Worker side of the control channel.
class WorkerLink {
 public:
  explicit WorkerLink(int fd);
  ~WorkerLink();  // stop()
  WorkerLink(const WorkerLink&) = delete;
  WorkerLink& operator=(const WorkerLink&) = delete;

  // Starts the thread that answers the supervisor's metrics and health queries. on_lost runs
  // once on that thread when the supervisor is gone (the channel closed).
  void serve(std::function<std::string()> metrics, std::function<metrics::Health()> health,
             std::function<void()> on_lost);
  // Tells the supervisor this worker is serving requests.
  Status ready();
  // Closes the channel and joins the thread. Idempotent.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// For port 0: binds a socket (SO_REUSEADDR + SO_REUSEPORT, not listening) on `address` and a
// free port that every worker then binds too; the socket holds the port while the supervisor
// runs. Returns the port and sets fd_out, or 0 on failure.
std::uint16_t reserve_port(const std::string& address, int& fd_out);

// A worker's environment: `base` (a null-terminated array of "NAME=value", e.g. ::environ)
// plus each of `defaults` whose name it does not have, in that order.
std::vector<std::string> worker_environment(
    const char* const* base,
    const std::vector<std::pair<std::string, std::string>>& defaults);

// Prometheus text expositions merged into one: families once (HELP/TYPE from the first part that
// has them, sorted by name), every sample of part i with label `label`="<parts[i].first>" added
// (no label added when parts[i].first is empty).
std::string merge_expositions(const std::vector<std::pair<std::string, std::string>>& parts,
                              const std::string& label);

}  // namespace gs::supervisor
