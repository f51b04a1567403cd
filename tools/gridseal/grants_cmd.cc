// `gridseal grants issue|list|revoke`: rate-limit grants (src/grants.h). `issue` signs the
// grant's terms with gs-audit in the HSM and stores it with its audit record; gridseal-sesd
// honours it only when that signature verifies.
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <optional>
#include <toml++/toml.h>

#include "c1222/oid.h"
#include "hsm/ops.h"
#include "src/audit.h"
#include "src/config.h"
#include "src/grants.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "src/policy.h"
#include "src/toml_text.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

// The policy the client name is checked against: --policy, else the config's `policy`, else its
// [ses] policy (a gridseal-sesd config), else policy.toml next to the config.
std::string policy_path(const std::string& config_path, const config::Config& cfg,
                        const std::string& given) {
  if (!given.empty()) return given;
  if (!cfg.policy.empty()) return cfg.policy;
  const std::filesystem::path dir = std::filesystem::absolute(config_path).parent_path();
  // config::load read it already; an error here falls through to the default.
  if (auto root = toml_text::parse_file(config_path); root.ok()) {
    if (auto p = (*root)["ses"]["policy"].value<std::string>()) {
      const std::filesystem::path f(*p);
      return f.is_absolute() ? f.string() : (dir / f).string();
    }
  }
  return (dir / "policy.toml").string();
}

const char* state_of(const grants::Grant& g, std::int64_t now) {
  if (g.revoked()) return "revoked";
  if (now > g.not_after) return "expired";
  if (now < g.not_before) return "pending";
  if (g.reserved >= g.units) return "spent";
  return "active";
}

void grant_json(JsonWriter& w, const grants::Grant& g, std::int64_t now,
                std::optional<bool> verified) {
  w.begin_object().key("id").value(g.id).key("client").value(g.client);
  w.key("class").value(static_cast<std::uint8_t>(g.command_class) <= c1222::kMaxCommandClass
                           ? c1222::command_class_name(g.command_class)
                           : "?");
  w.key("units").value(g.units).key("reserved").value(g.reserved);
  w.key("not_before").value(g.not_before).key("not_after").value(g.not_after);
  w.key("state").value(state_of(g, now)).key("reason").value(g.reason);
  w.key("issued_by").value(g.issued_by).key("issued_at").value(g.issued_at);
  w.key("revoked_at");
  if (g.revoked_at) {
    w.value(*g.revoked_at);
  } else {
    w.null();
  }
  w.key("revoked_by").value(g.revoked_by);
  w.key("signature").value(to_hex(g.signature));
  if (verified) w.key("signature_valid").value(*verified);
  w.end_object();
}

// Signs the grant's terms with gs-audit and checks the signature with its public key. The HSM is
// closed again before audited() opens it (one PKCS#11 module per process).
Status sign_grant(const config::Config& cfg, grants::Grant& g) {
  GS_ASSIGN(auto hsm, open_hsm(cfg.hsm));
  GS_ASSIGN(auto lease, hsm.pool->acquire());
  auto priv = hsm::find_object(lease.session(), hsm::ObjectClass::private_key, kLabelAudit);
  if (!priv.ok()) {
    return Error(priv.error().code, std::string(kLabelAudit) + ": " + priv.error().message());
  }
  GS_ASSIGN(Sha256Digest d, grants::digest(g));
  GS_ASSIGN(auto sig, hsm::sign_digest(lease.session(), *priv, d));
  g.signature.assign(sig.begin(), sig.end());
  GS_ASSIGN(auto pub, hsm::find_object(lease.session(), hsm::ObjectClass::public_key, kLabelAudit));
  GS_ASSIGN(EcPoint point, hsm::export_ec_point(lease.session(), pub));
  GS_ASSIGN(auto key, HostEcKey::from_public(point));
  return grants::verify(g, key);
}

