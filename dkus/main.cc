// gridseal-dkusd: the Decryption and Key Update Server. The process started by the operator (or
// systemd) is the supervisor: it validates the configuration and starts server.processes
// workers (this same binary with --worker), each with its own HSM sessions, SQLite connections,
// replay-state writer and listening socket on the shared port.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <utility>

#include "dkus/dkus_config.h"
#include "dkus/dkus_service.h"
#include "src/hsm_context.h"
#include "src/metrics.h"
#include "src/server.h"
#include "src/supervisor.h"

namespace {

void usage() {
  std::fprintf(stderr,
               "usage: gridseal-dkusd --config <dkus.toml> [--check]\n"
               "  --check  validate the configuration, open the HSM and store, exit\n");
}

int fail(const std::string& what) {
  std::fprintf(stderr, "gridseal-dkusd: %s\n", what.c_str());
  return 1;
}

struct Args {
  std::string config;
  bool check = false;
  // Internal: set by the supervisor for its workers.
  int worker = -1;
  int control_fd = -1;
  int port = -1;
  long long started_at = -1;
};

bool parse_ll(const std::string& s, long long lo, long long hi, long long& out) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || v < lo || v > hi) return false;
  out = v;
  return true;
}

bool parse_int(const std::string& s, int lo, int hi, int& out) {
  long long v = 0;
  if (!parse_ll(s, lo, hi, v)) return false;
  out = static_cast<int>(v);
  return true;
}

std::uint32_t utc_now() {
  return static_cast<std::uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// 0: ok, else the exit code (-1: help printed).
int parse_args(int argc, char** argv, Args& a) {
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    const bool has_value = i + 1 < argc;
    if (s == "--config" && has_value) {
      a.config = argv[++i];
    } else if (s.rfind("--config=", 0) == 0) {
      a.config = s.substr(9);
    } else if (s == "--check") {
      a.check = true;
    } else if (s == "--worker" && has_value && parse_int(argv[i + 1], 0, 1023, a.worker)) {
      ++i;
    } else if (s == "--control-fd" && has_value &&
               parse_int(argv[i + 1], 3, 1 << 20, a.control_fd)) {
      ++i;
    } else if (s == "--port" && has_value && parse_int(argv[i + 1], 1, 65535, a.port)) {
      ++i;
    } else if (s == "--started-at" && has_value &&
               parse_ll(argv[i + 1], 0, 0xFFFFFFFFLL, a.started_at)) {
      ++i;
    } else if (s == "-h" || s == "--help") {
      usage();
      return -1;
    } else {
      usage();
      return 2;
    }
  }
  if (a.config.empty()) {
    usage();
    return 2;
  }
  if (a.worker >= 0 && (a.control_fd < 0 || a.port < 0 || a.started_at < 0)) {
    std::fprintf(stderr, "gridseal-dkusd: --worker is internal (started by the supervisor)\n");
    return 2;
  }
  return 0;
}


