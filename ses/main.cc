// gridseal-sesd: the Signing and Encryption Server. The process started by the operator (or
// systemd) is the supervisor: it validates the configuration and policy, creates the shared
// rate-limit memory and starts server.processes workers (this same binary with --worker), each
// with its own HSM sessions, SQLite connections and listening socket on the shared port.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <utility>

#include "ses/ses_config.h"
#include "ses/ses_service.h"
#include "src/hsm_context.h"
#include "src/metrics.h"
#include "src/policy.h"
#include "src/server.h"
#include "src/supervisor.h"

namespace {

void usage() {
  std::fprintf(stderr,
               "usage: gridseal-sesd --config <ses.toml> [--check]\n"
               "  --check  validate the configuration and policy, open the HSM and store, exit\n");
}

int fail(const std::string& what) {
  std::fprintf(stderr, "gridseal-sesd: %s\n", what.c_str());
  return 1;
}

struct Args {
  std::string config;
  bool check = false;
  // Internal: set by the supervisor for its workers.
  int worker = -1;
  int control_fd = -1;
  int limiter_fd = -1;
  int port = -1;
};

bool parse_int(const std::string& s, int lo, int hi, int& out) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || v < lo || v > hi) return false;
  out = static_cast<int>(v);
  return true;
}

// 0: ok, else the exit code.
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
    } else if (s == "--limiter-fd" && has_value &&
               parse_int(argv[i + 1], 3, 1 << 20, a.limiter_fd)) {
      ++i;
    } else if (s == "--port" && has_value && parse_int(argv[i + 1], 1, 65535, a.port)) {
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
  const bool worker = a.worker >= 0;
  if (worker && (a.control_fd < 0 || a.limiter_fd < 0 || a.port < 0)) {
    std::fprintf(stderr, "gridseal-sesd: --worker is internal (started by the supervisor)\n");
    return 2;
  }
  return 0;
}

