// `gridseal operators enroll|list|remove|roles|challenge|sign-request`: the operator registry and
// signed operator requests (src/operators.h, operator_gate.h).
#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>

#include "src/audit.h"
#include "src/config.h"
#include "src/key_store.h"
#include "src/operators.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

namespace op = gs::operators;

// The first 16 hex digits of SHA-256(point): what operators compare when they read a key out.
std::string fingerprint(ByteView point) {
  auto d = sha256(point);
  return d.ok() ? to_hex(*d).substr(0, 16) : "?";
}

int run_enroll(const std::string& config_path, const std::string& name, const std::string& role_s,
               const std::string& pubkey_file, const Gate& gate) {
  auto role = op::role_from(role_s);
  if (!role) {
    return fail("--role must be one of security-officer, key-custodian, operator, auditor");
  }
  if (!op::valid_name(name)) return fail("operator name must be 1..64 of A-Z a-z 0-9 . _ -");
  auto key = op::load_public_key(pubkey_file);
  if (!key.ok()) return fail(key.error().detail);
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = store::KeyStore::open(cfg->store.path);
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  op::Registry reg(store->db());
  const std::string actor = gate.actor();
  Status st = audited(*cfg, store->db(), [&](db::Db&, std::vector<audit::Event>& events) {
    op::Operator o{name, *role, *key, now_s(), actor, std::nullopt, ""};
    Status s = reg.enroll(o);
    audit::Detail d;
    d.add("role", op::to_string(*role)).add("key_fingerprint", fingerprint(*key));
    if (!s.ok()) d.add("reason", audit::clip(s.error().detail, audit::kMaxDetailValue));
    events.push_back(
        {0, actor, s.ok() ? "operator_enrolled" : "operator_enroll_refused", name, d.str()});
    return s;
  });
  if (!st.ok()) return fail(st.error().detail);
  std::printf("enrolled %s as %s (key %s)\n", name.c_str(), op::to_string(*role),
              fingerprint(*key).c_str());
  return kExitOk;
}

int run_remove(const std::string& config_path, const std::string& name, const Gate& gate) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  op::Registry reg(store->db());
  const std::string actor = gate.actor();
  Status st = audited(*cfg, store->db(), [&](db::Db&, std::vector<audit::Event>& events) {
    Status s = reg.remove(name, actor, now_s());
    audit::Detail d;
    if (!s.ok()) d.add("reason", audit::clip(s.error().detail, audit::kMaxDetailValue));
    events.push_back(
        {0, actor, s.ok() ? "operator_removed" : "operator_remove_refused", name, d.str()});
    return s;
  });
  if (!st.ok()) return fail(st.error().detail);
  std::printf("removed %s\n", name.c_str());
  return kExitOk;
}

int run_list(const std::string& config_path, bool json, bool all) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  std::error_code ec;
  if (!std::filesystem::exists(cfg->store.path, ec)) {
    std::printf(json ? "[]\n" : "no operators enrolled (no store yet: bootstrap mode)\n");
    return kExitOk;
  }
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  op::Registry reg(store->db());
  auto ops = reg.list(all);
  if (!ops.ok()) return fail(ops.error().message());
  if (json) {
    JsonWriter w;
    w.begin_array();
    for (const auto& o : *ops) {
      w.begin_object().key("name").value(o.name).key("role").value(op::to_string(o.role));
      w.key("public_key").value(to_hex(o.public_key));
      w.key("key_fingerprint").value(fingerprint(o.public_key));
      w.key("enrolled_at").value(o.enrolled_at).key("enrolled_by").value(o.enrolled_by);
      w.key("removed_at");
      if (o.removed_at) {
        w.value(*o.removed_at);
      } else {
        w.null();
      }
      w.key("removed_by").value(o.removed_by).end_object();
    }
    w.end_array();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  if (ops->empty()) {
    std::printf("no operators enrolled (bootstrap mode: state-changing commands run unsigned)\n");
    return kExitOk;
  }
  std::printf("%-20s %-17s %-16s %-20s %s\n", "name", "role", "key", "enrolled", "by");
  for (const auto& o : *ops) {
    std::printf("%-20s %-17s %-16s %-20s %s%s\n", o.name.c_str(), op::to_string(o.role),
                fingerprint(o.public_key).c_str(), utc(o.enrolled_at).c_str(),
                o.enrolled_by.c_str(),
                o.removed_at ? (" (removed " + utc(*o.removed_at) + " by " + o.removed_by + ")").c_str()
                             : "");
  }
  return kExitOk;
}

