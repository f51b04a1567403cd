// gridseal-sesd: the Signing and Encryption Server. The process started by the operator (or
// systemd) is the supervisor: it validates the configuration and policy, creates the shared
// rate-limit memory and starts server.processes workers (this same binary with --worker), each
// with its own HSM sessions, SQLite connections and listening socket on the shared port.
#include <unistd.h>

#include <cstdio>
#include <string>
#include <utility>

#include "ses/ses_config.h"
#include "ses/ses_service.h"
#include "src/audit.h"
#include "src/command_keys.h"
#include "src/daemon_main.h"
#include "src/key_store.h"
#include "src/policy.h"
#include "src/policy_record.h"

namespace {

const std::string kName = "gridseal-sesd";
constexpr const char* kUsage =
    "usage: gridseal-sesd --config <ses.toml> [--check]\n"
    "  --check  validate the configuration and policy, open the HSM and store, exit\n";
// Internal worker flag: the memfd of the shared rate-limit buckets.
const std::vector<gs::daemon::IntFlag> kWorkerFlags = {{"--limiter-fd", 3, 1 << 20}};

int fail(const std::string& what) { return gs::daemon::fail(kName, what); }

std::string hex(const gs::Sha256Digest& d) { return gs::to_hex(gs::ByteView(d.data(), d.size())); }

// Reads the policy file once (the bytes hashed are the bytes parsed) and, under [policy]
// ses.require_approved_policy, checks that it is the newest policy applied with
// `gridseal policy apply`.
// `who` prefixes the bootstrap warning (none applied yet), printed when `warn`.
gs::Result<gs::policy::PolicyFile> load_approved_policy(const gs::ses::SesConfig& cfg,
                                                        const std::string& who, bool warn) {
  GS_ASSIGN(auto pf, gs::policy::read_policy_file(cfg.policy_file, cfg.base_oid));
  if (!cfg.require_approved_policy) return pf;
  auto store = gs::store::KeyStore::open(cfg.base.store.path, {.create = false});
  if (!store.ok()) {
    return gs::Error(store.error().code, "ses.require_approved_policy: cannot read the applied "
                                         "policies: " + store.error().message());
  }
  auto approval = gs::policy::check_approved(store->db(), cfg.policy_file, pf.sha256);
  if (!approval.ok()) {
    return gs::Error(approval.error().code,
                     "policy refused (ses.require_approved_policy): " + approval.error().detail);
  }
  if (*approval == gs::policy::Approval::bootstrap && warn) {
    std::fprintf(stderr,
                 "%s: warning: no policy was ever applied, so %s (sha256 %s) is served "
                 "unapproved; approve it with `gridseal policy apply %s` (from then on only the "
                 "newest applied policy is served)\n",
                 who.c_str(), cfg.policy_file.c_str(), hex(pf.sha256).c_str(),
                 cfg.policy_file.c_str());
  }
  return pf;
}

// --check: everything a worker opens, in this process, then exit. The audit trail is checked
// against the HSM anchor but not written to.
int check(const gs::ses::SesConfig& cfg, gs::policy::Policy pol) {
  auto hsm = gs::open_hsm(cfg.base.hsm);
  if (!hsm.ok()) return fail(hsm.error().message());
  auto limiter = gs::policy::RateLimiter::create(pol.meter_rate_slots, false);
  if (!limiter.ok()) return fail(limiter.error().message());
  gs::metrics::Registry registry;
  gs::ses::SesConfig no_audit = cfg;
  no_audit.audit.enabled = false;
  auto service = gs::ses::SesService::create(no_audit, *hsm, std::move(pol),
                                             std::move(limiter).value(), registry, 1);
  if (!service.ok()) return fail(service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return fail(st.error().message());
  if (cfg.audit.enabled) {
    if (auto st = gs::daemon::check_audit_trail(kName, cfg.base.store.path, *hsm); !st.ok()) {
      return fail(st.error().message());
    }
  }
  std::printf("gridseal-sesd: configuration ok\n");
  return 0;
}

int run_worker(gs::ses::SesConfig cfg, gs::policy::Policy pol, const gs::daemon::Args& a) {
  gs::daemon::block_worker_signals();
  const std::string me = kName + ": worker " + std::to_string(a.worker);
  auto limiter =
      gs::policy::RateLimiter::attach(static_cast<int>(a.extra[0]), pol.meter_rate_slots);
  if (!limiter.ok()) return gs::daemon::fail(me, limiter.error().message());
  const std::size_t threads = cfg.server.worker_threads;
  // One more session for the audit writer (anchor updates, checkpoint signatures).
  auto hsm = gs::daemon::open_worker_hsm(cfg.base.hsm, threads + (cfg.audit.enabled ? 1 : 0), me);
  if (!hsm.ok()) return gs::daemon::fail(me, hsm.error().message());

  gs::metrics::Registry registry;
  auto service = gs::ses::SesService::create(cfg, *hsm, std::move(pol), std::move(limiter).value(),
                                             registry, threads);
  if (!service.ok()) return gs::daemon::fail(me, service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return gs::daemon::fail(me, st.error().message());
  if (auto st = (*service)->record_start(a.worker); !st.ok()) {
    return gs::daemon::fail(me, "audit start record: " + st.error().message());
  }

  gs::ses::SesService* svc = service->get();
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
  spec.health = [svc] { return svc->health(); };
  gs::metrics::Counter& reload_refused = registry.counter(
      "gridseal_ses_policy_reload_refused_total",
      "SIGHUP policy reloads refused (invalid file, or not the applied policy under "
      "ses.require_approved_policy): the current policy stayed");
  spec.on_sighup = [svc, &cfg, &me, &reload_refused] {
    auto fresh = load_approved_policy(cfg, me, true);
    gs::Status st = fresh.ok() ? svc->reload_policy(std::move(fresh->policy))
                               : gs::Status(fresh.error());
    gs::audit::Detail d;
    if (fresh.ok()) d.add("sha256", hex(fresh->sha256));
    if (st.ok()) {
      std::fprintf(stderr, "%s: policy reloaded from %s (sha256 %s)\n", me.c_str(),
                   cfg.policy_file.c_str(), hex(fresh->sha256).c_str());
    } else {
      reload_refused.inc();
      d.add("reason", gs::audit::clip(st.error().message(), gs::audit::kMaxDetailValue));
      std::fprintf(stderr, "%s: policy not reloaded, the current one stays: %s\n", me.c_str(),
                   st.error().message().c_str());
    }
    gs::Status rec = svc->record_policy(st.ok() ? "policy_reloaded" : "policy_reload_refused",
                                        cfg.policy_file, d.str());
    if (!rec.ok()) {
      std::fprintf(stderr, "%s: audit record of the policy reload: %s\n", me.c_str(),
                   rec.error().message().c_str());
    }
  };
  // Drain first (responses in flight wait for their audit records), then the stop record, the
  // final checkpoint and the sealed anchor.
  const int rc = gs::daemon::serve_worker(std::move(spec));
  svc->record_stop(a.worker);
  return rc;
}

int run_supervisor(const gs::ses::SesConfig& cfg, const gs::policy::Policy& pol,
                   const std::string& config_path) {
  int limiter_fd = -1;
  auto limiter = gs::policy::RateLimiter::create_memfd(pol.meter_rate_slots, &limiter_fd);
  if (!limiter.ok()) return fail(limiter.error().message());

  gs::daemon::SupervisorSpec spec;
  spec.name = kName;
  spec.config_path = config_path;
  spec.server = &cfg.server;
  spec.processes = cfg.processes;
  spec.handler_threads = cfg.server.worker_threads;
  spec.drain = cfg.drain;
  spec.metrics_enabled = cfg.metrics_enabled;
  spec.metrics = cfg.metrics;
  spec.extra_args = {kWorkerFlags[0].name, std::to_string(limiter_fd)};
  spec.inherit_fds = {limiter_fd};
  const std::uint32_t slots = pol.meter_rate_slots;
  spec.check_reload = [&cfg, slots]() -> gs::Status {
    GS_ASSIGN(auto fresh, gs::policy::load_policy(cfg.policy_file, cfg.base_oid));
    if (fresh.meter_rate_slots != slots) {
      return gs::Error(gs::Errc::conflict, "meter_rate_slots changed; restart to apply");
    }
    return {};
  };
  const int rc = gs::daemon::supervise(spec);
  ::close(limiter_fd);
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  gs::daemon::Args a;
  if (int rc = gs::daemon::parse_args(argc, argv, kName, kUsage, kWorkerFlags, a); rc != 0) {
    return rc < 0 ? 0 : rc;
  }
  auto cfg = gs::ses::load_ses_config(a.config);
  if (!cfg.ok()) return fail(cfg.error().message());
  // Every process checks (a worker restarted later reads the file again): an unapproved file
  // never serves, even for a moment.
  auto pf = load_approved_policy(*cfg, kName, a.worker < 0);
  if (!pf.ok()) return fail(pf.error().message());
  gs::policy::Policy pol = std::move(pf->policy);

  if (a.check) return check(*cfg, std::move(pol));
  if (a.worker >= 0) return run_worker(std::move(cfg).value(), std::move(pol), a);
  {
    // Before any worker starts (each checks again in SesService::create): a retired command key,
    // or one MT-2044 statements displaced from both trust slots, never signs.
    auto store = gs::store::KeyStore::open(cfg->base.store.path, {.create = false});
    if (!store.ok()) return fail(cfg->base.store.path + ": " + store.error().message());
    if (auto st = gs::cmdkeys::check_signing_key(store->db(), cfg->command_key_id,
                                                 "ses.command_key");
        !st.ok()) {
      return fail(st.error().message());
    }
  }
  return run_supervisor(*cfg, pol, a.config);
}
