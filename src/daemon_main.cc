// Shared main() pieces of gridseal-sesd and gridseal-dkusd: see daemon_main.h.
#include "src/daemon_main.h"

#include <dlfcn.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>
#include <utility>

#include "gridseal/thread_name.h"
#include "src/audit.h"
#include "src/sqlite.h"

namespace gs::daemon {

namespace {

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

sigset_t daemon_signals() {
  sigset_t sigs;
  sigemptyset(&sigs);
  for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&sigs, s);
  return sigs;
}

}  // namespace

Status check_audit_trail(const std::string& name, const std::string& store_path, HsmContext& hsm) {
  auto db = db::Db::open(store_path, {.create = false});
  if (!db.ok()) return std::move(db).error();
  auto found = audit::check_store(*db, hsm);
  if (!found.ok()) return Error(found.error().code, "audit trail: " + found.error().message());
  if (!found->ok()) return Error(Errc::conflict, "audit trail check failed: " + found->message);
  std::printf("%s: audit trail %s: %s\n", name.c_str(), audit::anchor_state_name(found->state),
              found->message.c_str());
  return {};
}

int fail(const std::string& name, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", name.c_str(), what.c_str());
  return 1;
}

int parse_args(int argc, char** argv, const std::string& name, const char* usage,
               const std::vector<IntFlag>& extra, Args& a) {
  a.extra.assign(extra.size(), -1);
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    const bool has_value = i + 1 < argc;
    bool taken = false;
    if (s == "--config" && has_value) {
      a.config = argv[++i];
      taken = true;
    } else if (s.rfind("--config=", 0) == 0) {
      a.config = s.substr(9);
      taken = true;
    } else if (s == "--check") {
      a.check = true;
      taken = true;
    } else if (s == "-h" || s == "--help") {
      std::fputs(usage, stderr);
      return -1;
    } else if (has_value) {
      if (s == "--worker") taken = parse_int(argv[i + 1], 0, 1023, a.worker);
      if (s == "--control-fd") taken = parse_int(argv[i + 1], 3, 1 << 20, a.control_fd);
      if (s == "--port") taken = parse_int(argv[i + 1], 1, 65535, a.port);
      if (s == "--balance-fd") taken = parse_int(argv[i + 1], 3, 1 << 20, a.balance_fd);
      for (std::size_t k = 0; k < extra.size() && !taken; ++k) {
        if (s == extra[k].name) taken = parse_ll(argv[i + 1], extra[k].lo, extra[k].hi, a.extra[k]);
      }
      if (taken) ++i;
    }
    if (!taken) {
      std::fputs(usage, stderr);
      return 2;
    }
  }
  if (a.config.empty()) {
    std::fputs(usage, stderr);
    return 2;
  }
  if (a.worker >= 0) {
    bool complete = a.control_fd >= 0 && a.port >= 0;
    for (long long v : a.extra) complete = complete && v >= 0;
    if (!complete) {
      std::fprintf(stderr, "%s: --worker is internal (started by the supervisor)\n",
                   name.c_str());
      return 2;
    }
  }
  return 0;
}

Result<HsmContext> open_worker_hsm(config::HsmConfig cfg, std::size_t threads,
                                   const std::string& who) {
  if (cfg.sessions < threads) cfg.sessions = static_cast<std::uint32_t>(threads);
  auto hsm = open_hsm(cfg);
  for (int attempt = 1; !hsm.ok() && attempt < 5; ++attempt) {
    const Errc e = hsm.error().code;
    if (e != Errc::crypto_failure && e != Errc::hsm_failure && e != Errc::busy) break;
    std::fprintf(stderr, "%s: HSM not ready (%s), retrying\n", who.c_str(),
                 hsm.error().message().c_str());
    std::this_thread::sleep_for(std::chrono::milliseconds(200 * attempt));
    hsm = open_hsm(cfg);
  }
  return hsm;
}

std::string allocator_name() {
  using Mallctl = int (*)(const char*, void*, std::size_t*, void*, std::size_t);
  auto* mallctl = reinterpret_cast<Mallctl>(::dlsym(RTLD_DEFAULT, "mallctl"));
  if (mallctl == nullptr) return "default malloc";
  const char* version = nullptr;
  std::size_t len = sizeof version;
  if (mallctl("version", static_cast<void*>(&version), &len, nullptr, 0) != 0 ||
      version == nullptr) {
    return "jemalloc";
  }
  const std::string v(version);
  return "jemalloc " + v.substr(0, v.find('-'));
}