// --check: everything a worker opens, in this process, then exit.
int check(const gs::ses::SesConfig& cfg, gs::policy::Policy pol) {
  gs::config::HsmConfig hcfg = cfg.base.hsm;
  auto hsm = gs::open_hsm(hcfg);
  if (!hsm.ok()) return fail(hsm.error().message());
  auto limiter = gs::policy::RateLimiter::create(pol.meter_rate_slots, false);
  if (!limiter.ok()) return fail(limiter.error().message());
  gs::metrics::Registry registry;
  auto service = gs::ses::SesService::create(cfg, *hsm, std::move(pol), std::move(limiter).value(),
                                             registry, 1);
  if (!service.ok()) return fail(service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return fail(st.error().message());
  std::printf("gridseal-sesd: configuration ok\n");
  return 0;
}

int run_worker(gs::ses::SesConfig cfg, gs::policy::Policy pol, const Args& a) {
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
  auto limiter = gs::policy::RateLimiter::attach(a.limiter_fd, pol.meter_rate_slots);
  if (!limiter.ok()) return fail(me + ": " + limiter.error().message());

  const std::size_t threads = cfg.server.worker_threads;
  gs::config::HsmConfig hcfg = cfg.base.hsm;
  if (hcfg.sessions < threads) hcfg.sessions = static_cast<std::uint32_t>(threads);
  // A module can refuse transiently while another process initialises it (SoftHSM2 file store).
  auto hsm = gs::open_hsm(hcfg);
  for (int attempt = 1; !hsm.ok() && attempt < 5; ++attempt) {
    const gs::Errc e = hsm.error().code;
    if (e != gs::Errc::crypto_failure && e != gs::Errc::hsm_failure && e != gs::Errc::busy) break;
    std::fprintf(stderr, "gridseal-sesd: %s: HSM not ready (%s), retrying\n", me.c_str(),
                 hsm.error().message().c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(200 * attempt));
    hsm = gs::open_hsm(hcfg);
  }
  if (!hsm.ok()) return fail(me + ": " + hsm.error().message());

  gs::metrics::Registry registry;
  auto service = gs::ses::SesService::create(cfg, *hsm, std::move(pol), std::move(limiter).value(),
                                             registry, threads);
  if (!service.ok()) return fail(me + ": " + service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return fail(me + ": " + st.error().message());

  gs::ses::SesService* svc = service->get();
  auto handler = gs::server::make_handler(
      [svc](const gs::server::RequestContext& ctx, gs::Bytes request) {
        return svc->handle(ctx, request);
      });
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
    auto fresh = gs::policy::load_policy(cfg.policy_file, cfg.base_oid);
    gs::Status st = fresh.ok() ? svc->reload_policy(std::move(fresh).value())
                               : gs::Status(fresh.error());
    if (st.ok()) {
      std::fprintf(stderr, "gridseal-sesd: %s: policy reloaded from %s\n", me.c_str(),
                   cfg.policy_file.c_str());
    } else {
      std::fprintf(stderr, "gridseal-sesd: %s: policy not reloaded, the current one stays: %s\n",
                   me.c_str(), st.error().message().c_str());
    }
  }
  (*server)->shutdown(cfg.drain);
  (*server)->wait();
  link.stop();
  return 0;
}

int run_supervisor(const gs::ses::SesConfig& cfg, const gs::policy::Policy& pol,
                   const std::string& config_path) {
  std::size_t processes = cfg.processes;
  if (processes == 0) processes = std::max(1U, std::thread::hardware_concurrency());

  int limiter_fd = -1;
  auto limiter = gs::policy::RateLimiter::create_memfd(pol.meter_rate_slots, &limiter_fd);
  if (!limiter.ok()) return fail(limiter.error().message());

  int reserve_fd = -1;
  std::uint16_t port = cfg.server.port;
  if (port == 0) {
    port = gs::supervisor::reserve_port(cfg.server.address, reserve_fd);
    if (port == 0) return fail("cannot reserve a port on " + cfg.server.address);
  }

  gs::supervisor::Options o;
  o.name = "gridseal-sesd";
  o.processes = processes;
  o.worker_args = {"--config", std::filesystem::absolute(config_path).string(), "--limiter-fd",
                   std::to_string(limiter_fd), "--port", std::to_string(port)};
  o.inherit_fds = {limiter_fd};
  o.drain = cfg.drain;
  o.metrics_enabled = cfg.metrics_enabled;
  o.metrics = cfg.metrics;
  const std::uint32_t slots = pol.meter_rate_slots;
  o.check_reload = [&cfg, slots]() -> gs::Status {
    GS_ASSIGN(auto fresh, gs::policy::load_policy(cfg.policy_file, cfg.base_oid));
    if (fresh.meter_rate_slots != slots) {
      return gs::Error(gs::Errc::conflict, "meter_rate_slots changed; restart to apply");
    }
    return {};
  };
  o.on_ready = [&cfg, port, processes](std::uint16_t metrics_port) {
    std::printf("gridseal-sesd: listening on %s:%u (%s), metrics on %s:%u, %zu worker processes x "
                "%zu handler threads\n",
                cfg.server.address.c_str(), static_cast<unsigned>(port),
                cfg.server.plain_tcp ? "plain TCP" : "TLS 1.3", cfg.metrics.address.c_str(),
                static_cast<unsigned>(metrics_port), processes, cfg.server.worker_threads);
    std::fflush(stdout);
  };
  const int rc = gs::supervisor::run(o);
  if (reserve_fd >= 0) ::close(reserve_fd);
  ::close(limiter_fd);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  if (int rc = parse_args(argc, argv, a); rc != 0) return rc < 0 ? 0 : rc;

  auto cfg = gs::ses::load_ses_config(a.config);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto pol = gs::policy::load_policy(cfg->policy_file, cfg->base_oid);
  if (!pol.ok()) return fail(pol.error().message());

  if (a.check) return check(*cfg, std::move(pol).value());
  if (a.worker >= 0) return run_worker(std::move(cfg).value(), std::move(pol).value(), a);
  signal(SIGPIPE, SIG_IGN);
  return run_supervisor(*cfg, *pol, a.config);
}
