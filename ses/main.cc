// gridseal-sesd: the Signing and Encryption Server (single process, several handler threads).
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#ifdef GS_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "ses/ses_config.h"
#include "ses/ses_service.h"
#include "src/hsm_context.h"
#include "src/metrics.h"
#include "src/policy.h"
#include "src/server.h"

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

void notify(const char* state) {
#ifdef GS_HAVE_SYSTEMD
  sd_notify(0, state);
#else
  (void)state;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path;
  bool check_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) {
      config_path = argv[++i];
    } else if (a.rfind("--config=", 0) == 0) {
      config_path = a.substr(9);
    } else if (a == "--check") {
      check_only = true;
    } else if (a == "-h" || a == "--help") {
      usage();
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  if (config_path.empty()) {
    usage();
    return 2;
  }

  // Signals are taken by sigwait in this thread; every thread started later inherits the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto cfg = gs::ses::load_ses_config(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto pol = gs::policy::load_policy(cfg->policy_file, cfg->base_oid);
  if (!pol.ok()) return fail(pol.error().message());

  const std::size_t threads = cfg->server.worker_threads;
  gs::config::HsmConfig hcfg = cfg->base.hsm;
  if (hcfg.sessions < threads) hcfg.sessions = static_cast<std::uint32_t>(threads);
  auto hsm = gs::open_hsm(hcfg);
  if (!hsm.ok()) return fail(hsm.error().message());

  gs::metrics::Registry registry;
  auto service = gs::ses::SesService::create(*cfg, *hsm, std::move(pol).value(), registry, threads);
  if (!service.ok()) return fail(service.error().message());
  if (auto st = (*service)->warm_up(); !st.ok()) return fail(st.error().message());
  if (check_only) {
    std::printf("gridseal-sesd: configuration ok\n");
    return 0;
  }

  gs::ses::SesService* svc = service->get();
  auto handler = gs::server::make_handler(
      [svc](const gs::server::RequestContext& ctx, gs::Bytes request) {
        return svc->handle(ctx, request);
      });
  auto server = gs::server::Server::create(cfg->server, std::move(handler), {}, &registry);
  if (!server.ok()) return fail(server.error().message());
  if (auto st = (*server)->start(); !st.ok()) return fail(st.error().message());

  gs::metrics::HttpEndpoint http(registry, [svc] { return svc->health(); });
  if (cfg->metrics_enabled) {
    if (auto st = http.start(cfg->metrics); !st.ok()) {
      (*server)->stop();
      return fail("metrics: " + st.error().message());
    }
  }
  std::printf("gridseal-sesd: listening on %s:%u (%s), metrics on %s:%u, %zu handler threads\n",
              cfg->server.address.c_str(), static_cast<unsigned>((*server)->port()),
              cfg->server.plain_tcp ? "plain TCP" : "TLS 1.3",
              cfg->metrics.address.c_str(),
              static_cast<unsigned>(cfg->metrics_enabled ? http.port() : 0), threads);
  std::fflush(stdout);
  notify("READY=1");

  for (;;) {
    int sig = 0;
    if (sigwait(&sigs, &sig) != 0) continue;
    if (sig == SIGHUP) {
      std::fprintf(stderr, "gridseal-sesd: SIGHUP: policy reload not implemented yet\n");
      continue;
    }
    break;
  }
  notify("STOPPING=1");
  std::fprintf(stderr, "gridseal-sesd: draining\n");
  (*server)->shutdown(cfg->drain);
  (*server)->wait();
  http.stop();
  std::fprintf(stderr, "gridseal-sesd: stopped\n");
  return 0;
}
