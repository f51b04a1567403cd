// `gridseal meters import|list|show|revoke`: the meter registry.
#include <pwd.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>

#include "src/hsm_context.h"
#include "src/meter_import.h"
#include "src/rollover_store.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"

namespace gs::cli {

namespace {

int fail(const std::string& what) {
  std::fprintf(stderr, "gridseal: %s\n", what.c_str());
  return kExitFailed;
}

struct Opened {
  config::Config cfg;
  Bytes base;
};

Result<Opened> load(const std::string& path) {
  Opened o;
  GS_ASSIGN(o.cfg, config::load(path));
  GS_ASSIGN(o.base, c1222::oid_from_dotted(o.cfg.base_oid));
  return o;
}

std::size_t count_lines(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::size_t n = 0;
  char buf[1 << 16];
  while (f.read(buf, sizeof buf) || f.gcount() > 0) {
    for (std::streamsize i = 0; i < f.gcount(); ++i) n += buf[i] == '\n';
  }
  return n;
}

int run_import(const std::string& config_path, const std::string& file, std::size_t batch,
               const std::string& transport_key) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  std::ifstream in(file);
  if (!in) return fail("cannot read " + file);
  auto ctx = open_hsm(o->cfg.hsm);
  if (!ctx.ok()) return fail(ctx.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path);
  if (!store.ok()) return fail(store.error().message());
  auto lease = ctx->pool->acquire();
  if (!lease.ok()) return fail(lease.error().message());