void leaves(const CLI::App* a, const std::string& prefix, std::vector<std::string>& out) {
  auto named = a->get_subcommands([](const CLI::App* s) { return !s->get_name().empty(); });
  if (named.empty()) {
    if (!prefix.empty()) out.push_back(prefix);
    return;
  }
  for (const CLI::App* s : named) {
    leaves(s, prefix.empty() ? s->get_name() : prefix + " " + s->get_name(), out);
  }
}

int run_roles(const CLI::App& root, bool json) {
  std::vector<std::string> all;
  leaves(&root, "", all);
  std::vector<std::string> unclassified;
  for (const auto& c : all) {
    bool open = std::find(op::open_commands().begin(), op::open_commands().end(), c) !=
                op::open_commands().end();
    if (!open && op::rule_for(c) == nullptr) unclassified.push_back(c);
  }
  if (json) {
    JsonWriter w;
    w.begin_object().key("roles").begin_object();
    for (op::Role r : op::kAllRoles) {
      w.key(op::to_string(r)).begin_array();
      for (const auto& rule : op::command_rules()) {
        if (op::allows(rule, r)) w.value(rule.command);
      }
      if (op::allows(op::unclassified_rule(), r)) {
        for (const auto& c : unclassified) w.value(c);
      }
      w.end_array();
    }
    w.end_object().key("open").begin_array();
    for (auto c : op::open_commands()) w.value(c);
    w.end_array().key("unclassified").begin_array();
    for (const auto& c : unclassified) w.value(c);
    w.end_array().end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  for (op::Role r : op::kAllRoles) {
    std::string cmds;
    for (const auto& rule : op::command_rules()) {
      if (op::allows(rule, r)) cmds += (cmds.empty() ? "" : ", ") + std::string(rule.command);
    }
    if (op::allows(op::unclassified_rule(), r)) {
      for (const auto& c : unclassified) cmds += (cmds.empty() ? "" : ", ") + c;
    }
    std::printf("%-17s %s\n", op::to_string(r), cmds.empty() ? "(read-only commands only)"
                                                             : cmds.c_str());
  }
  std::string open;
  for (auto c : op::open_commands()) open += (open.empty() ? "" : ", ") + std::string(c);
  std::printf("%-17s %s\n", "anyone", open.c_str());
  for (const auto& c : unclassified) {
    std::printf("unclassified: %s (security-officer only until classified)\n", c.c_str());
  }
  return kExitOk;
}

int run_challenge(const std::string& config_path, std::int64_t ttl, bool json) {
  auto cfg = config::load(config_path);
  if (!cfg.ok()) return fail(cfg.error().message());
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) return fail(cfg->store.path + ": " + store.error().message());
  op::Registry reg(store->db());
  auto n = reg.issue_nonce(ttl, now_s());
  if (!n.ok()) return fail(n.error().message());
  if (json) {
    JsonWriter w;
    w.begin_object().key("nonce").value(to_hex(n->value)).key("expires_at").value(n->expires_at);
    w.end_object();
    std::printf("%s\n", w.str().c_str());
  } else {
    std::printf("nonce %s\nexpires %s (single use)\n", to_hex(n->value).c_str(),
                utc(n->expires_at).c_str());
  }
  return kExitOk;
}

int run_sign(const std::string& name, const std::string& key_file, const std::string& nonce_hex,
             const std::string& out, std::vector<std::string> command) {
  auto nonce = from_hex(nonce_hex);
  if (!nonce || nonce->size() != op::kNonceSize) {
    return fail("--nonce must be the 16-byte hex nonce from `gridseal operators challenge`");
  }
  if (!op::valid_name(name)) return fail("operator name must be 1..64 of A-Z a-z 0-9 . _ -");
  std::string key = key_file;
  if (key.empty()) {
    const char* env = std::getenv("GS_OPERATOR_KEY");
    if (env != nullptr) key = env;
  }
  if (key.empty()) return fail("--operator-key FILE (or GS_OPERATOR_KEY=FILE) is required");
  // The command is parsed by the same command tree as on the appliance, so that both sides
  // derive the same canonical arguments; the gate signs instead of running it.
  CLI::App inner{"gridseal"};
  int inner_code = kExitOk;
  Gate signer(Gate::Mode::sign);
  build_app(inner, inner_code, signer);
  signer.set_signing(name, key, *nonce, out);
  std::reverse(command.begin(), command.end());
  try {
    inner.parse(command);
  } catch (const GateStop& e) {
    if (*e.what() != '\0') std::fprintf(stderr, "%s\n", e.what());
    return e.code();
  } catch (const CLI::ParseError& e) {
    inner.exit(e);
    return kExitUsage;
  }
  return fail("the command was not recognised as one to sign");
}

}  // namespace

