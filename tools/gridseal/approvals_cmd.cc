// `gridseal approvals request|approve|cancel|list|show`: M-of-N approval of the commands the
// policy's [[quorum]] names (src/approvals.h). The operator gate verifies each signature before
// these commands run; they store it, and the approval that completes the quorum runs the command
// once, through the same command tree, as actor "approval:<id>".
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>

#include "src/approvals.h"
#include "src/audit.h"
#include "src/config.h"
#include "src/key_store.h"
#include "src/operators.h"
#include "tools/gridseal/commands.h"
#include "tools/gridseal/json.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

namespace {

namespace ap = gs::approvals;
namespace op = gs::operators;
namespace fs = std::filesystem;

constexpr std::int64_t kListLimit = 200;

std::string subject(std::int64_t id) { return "approval:" + std::to_string(id); }

ap::Signature signature_of(const Gate& gate, std::int64_t now) {
  const op::Request& r = gate.accepted_request();
  const EcSignature& s = gate.accepted_signature();
  return {r.operator_name, gate.accepted_role(), now, r.nonce, r.time, Bytes(s.begin(), s.end())};
}

// The value the gate signed for `name` (the requester's signature covers COMMAND#digest).
std::string signed_arg(const Gate& gate, std::string_view name) {
  for (const auto& [n, v] : gate.accepted_request().args) {
    if (n == name) return v;
  }
  return "";
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code e1, e2;
  return fs::weakly_canonical(a, e1) == fs::weakly_canonical(b, e2) && !e1 && !e2;
}

struct Opened {
  config::Config cfg;
  store::KeyStore store;
};

Result<Opened> open_store(const std::string& config_path) {
  GS_ASSIGN(auto cfg, config::load(config_path));
  auto store = store::KeyStore::open(cfg.store.path, {.create = false});
  if (!store.ok()) {
    return Error(store.error().code, cfg.store.path + ": " + store.error().message());
  }
  return Opened{std::move(cfg), std::move(store).value()};
}

void write_request_json(JsonWriter& w, const ap::Request& r, std::int64_t now) {
  w.begin_object();
  w.key("id").value(r.id).key("command").value(r.command).key("description").value(r.description);
  w.key("argv").begin_array();
  for (const auto& a : r.argv) w.value(a);
  w.end_array();
  w.key("digest").value(to_hex(r.digest)).key("rule").value(r.rule).key("role").value(r.role);
  w.key("required").value(r.required).key("signatures").value(r.signatures);
  w.key("requested_by").value(r.requested_by).key("created_at").value(utc(r.created_at));
  w.key("expires_at").value(utc(r.expires_at)).key("state").value(r.status_text(now));
  w.key("executed_by").value(r.executed_by);
  w.key("exit_code");
  if (r.exit_code) {
    w.value(*r.exit_code);
  } else {
    w.null();
  }
  w.end_object();
}

int run_request(const std::string& config_path, const std::vector<std::string>& command,
                std::int64_t expires_in, bool json, const Gate& gate) {
  if (!gate.authorized()) {
    return fail(
        "approvals need enrolled operators: a request is signed by its requester "
        "(--operator NAME --operator-key FILE)");
  }
  auto c = capture_command(command);
  if (!c.ok()) return fail(c.error().detail);
  std::vector<std::string> argv = command;
  // The command runs later, maybe from another directory: it is pinned to this store.
  if (c->config.empty()) {
    std::error_code ec;
    argv.push_back("--config");
    argv.push_back(fs::absolute(config_path, ec).string());
  } else if (!same_file(c->config, config_path)) {
    return fail("the command's --config (" + c->config + ") is not this request's configuration (" +
                config_path + ")");
  }
  auto o = open_store(config_path);
  if (!o.ok()) return fail(o.error().message());
  auto qp = quorum_policy(o->cfg, o->store.db());
  if (!qp.ok()) return fail(qp.error().message());
  const policy::QuorumRule* rule = *qp ? (*qp)->quorum_for(c->path, c->args) : nullptr;
  if (rule == nullptr) {
    return fail("`" + c->description + "` needs no approval under the policy: run it directly");
  }
  if (gate.accepted_role() != op::to_string(rule->role)) {
    return fail("`" + c->path + "` is approved by " + op::to_string(rule->role) + "s (policy " +
                "[[quorum]] \"" + rule->name + "\"); " + gate.accepted_request().operator_name +
                " is " + gate.accepted_role());
  }
  auto digest = ap::command_digest(c->path, c->args);
  if (!digest.ok()) return fail(digest.error().detail);
  if (signed_arg(gate, "COMMAND#digest") != to_hex(*digest)) {
    return fail("the command's files changed while it was being requested: request it again");
  }
  const std::int64_t now = now_s();
  const std::int64_t ttl =
      std::min<std::int64_t>(expires_in > 0 ? expires_in : rule->expires_s, rule->expires_s);
  ap::Request req;
  req.command = c->path;
  req.argv = argv;
  req.description = c->description;
  req.digest = *digest;
  req.rule = rule->name;
  req.role = op::to_string(rule->role);
  req.required = rule->approvals;
  req.requested_by = gate.accepted_request().operator_name;
  req.created_at = now;
  req.expires_at = now + ttl;
  const ap::Signature first = signature_of(gate, now);
  std::int64_t id = 0;
  Status st =
      audited(o->cfg, o->store.db(), [&](db::Db& db, std::vector<audit::Event>& events) -> Status {
        ap::Store store(db);
        GS_ASSIGN(id, store.create(req, first));
        audit::Detail d;
        d.add("command", audit::clip(req.description, audit::kMaxDetailValue));
        d.add("digest", to_hex(req.digest)).add("rule", req.rule).add("role", req.role);
        d.add("required", req.required).add("expires_at", req.expires_at);
        d.add("nonce", to_hex(first.nonce)).add("time", first.time);
        d.add("signature", to_hex(first.signature));
        events.push_back({0, gate.actor(), "approval_requested", subject(id), d.str()});
        return Status{};
      });
  if (!st.ok()) return fail("approval request not recorded: " + st.error().message());
  if (json) {
    JsonWriter w;
    w.begin_object().key("id").value(id).key("description").value(req.description);
    w.key("digest").value(to_hex(req.digest)).key("required").value(req.required);
    w.key("signatures").value(1).key("role").value(req.role);
    w.key("expires_at").value(utc(req.expires_at)).end_object();
    std::printf("%s\n", w.str().c_str());
  } else {
    std::printf(
        "approval request %lld: `%s`\n  digest %s\n  needs %u approvals from %ss "
        "(1 so far: %s); expires %s\n  approve with: gridseal approvals approve %lld\n",
        static_cast<long long>(id), req.description.c_str(), to_hex(req.digest).c_str(),
        req.required, req.role.c_str(), req.requested_by.c_str(), utc(req.expires_at).c_str(),
        static_cast<long long>(id));
  }
  return kExitOk;
}

// Runs the approved command line through the whole command tree, once.
int run_approved(const ap::Request& r) {
  CLI::App inner{"gridseal"};
  int code = kExitOk;
  Gate qg(Gate::Mode::quorum);
  qg.set_quorum(r.id, r.digest);
  const Gate* outer = current_gate();
  build_app(inner, code, qg);
  std::vector<std::string> rev(r.argv.rbegin(), r.argv.rend());
  try {
    inner.parse(rev);
  } catch (const GateStop& e) {
    if (*e.what() != '\0') std::fprintf(stderr, "%s\n", e.what());
    code = e.code();
  } catch (const CLI::ParseError& e) {
    inner.exit(e);
    code = kExitUsage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gridseal: %s\n", e.what());
    code = kExitFailed;
  }
  set_current_gate(outer);
  return code;
}

int run_approve(const std::string& config_path, std::int64_t id, bool json, const Gate& gate) {
  if (!gate.authorized()) {
    return fail(
        "approvals need enrolled operators: sign the approval with --operator NAME "
        "--operator-key FILE");
  }
  auto o = open_store(config_path);
  if (!o.ok()) return fail(o.error().message());
  const std::int64_t now = now_s();
  const ap::Signature sig = signature_of(gate, now);
  std::uint32_t count = 0;
  std::optional<ap::Request> req;
  bool claimed = false;
  Status st =
      audited(o->cfg, o->store.db(), [&](db::Db& db, std::vector<audit::Event>& events) -> Status {
        ap::Store store(db);
        GS_ASSIGN(count, store.add_signature(id, sig, now));
        GS_ASSIGN(req, store.find(id));
        if (!req) return Status(Errc::not_found, "approval request vanished");
        audit::Detail d;
        d.add("digest", to_hex(req->digest)).add("signatures", count);
        d.add("required", req->required).add("nonce", to_hex(sig.nonce)).add("time", sig.time);
        d.add("signature", to_hex(sig.signature));
        events.push_back({0, gate.actor(), "approval_signed", subject(id), d.str()});
        if (count >= req->required) {
          GS_TRY(store.claim(id, gate.accepted_request().operator_name, now));
          claimed = true;
          audit::Detail r;
          r.add("command", audit::clip(req->description, audit::kMaxDetailValue));
          r.add("digest", to_hex(req->digest)).add("signatures", count);
          events.push_back({0, gate.actor(), "approval_run_started", subject(id), r.str()});
        }
        return Status{};
      });
  if (!st.ok()) return fail("approval refused: " + st.error().detail);
  std::printf("approval request %lld: signed by %s (%u of %u)\n", static_cast<long long>(id),
              sig.operator_name.c_str(), count, req->required);
  if (!claimed) {
    if (json) {
      JsonWriter w;
      w.begin_object().key("id").value(id).key("signatures").value(count);
      w.key("required").value(req->required).key("ran").value(false).end_object();
      std::printf("%s\n", w.str().c_str());
    }
    return kExitOk;
  }
  std::printf("approval request %lld: quorum reached, running `%s`\n", static_cast<long long>(id),
              req->description.c_str());
  std::fflush(stdout);
  const int code = run_approved(*req);
  Status done =
      audited(o->cfg, o->store.db(), [&](db::Db& db, std::vector<audit::Event>& events) -> Status {
        ap::Store store(db);
        GS_TRY(store.finish(id, code, now_s()));
        audit::Detail d;
        d.add("exit_code", code).add("digest", to_hex(req->digest));
        events.push_back(
            {0, "approval:" + std::to_string(id), "approval_run_done", subject(id), d.str()});
        return Status{};
      });
  if (!done.ok()) {
    std::fprintf(stderr,
                 "gridseal: warning: approval request %lld ran (exit %d) but its outcome is not "
                 "recorded: %s\n",
                 static_cast<long long>(id), code, done.error().message().c_str());
  }
  if (json) {
    JsonWriter w;
    w.begin_object().key("id").value(id).key("signatures").value(count);
    w.key("required").value(req->required).key("ran").value(true);
    w.key("exit_code").value(code).end_object();
    std::printf("%s\n", w.str().c_str());
  }
  std::printf("approval request %lld: %s (exit %d)\n", static_cast<long long>(id),
              code == 0 ? "done" : "failed", code);
  return code;
}

int run_cancel(const std::string& config_path, std::int64_t id, const Gate& gate) {
  if (!gate.authorized()) return fail("cancelling needs a signed request from an operator");
  auto o = open_store(config_path);
  if (!o.ok()) return fail(o.error().message());
  const std::string who = gate.accepted_request().operator_name;
  Status st =
      audited(o->cfg, o->store.db(), [&](db::Db& db, std::vector<audit::Event>& events) -> Status {
        ap::Store store(db);
        GS_ASSIGN(auto r, store.find(id));
        if (!r) return Status(Errc::not_found, "no approval request " + std::to_string(id));
        if (r->requested_by != who && gate.accepted_role() != "security-officer") {
          return Status(Errc::invalid_argument, "only its requester (" + r->requested_by +
                                                    ") or a security officer may "
                                                    "cancel approval request " +
                                                    std::to_string(id));
        }
        GS_TRY(store.cancel(id, who, now_s()));
        audit::Detail d;
        d.add("digest", to_hex(r->digest));
        events.push_back({0, gate.actor(), "approval_cancelled", subject(id), d.str()});
        return Status{};
      });
  if (!st.ok()) return fail("not cancelled: " + st.error().detail);
  std::printf("approval request %lld cancelled\n", static_cast<long long>(id));
  return kExitOk;
}

int run_list(const std::string& config_path, bool all, bool json) {
  auto o = open_store(config_path);
  if (!o.ok()) return fail(o.error().message());
  const std::int64_t now = now_s();
  ap::Store store(o->store.db());
  auto list = store.list(all, now, kListLimit);
  if (!list.ok()) return fail(list.error().message());
  if (json) {
    JsonWriter w;
    w.begin_array();
    for (const auto& r : *list) write_request_json(w, r, now);
    w.end_array();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  if (list->empty()) {
    std::printf(all ? "no approval requests\n" : "no open approval requests\n");
    return kExitOk;
  }
  std::printf("%-6s %-10s %-9s %-16s %-20s %s\n", "id", "state", "signed", "requested by",
              "expires", "command");
  for (const auto& r : *list) {
    const std::string signed_text = std::to_string(r.signatures) + "/" + std::to_string(r.required);
    std::printf("%-6lld %-10s %-9s %-16s %-20s %s\n", static_cast<long long>(r.id),
                r.status_text(now).c_str(), signed_text.c_str(), r.requested_by.c_str(),
                utc(r.expires_at).c_str(), r.description.c_str());
  }
  return kExitOk;
}

int run_show(const std::string& config_path, std::int64_t id, bool json) {
  auto o = open_store(config_path);
  if (!o.ok()) return fail(o.error().message());
  const std::int64_t now = now_s();
  ap::Store store(o->store.db());
  auto r = store.find(id);
  if (!r.ok()) return fail(r.error().message());
  if (!*r) return fail("no approval request " + std::to_string(id));
  auto sigs = store.signatures(id);
  if (!sigs.ok()) return fail(sigs.error().message());
  if (json) {
    JsonWriter w;
    w.begin_object().key("request");
    write_request_json(w, **r, now);
    w.key("signatures").begin_array();
    for (const auto& s : *sigs) {
      w.begin_object().key("operator").value(s.operator_name).key("role").value(s.role);
      w.key("signed_at").value(utc(s.signed_at)).key("nonce").value(to_hex(s.nonce));
      w.key("time").value(s.time).key("signature").value(to_hex(s.signature)).end_object();
    }
    w.end_array().end_object();
    std::printf("%s\n", w.str().c_str());
    return kExitOk;
  }
  const ap::Request& q = **r;
  std::printf("approval request %lld: %s\n", static_cast<long long>(q.id),
              q.status_text(now).c_str());
  std::printf("  command      %s\n  digest       %s\n  rule         %s (%u approvals from %ss)\n",
              q.description.c_str(), to_hex(q.digest).c_str(), q.rule.c_str(), q.required,
              q.role.c_str());
  std::printf("  requested    %s by %s\n  expires      %s\n", utc(q.created_at).c_str(),
              q.requested_by.c_str(), utc(q.expires_at).c_str());
  if (q.started_at) {
    std::printf("  run          %s, completed by %s", utc(*q.started_at).c_str(),
                q.executed_by.c_str());
    if (q.exit_code) {
      std::printf(", exit %lld at %s", static_cast<long long>(*q.exit_code),
                  utc(q.finished_at.value_or(0)).c_str());
    } else {
      std::printf(", no outcome recorded (still running, or interrupted)");
    }
    std::printf("\n");
  }
  for (const auto& s : *sigs) {
    std::printf("  signed       %s by %s (%s)\n", utc(s.signed_at).c_str(), s.operator_name.c_str(),
                s.role.c_str());
  }
  return kExitOk;
}

}  // namespace

void register_approvals(CLI::App& app, int& exit_code, Gate& gate) {
  auto* apc = app.add_subcommand(
      "approvals", "M-of-N approval of the commands that the policy's [[quorum]] rules name");
  apc->require_subcommand(1);
  auto config = std::make_shared<std::string>("conf/gridseal.toml");
  auto json = std::make_shared<bool>(false);
  auto id = std::make_shared<std::int64_t>(0);

  auto* req = apc->add_subcommand(
      "request",
      "ask for a quorum: `gridseal approvals request --operator NAME --operator-key KEY -- "
      "rollover start --all`; your signature is the first approval");
  auto command = std::make_shared<std::vector<std::string>>();
  auto expires = std::make_shared<std::int64_t>(0);
  req->add_option("--expires-in", *expires,
                  "seconds the request stays open (default and maximum: the rule's `expires`)")
      ->check(CLI::Range(std::int64_t{60}, std::int64_t{7 * 24 * 3600}));
  req->add_option("--config", *config, "configuration file")->capture_default_str();
  req->add_flag("--json", *json, "machine-readable output");
  req->add_option("COMMAND", *command, "the command to approve, after --")->required();
  req->callback([=, &exit_code, &gate] {
    exit_code = run_request(*config, *command, *expires, *json, gate);
  });

  auto* approve = apc->add_subcommand(
      "approve",
      "sign an open request (check it with `approvals show ID` first); the M-th "
      "distinct approval runs the command, once");
  approve->add_option("ID", *id, "approval request id")->required();
  approve->add_option("--config", *config, "configuration file")->capture_default_str();
  approve->add_flag("--json", *json, "machine-readable output");
  approve->callback([=, &exit_code, &gate] { exit_code = run_approve(*config, *id, *json, gate); });

  auto* cancel = apc->add_subcommand("cancel",
                                     "withdraw an open request (its requester or a "
                                     "security officer)");
  cancel->add_option("ID", *id, "approval request id")->required();
  cancel->add_option("--config", *config, "configuration file")->capture_default_str();
  cancel->callback([=, &exit_code, &gate] { exit_code = run_cancel(*config, *id, gate); });

  auto* list = apc->add_subcommand("list", "open requests (--all: every request), newest first");
  auto all = std::make_shared<bool>(false);
  list->add_flag("--all", *all, "also done, failed, cancelled and expired requests");
  list->add_option("--config", *config, "configuration file")->capture_default_str();
  list->add_flag("--json", *json, "machine-readable output");
  list->callback([=, &exit_code] { exit_code = run_list(*config, *all, *json); });

  auto* show = apc->add_subcommand("show", "one request: the command, its digest, who signed");
  show->add_option("ID", *id, "approval request id")->required();
  show->add_option("--config", *config, "configuration file")->capture_default_str();
  show->add_flag("--json", *json, "machine-readable output");
  show->callback([=, &exit_code] { exit_code = run_show(*config, *id, *json); });
}

}  // namespace gs::cli