  const bool tty = ::isatty(STDERR_FILENO) != 0;
  const std::size_t total = tty ? (count_lines(file) > 0 ? count_lines(file) - 1 : 0) : 0;
  const auto start = std::chrono::steady_clock::now();
  auto rate = [&](std::size_t rows) {
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return s > 0 ? static_cast<double>(rows) / s : 0.0;
  };
  ImportOptions opt;
  opt.batch = batch;
  opt.base_oid = o->base;
  opt.transport_key = transport_key;
  opt.on_error = [&](std::size_t line, const std::string& why) {
    if (tty) std::fprintf(stderr, "\r\033[K");
    if (line != 0) {
      std::fprintf(stderr, "%s:%zu: %s\n", file.c_str(), line, why.c_str());
    } else {
      std::fprintf(stderr, "%s: %s\n", file.c_str(), why.c_str());
    }
  };
  opt.on_progress = [&](const ImportProgress& p) {
    if (!tty) return;
    double frac = total > 0 ? static_cast<double>(p.rows) / static_cast<double>(total) : 0;
    if (frac > 1) frac = 1;
    int filled = static_cast<int>(frac * 30);
    std::fprintf(stderr, "\r[%.*s%*s] %3d%% %zu/%zu rows  %.0f rows/s", filled,
                 "##############################", 30 - filled, "",
                 static_cast<int>(frac * 100), p.rows, total, rate(p.rows));
    std::fflush(stderr);
  };
  auto r = import_fleet(in, lease->session(), *store, opt);
  if (tty) std::fprintf(stderr, "\n");
  if (!r.ok()) return fail(file + ": " + r.error().message());
  std::printf("%zu rows: %zu imported, %zu already present, %zu refused (%.0f rows/s)\n", r->rows,
              r->inserted, r->unchanged, r->failed, rate(r->rows));
  return r->failed == 0 ? kExitOk : kExitFailed;
}

void meter_json(JsonWriter& w, const store::Meter& m) {
  w.begin_object().key("meter_id").value(m.meter_id).key("ap_title").value(m.ap_title_text);
  w.key("ap_title_absolute").value(c1222::oid_to_dotted(m.ap_title, false));
  w.key("public_key").value(to_hex(m.public_key)).key("state").value(store::to_string(m.state));
  w.key("state_reason").value(m.state_reason).key("created_at").value(m.created_at);
  w.key("slots").begin_array();
  for (const auto& s : m.slots) {
    w.begin_object().key("slot").value(s.slot).key("key_id").value(s.slot);
    w.key("state").value(store::to_string(s.state)).key("key_version").value(s.key_version);
    w.key("origin").value(s.origin).key("changed_at").value(s.changed_at).end_object();
  }
  w.end_array().end_object();
}

int run_list(const std::string& config_path, bool json, std::size_t limit,
             const std::string& after) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  auto meters = store->list_meters(after, limit);
  if (!meters.ok()) return fail(meters.error().message());
  if (json) {
    JsonWriter w;
    w.begin_array();
    for (const auto& m : *meters) meter_json(w, m);
    w.end_array();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("%-20s %-36s %-12s %s\n", "meter", "ap_title", "state", "active key");
  for (const auto& m : *meters) {
    const auto* a = m.active_slot();
    std::string key = a ? "slot " + std::to_string(a->slot) + " v" + std::to_string(a->key_version)
                        : "none";
    std::printf("%-20s %-36s %-12s %s\n", m.meter_id.c_str(), m.ap_title_text.c_str(),
                store::to_string(m.state), key.c_str());
  }
  auto total = store->count_meters();
  if (total.ok() && static_cast<std::size_t>(*total) > meters->size()) {
    std::printf("(%zu of %lld meters; --after %s for more)\n", meters->size(),
                static_cast<long long>(*total),
                meters->empty() ? "" : meters->back().meter_id.c_str());
  }
  return kExitOk;
}

int run_show(const std::string& config_path, const std::string& id, bool json) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  auto m = store->meter_by_id(id);
  if (!m.ok()) return fail(m.error().message());
  if (!m->has_value()) return fail("no meter " + id);
  const auto& v = **m;
  if (json) {
    JsonWriter w;
    meter_json(w, v);
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("meter       %s\nap_title    %s (%s)\nstate       %s%s%s\npublic key  %s\n",
              v.meter_id.c_str(), v.ap_title_text.c_str(),
              c1222::oid_to_dotted(v.ap_title, false).c_str(), store::to_string(v.state),
              v.state_reason.empty() ? "" : ": ", v.state_reason.c_str(),
              v.public_key.empty() ? "(none)" : to_hex(v.public_key).c_str());
  for (const auto& s : v.slots) {
    std::printf("slot %d      key id %d, version %u, %s, from %s\n", s.slot, s.slot,
                s.key_version, store::to_string(s.state), s.origin.c_str());
  }
  return kExitOk;
}

// Who revoked: the operator's login on this host (kept with the revocation campaign).
std::string operator_identity() {
  struct passwd pw {};
  struct passwd* found = nullptr;
  char buf[1024];
  if (getpwuid_r(::geteuid(), &pw, buf, sizeof buf, &found) == 0 && found != nullptr) {
    return std::string("cli:") + found->pw_name;
  }
  return "cli:uid " + std::to_string(::geteuid());
}

int run_revoke(const std::string& config_path, const std::string& id, const std::string& reason,
               bool permanent, bool json) {
  auto o = load(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto store = store::KeyStore::open(o->cfg.store.path, {.create = false});
  if (!store.ok()) return fail(store.error().message());
  if (permanent) {
    auto st = store->revoke(id, reason);
    if (!st.ok()) return fail(st.error().message());
    if (json) {
      JsonWriter w;
      w.begin_object().key("meter_id").value(id).key("state").value("compromised");
      w.key("permanent").value(true).end_object();
      std::printf("%s\n", w.str().c_str());
      return kExitOk;
    }
    std::printf("meter %s revoked permanently: state compromised, it is never served again and "
                "its keys are never used again\n",
                id.c_str());
    return kExitOk;
  }
  // Key compromise: quarantine and rekey under the compromised key (a one-meter campaign).
  store::RolloverStore rs(*store);
  auto r = rs.revoke_key(id, reason, operator_identity());
  if (!r.ok()) {
    if (r.error().code == Errc::invalid_argument) {
      return fail(r.error().detail + "; use --permanent to revoke it for good");
    }
    return fail(r.error().detail.empty() ? r.error().message() : r.error().detail);
  }
  if (json) {
    JsonWriter w;
    w.begin_object().key("meter_id").value(id).key("state").value("quarantined");
    w.key("permanent").value(false).key("campaign").value(r->campaign);
    w.key("seal_slot").value(unsigned{r->seal_slot});
    w.key("slots_compromised").value(r->slots_compromised);
    w.key("slots_destroyed").value(r->slots_destroyed);
    w.key("superseded_campaign").value(r->superseded).end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("meter %s quarantined: %lld key%s compromised and never used again",
              id.c_str(), static_cast<long long>(r->slots_compromised),
              r->slots_compromised == 1 ? "" : "s");
  if (r->slots_destroyed > 0) {
    std::printf(", %lld pending key%s destroyed", static_cast<long long>(r->slots_destroyed),
                r->slots_destroyed == 1 ? "" : "s");
  }
  std::printf("\n");
  if (r->superseded != 0) {
    std::printf("its step in rollover campaign %lld is superseded\n",
                static_cast<long long>(r->superseded));
  }
  std::printf("rollover campaign %lld rekeys it: gridseal-dkusd sends the key update sealed under "
              "the compromised key (slot %u), the only one the meter holds; the meter is served "
              "again once it answers under its new key. Until then commands to it are refused. "
              "Follow it with: gridseal rollover status %lld\n",
              static_cast<long long>(r->campaign), unsigned{r->seal_slot},
              static_cast<long long>(r->campaign));
  return kExitOk;
}

}  // namespace

void register_meters(CLI::App& app, int& exit_code) {
  auto* meters = app.add_subcommand("meters", "the meter registry");
  meters->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);

  auto* imp = meters->add_subcommand("import", "import a manufacturer's fleet file (CSV)");
  auto file = std::make_shared<std::string>();
  auto batch = std::make_shared<std::size_t>(1000);
  imp->add_option("FILE", *file, "meter_id,ap_title,ecc_public_key,key_slot,key")->required();
  imp->add_option("--config", *config, "configuration file")->capture_default_str();
  imp->add_option("--batch", *batch, "rows per transaction")->check(CLI::Range(1, 100000));
  auto transport = std::make_shared<std::string>();
  imp->add_option("--transport-key", *transport,
                  "label of the transport key that wrapped:<hex> keys are wrapped under");
  imp->callback([=, &exit_code] {
    exit_code = run_import(*config, *file, *batch, *transport);
  });

  auto* list = meters->add_subcommand("list", "list meters");
  auto limit = std::make_shared<std::size_t>(100);
  auto after = std::make_shared<std::string>();
  list->add_option("--config", *config, "configuration file")->capture_default_str();
  list->add_flag("--json", *json, "machine-readable output");
  list->add_option("--limit", *limit, "at most this many")->check(CLI::Range(1, 1000000));
  list->add_option("--after", *after, "start after this meter id");
  list->callback([=, &exit_code] { exit_code = run_list(*config, *json, *limit, *after); });

  auto* show = meters->add_subcommand("show", "one meter and its key slots");
  auto id = std::make_shared<std::string>();
  show->add_option("ID", *id, "meter id")->required();
  show->add_option("--config", *config, "configuration file")->capture_default_str();
  show->add_flag("--json", *json, "machine-readable output");
  show->callback([=, &exit_code] { exit_code = run_show(*config, *id, *json); });

  auto* revoke = meters->add_subcommand(
      "revoke", "revoke a meter's key: quarantine and rekey it (--permanent: never serve it again)");
  auto reason = std::make_shared<std::string>();
  auto permanent = std::make_shared<bool>(false);
  revoke->add_option("ID", *id, "meter id")->required();
  revoke->add_option("--reason", *reason, "why")
      ->required()
      ->check([](const std::string& r) -> std::string {
        return r.empty() || r.size() > 256 ? "the reason must be 1..256 characters" : "";
      });
  revoke->add_flag("--permanent", *permanent,
                   "the meter itself is stolen or destroyed: mark it compromised, never rekey it");
  revoke->add_option("--config", *config, "configuration file")->capture_default_str();
  revoke->add_flag("--json", *json, "machine-readable output");
  revoke->callback([=, &exit_code] {
    exit_code = run_revoke(*config, *id, *reason, *permanent, *json);
  });
}

}  // namespace gs::cli