void block_worker_signals() {
  ::unsetenv("NOTIFY_SOCKET");  // only the supervisor talks to systemd
  sigset_t sigs = daemon_signals();
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

int serve_worker(WorkerSpec spec) {
  const std::string me = spec.name + ": worker " + std::to_string(spec.worker);
  {
    // Started through /proc/self/exe, a worker would show as "exe" in ps and top.
    std::string short_name = spec.name.rfind("gridseal-", 0) == 0 ? spec.name.substr(9) : spec.name;
    short_name = (short_name + "-worker-" + std::to_string(spec.worker)).substr(0, 15);
    name_this_thread(short_name.c_str());
  }
  supervisor::WorkerLink link(spec.control_fd);
  spec.server.reuse_port = true;
  if (spec.balance_fd >= 0) {
    auto b = server::Balancer::attach(spec.balance_fd, static_cast<std::size_t>(spec.worker));
    if (!b.ok()) return fail(me, b.error().message());
    spec.server.balancer = *b;
  }
  auto server = server::Server::create(spec.server, std::move(spec.handler), {}, spec.registry);
  if (!server.ok()) return fail(me, server.error().message());
  if (auto st = (*server)->start(); !st.ok()) return fail(me, st.error().message());

  const pid_t self = ::getpid();
  metrics::Registry* registry = spec.registry;
  link.serve([registry] { return registry != nullptr ? registry->expose() : std::string(); },
             spec.health, [self] { ::kill(self, SIGTERM); });  // supervisor gone: drain, exit
  if (auto st = link.ready(); !st.ok()) {
    (*server)->stop();
    return fail(me, st.error().message());
  }

  sigset_t sigs = daemon_signals();
  for (;;) {
    int sig = 0;
    if (sigwait(&sigs, &sig) != 0) continue;
    if (sig != SIGHUP) break;
    if (spec.on_sighup) {
      spec.on_sighup();
    } else {
      std::fprintf(stderr, "%s: SIGHUP: nothing to reload\n", me.c_str());
    }
  }
  (*server)->shutdown(spec.drain);
  (*server)->wait();
  link.stop();
  return 0;
}

int supervise(const SupervisorSpec& spec) {
  const server::ServerConfig& srv = *spec.server;
  std::size_t processes = spec.processes;
  if (processes == 0) processes = std::max(1U, std::thread::hardware_concurrency());

  int reserve_fd = -1;
  std::uint16_t port = srv.port;
  if (port == 0) {
    port = supervisor::reserve_port(srv.address, reserve_fd);
    if (port == 0) return fail(spec.name, "cannot reserve a port on " + srv.address);
  }

  supervisor::Options o;
  o.name = spec.name;
  o.processes = processes;
  o.worker_args = {"--config", std::filesystem::absolute(spec.config_path).string(), "--port",
                   std::to_string(port)};
  o.worker_args.insert(o.worker_args.end(), spec.extra_args.begin(), spec.extra_args.end());
  o.inherit_fds = spec.inherit_fds;
  std::shared_ptr<server::Balancer> balancer;
  if (processes > 1 && srv.balance_connections) {
    auto b = server::Balancer::create(processes);
    if (!b.ok()) return fail(spec.name, b.error().message());
    balancer = *b;
    o.worker_args.push_back("--balance-fd");
    o.worker_args.push_back(std::to_string(balancer->fd()));
    for (int fd : balancer->inherit_fds()) o.inherit_fds.push_back(fd);
    o.on_worker_exit = [balancer](std::size_t index) { balancer->worker_gone(index); };
  }
  o.worker_env_defaults = {{"GLIBC_TUNABLES", kWorkerGlibcTunables},
                           {"MALLOC_CONF", kWorkerMallocConf}};
  o.drain = spec.drain;
  o.metrics_enabled = spec.metrics_enabled;
  o.metrics = spec.metrics;
  o.check_reload = spec.check_reload;
  o.on_ready = [&spec, &srv, port, processes](std::uint16_t metrics_port) {
    std::printf("%s: listening on %s:%u (%s), metrics on %s:%u, %zu worker processes x %zu "
                "handler threads, %s\n",
                spec.name.c_str(), srv.address.c_str(), static_cast<unsigned>(port),
                srv.plain_tcp ? "plain TCP" : "TLS 1.3", spec.metrics.address.c_str(),
                static_cast<unsigned>(metrics_port), processes, spec.handler_threads,
                allocator_name().c_str());
    std::fflush(stdout);
  };
  signal(SIGPIPE, SIG_IGN);
  const int rc = supervisor::run(o);
  if (reserve_fd >= 0) ::close(reserve_fd);
  return rc;
}

}  // namespace gs::daemon