void register_operators(CLI::App& app, int& exit_code, Gate& gate) {
  auto* ops = app.add_subcommand("operators", "named operators, roles and signed requests");
  ops->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);

  auto* enroll = ops->add_subcommand("enroll", "register an operator's P-256 public key and role");
  auto name = std::make_shared<std::string>();
  auto role = std::make_shared<std::string>();
  auto pubkey = std::make_shared<std::string>();
  enroll->add_option("NAME", *name, "operator name ([A-Za-z0-9._-]{1,64}, never reused)")
      ->required();
  enroll->add_option("--role", *role, "security-officer | key-custodian | operator | auditor")
      ->required();
  enroll->add_option("--pubkey", *pubkey, "public key: PEM (SubjectPublicKeyInfo) or hex point")
      ->required();
  enroll->add_option("--config", *config, "configuration file")->capture_default_str();
  enroll->callback([=, &exit_code, &gate] {
    exit_code = run_enroll(*config, *name, *role, *pubkey, gate);
  });

  auto* list = ops->add_subcommand("list", "enrolled operators");
  auto all = std::make_shared<bool>(false);
  list->add_flag("--json", *json, "machine-readable output (removed operators included)");
  list->add_flag("--all", *all, "include removed operators");
  list->add_option("--config", *config, "configuration file")->capture_default_str();
  list->callback([=, &exit_code] { exit_code = run_list(*config, *json, *all || *json); });

  auto* remove = ops->add_subcommand("remove", "remove an operator (kept listed as removed)");
  remove->add_option("NAME", *name, "operator name")->required();
  remove->add_option("--config", *config, "configuration file")->capture_default_str();
  remove->callback([=, &exit_code, &gate] { exit_code = run_remove(*config, *name, gate); });

  auto* roles = ops->add_subcommand("roles", "each role and the commands it may run");
  roles->add_flag("--json", *json, "machine-readable output");
  roles->callback([=, &app, &exit_code] { exit_code = run_roles(app, *json); });

  auto* challenge = ops->add_subcommand(
      "challenge", "a fresh single-use nonce for a request signed elsewhere (sign-request)");
  auto ttl = std::make_shared<std::int64_t>(op::kDefaultNonceTtl);
  challenge->add_option("--ttl", *ttl, "seconds until it expires")
      ->check(CLI::Range(std::int64_t{1}, op::kMaxNonceTtl))
      ->capture_default_str();
  challenge->add_flag("--json", *json, "machine-readable output");
  challenge->add_option("--config", *config, "configuration file")->capture_default_str();
  challenge->callback([=, &exit_code] { exit_code = run_challenge(*config, *ttl, *json); });

  auto* sign = ops->add_subcommand(
      "sign-request",
      "sign a command for the appliance with your own key, on your own machine: "
      "`gridseal operators sign-request --operator NAME --operator-key KEY.pem --nonce HEX "
      "--out REQ -- meters revoke M1 --reason lost`; then on the appliance run the same "
      "command with --request REQ");
  auto key = std::make_shared<std::string>();
  auto nonce = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto command = std::make_shared<std::vector<std::string>>();
  sign->add_option("--operator", *name, "your operator name")->required();
  sign->add_option("--operator-key", *key, "your P-256 private key, PEM (default: $GS_OPERATOR_KEY)");
  sign->add_option("--nonce", *nonce, "from `gridseal operators challenge` on the appliance")
      ->required();
  sign->add_option("--out", *out, "the request file to create")->required();
  sign->add_option("COMMAND", *command, "the command to sign, after --")->required();
  sign->callback([=, &exit_code] {
    exit_code = run_sign(*name, *key, *nonce, *out, *command);
  });
}

}  // namespace gs::cli
