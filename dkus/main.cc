// gridseal-dkusd: the Decryption and Key Update Server. The process started by the operator (or
// systemd) is the supervisor: it validates the configuration and starts server.processes
// workers (this same binary with --worker), each with its own HSM sessions, SQLite connections,
// replay-state writer and listening socket on the shared port. Worker 0 also runs the key-rollover
// engine when [rollover] enabled is set (dkus/rollover_engine.h).
#include <cstdio>
#include <memory>
#include <string>
#include <utility>

#include "dkus/dkus_config.h"
#include "dkus/dkus_service.h"
#include "dkus/rollover_engine.h"
#include "src/audit.h"
#include "src/daemon_main.h"
#include "src/sqlite.h"

namespace {

const std::string kName = "gridseal-dkusd";
constexpr const char* kUsage =
    "usage: gridseal-dkusd --config <dkus.toml> [--check]\n"
    "  --check  validate the configuration, open the HSM and store, exit\n";
// Internal worker flag: the supervisor's start time (UTC seconds), for
// dkus.refuse_sealed_before_start.
const std::vector<gs::daemon::IntFlag> kWorkerFlags = {{"--started-at", 0, 0xFFFFFFFFLL}};

int fail(const std::string& what) { return gs::daemon::fail(kName, what); }

// --check: everything a worker opens, in this process, then exit. The audit trail is checked
// against the HSM anchor but not written to.
int check(const gs::dkus::DkusConfig& cfg) {
  auto hsm = gs::open_hsm(cfg.base.hsm);
  if (!hsm.ok()) return fail(hsm.error().message());
  gs::metrics::Registry registry;
  gs::dkus::DkusConfig no_audit = cfg;
  no_audit.audit.enabled = false;
  auto service = gs::dkus::DkusService::create(no_audit, *hsm, registry, 1, gs::utc_now());
  if (!service.ok()) return fail(service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return fail(st.error().message());
  if (cfg.audit.enabled) {
    if (auto st = gs::daemon::check_audit_trail(kName, cfg.base.store.path, *hsm); !st.ok()) {
      return fail(st.error().message());
    }
  }
  if (cfg.rollover.enabled) {
    auto engine = gs::dkus::RolloverEngine::create(cfg, *hsm, registry);
    if (!engine.ok()) return fail(engine.error().message());
    if (auto st = (*engine)->warm_up(); !st.ok()) return fail("rollover: " + st.error().message());
  }
  std::printf("gridseal-dkusd: configuration ok\n");
  return 0;
}

int run_worker(const gs::dkus::DkusConfig& cfg, const gs::daemon::Args& a) {
  gs::daemon::block_worker_signals();
  const std::string me = kName + ": worker " + std::to_string(a.worker);
  const std::size_t threads = gs::dkus::handler_threads(cfg);
  // The rollover engine runs in exactly one process, worker 0, with a session of its own.
  const bool rollover_here = cfg.rollover.enabled && a.worker == 0;
  // One more session for the audit writer (anchor updates, checkpoint signatures), which the
  // replay-state writer borrows for the batches that record receipts.
  auto hsm = gs::daemon::open_worker_hsm(
      cfg.base.hsm, threads + (rollover_here ? 1 : 0) + (cfg.audit.enabled ? 1 : 0), me);
  if (!hsm.ok()) return gs::daemon::fail(me, hsm.error().message());

  gs::metrics::Registry registry;
  auto service = gs::dkus::DkusService::create(cfg, *hsm, registry, threads,
                                               static_cast<std::uint32_t>(a.extra[0]));
  if (!service.ok()) return gs::daemon::fail(me, service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return gs::daemon::fail(me, st.error().message());
  if (auto st = (*service)->record_start(a.worker); !st.ok()) {
    return gs::daemon::fail(me, "audit start record: " + st.error().message());
  }
  std::unique_ptr<gs::dkus::RolloverEngine> engine;
  if (rollover_here) {
    auto e = gs::dkus::RolloverEngine::create(cfg, *hsm, registry);
    if (!e.ok()) return gs::daemon::fail(me, e.error().message());
    if (auto st = (*e)->warm_up(); !st.ok()) {
      return gs::daemon::fail(me, "rollover: " + st.error().message());
    }
    engine = std::move(e).value();
  }
  gs::dkus::DkusService* svc = service->get();
  svc->start();
  if (engine) engine->start();

  gs::daemon::WorkerSpec spec;
  spec.name = kName;
  spec.worker = a.worker;
  spec.control_fd = a.control_fd;
  spec.balance_fd = a.balance_fd;
  spec.server = cfg.server;
  spec.server.port = static_cast<std::uint16_t>(a.port);
  spec.drain = cfg.drain;
  spec.handler = [svc](const gs::server::RequestContext& ctx, gs::Bytes request,
                       gs::server::Done done) {
    svc->handle(ctx, std::move(request), std::move(done));
  };
  spec.registry = &registry;
  spec.health = [svc, eng = engine.get()] {
    gs::metrics::Health h = svc->health();
    if (h.ok && eng != nullptr) h = eng->health();
    return h;
  };
  // SIGHUP: nothing to reload yet (meter and key state are read from the store).
  // Drain: answers in flight wait for their commit, so the writer stops only after the server.
  const int rc = gs::daemon::serve_worker(std::move(spec));
  if (engine) engine->stop();  // its answers in flight come back at most answer_timeout_ms late
  svc->stop();
  // Then the stop record, the final checkpoint and the sealed anchor.
  svc->record_stop(a.worker);
  return rc;
}

int run_supervisor(const gs::dkus::DkusConfig& cfg, const std::string& config_path) {
  gs::daemon::SupervisorSpec spec;
  spec.name = kName;
  spec.config_path = config_path;
  spec.server = &cfg.server;
  spec.processes = cfg.processes;
  spec.handler_threads = gs::dkus::handler_threads(cfg);
  spec.drain = cfg.drain;
  spec.metrics_enabled = cfg.metrics_enabled;
  spec.metrics = cfg.metrics;
  // Every worker (also one restarted later) refuses messages sealed before this instant when
  // dkus.refuse_sealed_before_start is set (DESIGN §5).
  spec.extra_args = {kWorkerFlags[0].name, std::to_string(gs::utc_now())};
  return gs::daemon::supervise(spec);
}

}  // namespace

int main(int argc, char** argv) {
  gs::daemon::Args a;
  if (int rc = gs::daemon::parse_args(argc, argv, kName, kUsage, kWorkerFlags, a); rc != 0) {
    return rc < 0 ? 0 : rc;
  }
  auto cfg = gs::dkus::load_dkus_config(a.config);
  if (!cfg.ok()) return fail(cfg.error().message());
  if (a.check) return check(*cfg);
  if (a.worker >= 0) return run_worker(*cfg, a);
  return run_supervisor(*cfg, a.config);
}