int run_issue(const std::string& config_path, const std::string& policy_file,
              const std::string& client, const std::string& class_name, std::uint32_t units,
              std::int64_t expires_in, const std::string& reason, bool json) {
  auto cls = c1222::parse_command_class(class_name);
  if (!cls.ok()) {
    return fail("--class: unknown command class \"" + class_name +
                "\" (read, write, connect_disconnect, demand_response, key_management, firmware, "
                "time)");
  }
  if (reason.empty() || reason.size() > grants::kMaxReason) {
    return fail("--reason: 1.." + std::to_string(grants::kMaxReason) + " bytes");
  }
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto base = c1222::oid_from_dotted(cfg->base_oid);
  if (!base.ok()) return fail(base.error().message());
  const std::string pol_path = policy_path(config_path, *cfg, policy_file);
  auto pol = policy::load_policy(pol_path, *base);
  if (!pol.ok()) {
    return fail("the client is checked against the SES policy: " + pol.error().message() +
                " (--policy names the file)");
  }
  const policy::ClientRules* rules = nullptr;
  for (const auto& c : pol->clients) {
    if (c.name == client) rules = &c;
  }
  if (rules == nullptr) {
    return fail("--client: no [[client]] named \"" + client + "\" in " + pol_path);
  }
  if (!rules->allowed[policy::class_index(*cls)]) {
    return fail("--client: " + client + " may not send " + class_name + " at all (" + pol_path +
                "); a grant only lifts rate limits");
  }
  const std::string actor = current_actor();
  grants::Grant g;
  auto id = grants::new_id();
  if (!id.ok()) return fail(id.error().message());
  g.id = *id;
  g.client = client;
  g.command_class = *cls;
  g.units = units;
  g.not_before = now_s();
  g.not_after = g.not_before + expires_in;
  g.reason = reason;
  g.issued_by = actor;
  g.issued_at = g.not_before;
  if (auto st = grants::check_terms(g); !st.ok()) return fail(st.error().detail);

  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  if (auto st = sign_grant(*cfg, g); !st.ok()) {
    return fail("signing the grant with gs-audit: " + st.error().message());
  }
  grants::GrantStore gs(store->db());
  Status st = audited(*cfg, store->db(), [&](db::Db&, std::vector<audit::Event>& events) {
    Status s = gs.insert(g);
    audit::Detail d;
    d.add("client", g.client).add("class", c1222::command_class_name(g.command_class));
    d.add("units", g.units).add("not_before", g.not_before).add("not_after", g.not_after);
    d.add("reason", audit::clip(g.reason, audit::kMaxDetailValue));
    if (!s.ok()) d.add("refused", audit::clip(s.error().detail, audit::kMaxDetailValue));
    events.push_back({0, actor, s.ok() ? "grant_issued" : "grant_issue_refused", g.id, d.str()});
    return s;
  });
  if (!st.ok()) return fail(error_text(st.error()));
  if (json) {
    JsonWriter w;
    grant_json(w, g, now_s(), true);
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("grant %s: %s may send %u %s commands beyond the rate limits until %s "
              "(signed by gs-audit; gridseal-sesd picks it up within a few seconds)\n",
              g.id.c_str(), g.client.c_str(), g.units, class_name.c_str(),
              utc(g.not_after).c_str());
  return kExitOk;
}

int run_revoke(const std::string& config_path, const std::string& id, bool json) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  const std::string actor = current_actor();
  grants::GrantStore gs(store->db());
  std::optional<grants::Grant> after;
  Status st = audited(*cfg, store->db(), [&](db::Db&, std::vector<audit::Event>& events) {
    Status s = gs.revoke(id, actor, now_s());
    audit::Detail d;
    if (s.ok()) {
      auto g = gs.find(id);
      if (g.ok() && *g) {
        after = **g;
        d.add("client", after->client).add("units", after->units);
        d.add("reserved", after->reserved);
      }
    } else {
      d.add("refused", audit::clip(s.error().detail, audit::kMaxDetailValue));
    }
    events.push_back({0, actor, s.ok() ? "grant_revoked" : "grant_revoke_refused",
                      audit::clip(id, audit::kMaxSubject), d.str()});
    return s;
  });
  if (!st.ok()) return fail(error_text(st.error()));
  if (json) {
    JsonWriter w;
    if (after) {
      grant_json(w, *after, now_s(), std::nullopt);
    } else {
      w.begin_object().key("id").value(id).key("state").value("revoked").end_object();
    }
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  std::printf("grant %s revoked: gridseal-sesd stops honouring it within a few seconds\n",
              id.c_str());
  return kExitOk;
}

int run_list(const std::string& config_path, bool all, bool verify_sig, bool json) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  const std::int64_t now = now_s();
  grants::GrantStore gs(store->db());
  auto list = gs.list(all, now, 10000);
  if (!list.ok()) return fail(list.error().message());
  std::optional<HostEcKey> key;
  if (verify_sig) {
    auto hsm = open_hsm(cfg->hsm);
    if (!hsm.ok()) return fail(hsm.error().message());
    auto lease = hsm->pool->acquire();
    if (!lease.ok()) return fail(lease.error().message());
    auto pub = hsm::find_object(lease->session(), hsm::ObjectClass::public_key, kLabelAudit);
    if (!pub.ok()) return fail(std::string(kLabelAudit) + ": " + pub.error().message());
    auto point = hsm::export_ec_point(lease->session(), *pub);
    if (!point.ok()) return fail(point.error().message());
    auto k = HostEcKey::from_public(*point);
    if (!k.ok()) return fail(k.error().message());
    key.emplace(std::move(k).value());
  }
  bool all_valid = true;
  auto valid = [&](const grants::Grant& g) -> std::optional<bool> {
    if (!key) return std::nullopt;
    const bool ok = grants::verify(g, *key).ok();
    all_valid = all_valid && ok;
    return ok;
  };
  if (json) {
    JsonWriter w;
    w.begin_array();
    for (const auto& g : *list) grant_json(w, g, now, valid(g));
    w.end_array();
    std::printf("%s\n", w.str().c_str());
    return all_valid ? kExitOk : kExitFailed;
  }
  if (list->empty()) {
    std::printf(all ? "no rate-limit grants\n" : "no active rate-limit grants\n");
    return kExitOk;
  }
  std::printf("%-16s %-24s %-18s %7s %8s %-8s %-20s %s\n", "id", "client", "class", "units",
              "reserved", "state", "expires", key ? "signature / reason" : "reason");
  for (const auto& g : *list) {
    const auto v = valid(g);
    std::printf("%-16s %-24s %-18s %7u %8u %-8s %-20s %s%s\n",
                audit::clip(g.id, 16).c_str(), audit::clip(g.client, 24).c_str(),
                static_cast<std::uint8_t>(g.command_class) <= c1222::kMaxCommandClass
                    ? c1222::command_class_name(g.command_class)
                    : "?",
                g.units, g.reserved, state_of(g, now), utc(g.not_after).c_str(),
                v ? (*v ? "valid / " : "INVALID (not honoured) / ") : "",
                audit::clip(g.reason, 80).c_str());
  }
  return all_valid ? kExitOk : kExitFailed;
}

}  // namespace