// --check: everything a worker opens, in this process, then exit.
int check(const gs::dkus::DkusConfig& cfg) {
  auto hsm = gs::open_hsm(cfg.base.hsm);
  if (!hsm.ok()) return fail(hsm.error().message());
  gs::metrics::Registry registry;
  auto service = gs::dkus::DkusService::create(cfg, *hsm, registry, 1, utc_now());
  if (!service.ok()) return fail(service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return fail(st.error().message());
  std::printf("gridseal-dkusd: configuration ok\n");
  return 0;
}

int run_worker(gs::dkus::DkusConfig cfg, const Args& a) {
  ::unsetenv("NOTIFY_SOCKET");  // only the supervisor talks to systemd
  sigset_t sigs;
  sigemptyset(&sigs);
  for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&sigs, s);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  const std::string me = "worker " + std::to_string(a.worker);
  gs::supervisor::WorkerLink link(a.control_fd);
  cfg.server.port = static_cast<std::uint16_t>(a.port);
  cfg.server.reuse_port = true;

  const std::size_t threads = gs::dkus::handler_threads(cfg);
  gs::config::HsmConfig hcfg = cfg.base.hsm;
  if (hcfg.sessions < threads) hcfg.sessions = static_cast<std::uint32_t>(threads);
  // A module can refuse transiently while another process initialises it (SoftHSM2 file store).
  auto hsm = gs::open_hsm(hcfg);
  for (int attempt = 1; !hsm.ok() && attempt < 5; ++attempt) {
    const gs::Errc e = hsm.error().code;
    if (e != gs::Errc::crypto_failure && e != gs::Errc::hsm_failure && e != gs::Errc::busy) break;
    std::fprintf(stderr, "gridseal-dkusd: %s: HSM not ready (%s), retrying\n", me.c_str(),
                 hsm.error().message().c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(200 * attempt));
    hsm = gs::open_hsm(hcfg);
  }
  if (!hsm.ok()) return fail(me + ": " + hsm.error().message());

  gs::metrics::Registry registry;
  auto service = gs::dkus::DkusService::create(cfg, *hsm, registry, threads,
                                               static_cast<std::uint32_t>(a.started_at));
  if (!service.ok()) return fail(me + ": " + service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return fail(me + ": " + st.error().message());
  gs::dkus::DkusService* svc = service->get();
  svc->start();

  gs::server::Handler handler = [svc](const gs::server::RequestContext& ctx, gs::Bytes request,
                                      gs::server::Done done) {
    svc->handle(ctx, std::move(request), std::move(done));
  };
  auto server = gs::server::Server::create(cfg.server, std::move(handler), {}, &registry);
  if (!server.ok()) return fail(me + ": " + server.error().message());
  if (auto st = (*server)->start(); !st.ok()) return fail(me + ": " + st.error().message());

  const pid_t self = ::getpid();
  link.serve([&registry] { return registry.expose(); }, [svc] { return svc->health(); },
             [self] { ::kill(self, SIGTERM); });  // supervisor gone: drain and exit
  if (auto st = link.ready(); !st.ok()) {
    (*server)->stop();
    return fail(me + ": " + st.error().message());
  }

  for (;;) {
    int sig = 0;
    if (sigwait(&sigs, &sig) != 0) continue;
    if (sig != SIGHUP) break;
    // Nothing to reload yet: meter and key state are read from the store (meter_cache_ttl_ms).
    std::fprintf(stderr, "gridseal-dkusd: %s: SIGHUP: nothing to reload\n", me.c_str());
  }
  // Drain: answers in flight wait for their commit, so the writer stops only after the server.
  (*server)->shutdown(cfg.drain);
  (*server)->wait();
  svc->stop();
  link.stop();
  return 0;
}

int run_supervisor(const gs::dkus::DkusConfig& cfg, const std::string& config_path) {
  std::size_t processes = cfg.processes;
  if (processes == 0) processes = std::max(1U, std::thread::hardware_concurrency());

  int reserve_fd = -1;
  std::uint16_t port = cfg.server.port;
  if (port == 0) {
    port = gs::supervisor::reserve_port(cfg.server.address, reserve_fd);
    if (port == 0) return fail("cannot reserve a port on " + cfg.server.address);
  }

  gs::supervisor::Options o;
  o.name = "gridseal-dkusd";
  o.processes = processes;
  // Every worker (also one restarted later) refuses messages sealed before this instant when
  // dkus.refuse_sealed_before_start is set (DESIGN §5).
  o.worker_args = {"--config", std::filesystem::absolute(config_path).string(), "--port",
                   std::to_string(port), "--started-at", std::to_string(utc_now())};
  o.drain = cfg.drain;
  o.metrics_enabled = cfg.metrics_enabled;
  o.metrics = cfg.metrics;
  o.on_ready = [&cfg, port, processes](std::uint16_t metrics_port) {
    std::printf("gridseal-dkusd: listening on %s:%u (%s), metrics on %s:%u, %zu worker processes "
                "x %zu handler threads\n",
                cfg.server.address.c_str(), static_cast<unsigned>(port),
                cfg.server.plain_tcp ? "plain TCP" : "TLS 1.3", cfg.metrics.address.c_str(),
                static_cast<unsigned>(metrics_port), processes, gs::dkus::handler_threads(cfg));
    std::fflush(stdout);
  };
  const int rc = gs::supervisor::run(o);
  if (reserve_fd >= 0) ::close(reserve_fd);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (int rc = parse_args(argc, argv, a); rc != 0) return rc < 0 ? 0 : rc;

  auto cfg = gs::dkus::load_dkus_config(a.config);
  if (!cfg.ok()) return fail(cfg.error().message());

  if (a.check) return check(*cfg);
  if (a.worker >= 0) return run_worker(std::move(cfg).value(), a);
  signal(SIGPIPE, SIG_IGN);
  return run_supervisor(*cfg, a.config);
}