void register_grants(CLI::App& app, int& exit_code) {
  auto* grants = app.add_subcommand(
      "grants", "rate-limit grants: an SES client may exceed the policy's limits, bounded");
  grants->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);

  auto* issue = grants->add_subcommand(
      "issue", "let one SES client send N more commands of one class beyond the rate limits");
  auto client = std::make_shared<std::string>();
  auto cls = std::make_shared<std::string>();
  auto units = std::make_shared<std::uint32_t>(0);
  auto expires = std::make_shared<std::int64_t>(0);
  auto reason = std::make_shared<std::string>();
  auto policy_file = std::make_shared<std::string>();
  issue->add_option("--client", *client, "the [[client]] name in the SES policy")->required();
  issue->add_option("--class", *cls, "command class (e.g. connect_disconnect)")->required();
  issue->add_option("--meters", *units,
                    "commands allowed beyond the limits (1.." +
                        std::to_string(grants::kMaxUnits) + ")")
      ->required()
      ->check(CLI::Range(std::uint32_t{1}, grants::kMaxUnits));
  issue->add_option("--expires-in", *expires,
                    "seconds until it expires (1.." + std::to_string(grants::kMaxLifetime) + ")")
      ->required()
      ->check(CLI::Range(std::int64_t{1}, grants::kMaxLifetime));
  issue->add_option("--reason", *reason, "why (kept with the grant and in the audit trail)")
      ->required();
  issue->add_option("--policy", *policy_file,
                    "SES policy file the client is checked against (default: the config's)");
  issue->add_option("--config", *config, "configuration file")->capture_default_str();
  issue->add_flag("--json", *json, "machine-readable output");
  issue->callback([=, &exit_code] {
    exit_code = run_issue(*config, *policy_file, *client, *cls, *units, *expires, *reason, *json);
  });

  auto* list = grants->add_subcommand("list", "rate-limit grants, newest first");
  auto all = std::make_shared<bool>(false);
  auto verify = std::make_shared<bool>(false);
  list->add_flag("--all", *all, "also revoked and expired ones");
  list->add_flag("--verify", *verify,
                 "check each signature with gs-audit's public key (HSM); exit 1 when one fails");
  list->add_option("--config", *config, "configuration file")->capture_default_str();
  list->add_flag("--json", *json, "machine-readable output");
  list->callback([=, &exit_code] { exit_code = run_list(*config, *all, *verify, *json); });

  auto* revoke = grants->add_subcommand("revoke", "stop honouring a grant");
  auto id = std::make_shared<std::string>();
  revoke->add_option("ID", *id, "grant id")->required();
  revoke->add_option("--config", *config, "configuration file")->capture_default_str();
  revoke->add_flag("--json", *json, "machine-readable output");
  revoke->callback([=, &exit_code] { exit_code = run_revoke(*config, *id, *json); });
}

}  // namespace gs::cli
