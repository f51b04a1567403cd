// The operator gate (operator_gate.h): role table lookup, canonical arguments, signing and the
// verification of signed operator requests, each decision recorded in the audit trail.
#include "tools/gridseal/operator_gate.h"

#include <fcntl.h>
#include <pwd.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "src/approvals.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "src/operator_token.h"
#include "src/operators.h"
#include "src/policy_record.h"
#include "tools/gridseal/commands.h"

namespace gs::cli {

namespace {

namespace op = gs::operators;

// Options that say where or how, not what: left out of the signed request (the nonce already
// binds the request to this appliance's store).
bool unsigned_option(const std::string& name) {
  return name == "--config" || name == "--operator" || name == "--operator-key" ||
         name == "--request" || name == "--json" || name == "--help";
}

std::string path_of(const CLI::App* leaf) {
  std::string p;
  for (const CLI::App* a = leaf; a != nullptr && a->get_parent() != nullptr; a = a->get_parent()) {
    p = p.empty() ? a->get_name() : a->get_name() + " " + p;
  }
  return p;
}

bool is_open(const std::string& path) {
  for (auto c : op::open_commands()) {
    if (c == path) return true;
  }
  return false;
}

void collect_options(const CLI::App* a, std::vector<std::pair<std::string, std::string>>& out) {
  for (const CLI::Option* o : a->get_options()) {
    if (o->count() == 0) continue;
    std::string name = o->get_lnames().empty() ? o->get_single_name() : "--" + o->get_single_name();
    if (unsigned_option(name)) continue;
    for (const auto& v : o->results()) out.emplace_back(name, v);
  }
  // Option groups are unnamed sub-apps of the command.
  for (const CLI::App* g : a->get_subcommands([](const CLI::App* s) { return s->get_name().empty(); })) {
    collect_options(g, out);
  }
}

// The command's arguments as signed: options and positionals, plus the digest of each file
// argument's content.
std::vector<std::pair<std::string, std::string>> canonical_args(const CLI::App* leaf,
                                                                const op::CommandRule& rule) {
  std::vector<std::pair<std::string, std::string>> args;
  collect_options(leaf, args);
  std::istringstream files{std::string(rule.file_args)};
  std::string f;
  std::vector<std::pair<std::string, std::string>> extra;
  while (files >> f) {
    for (const auto& [n, v] : args) {
      if (n != f) continue;
      auto h = op::file_sha256_hex(v);
      if (!h.ok()) throw GateStop(kExitFailed, "gridseal: " + h.error().detail);
      extra.emplace_back(n + "#sha256", *h);
    }
  }
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::string actor_for(const std::string& name) {
  return op::valid_name(name) ? "operator:" + name : "unsigned:" + unix_user();
}

audit::Event decision_event(const op::Request& r, bool accepted, const std::string& role,
                            const std::string& reason) {
  audit::Detail d;
  d.add("args", audit::clip(op::describe(r), audit::kMaxDetailValue));
  if (!role.empty()) d.add("role", role);
  if (!r.nonce.empty()) d.add("nonce", to_hex(r.nonce));
  if (!reason.empty()) d.add("reason", audit::clip(reason, audit::kMaxDetailValue));
  return {0, actor_for(r.operator_name),
          accepted ? "operator_request_accepted" : "operator_request_refused",
          audit::clip(r.command, audit::kMaxSubject), d.str()};
}

// Signs with the operator's key: a PEM file, or a key on their PKCS#11 token ("pkcs11:" URI,
// src/operator_token.h).
Result<EcSignature> sign_as_operator(const op::Request& r, const std::string& key_spec) {
  if (op::is_token_uri(key_spec)) {
    GS_ASSIGN(auto uri, op::parse_token_uri(key_spec));
    return op::sign_request_on_token(r, uri);
  }
  auto key = op::load_private_key(key_spec);
  if (!key.ok()) return Error(key.error().code, key.error().detail);
  return op::sign_request(r, *key);
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw GateStop(kExitRefused, "gridseal: refused: cannot read request file " + path);
  std::string text(op::kMaxRequestFile + 1, '\0');
  f.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(f.gcount()));
  if (text.size() > op::kMaxRequestFile) {
    throw GateStop(kExitRefused, "gridseal: refused: request file " + path + " too large");
  }
  return text;
}

}  // namespace

std::string unix_user() {
  const passwd* pw = getpwuid(geteuid());
  return audit::clip(pw != nullptr ? pw->pw_name : std::to_string(geteuid()), 64);
}

Status audited(const config::Config& cfg, db::Db& db,
               const std::function<Status(db::Db&, std::vector<audit::Event>&)>& action,
               bool unrecorded_ok) {
  return audited_hsm(
      cfg, db,
      [&](db::Db& d, hsm::Session&, std::vector<audit::Event>& events) { return action(d, events); },
      unrecorded_ok);
}

Status audited_hsm(
    const config::Config& cfg, db::Db& db,
    const std::function<Status(db::Db&, hsm::Session&, std::vector<audit::Event>&)>& action,
    bool unrecorded_ok) {
  auto hsm = open_hsm(cfg.hsm);
  if (!hsm.ok()) {
    return Error(hsm.error().code,
                 "the audit trail needs the HSM: " + hsm.error().message());
  }
  GS_ASSIGN(auto lease, hsm->pool->acquire());
  GS_ASSIGN(auto trail, audit::Trail::over(db));
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  std::vector<audit::Event> events;
  Status result = action(db, lease.session(), events);
  if (events.empty()) return result;  // nothing to record: rolled back
  auto head = trail.append(lease.session(), events, /*checkpoint=*/false);
  if (!head.ok() && unrecorded_ok && head.error().code == Errc::conflict) {
    std::fprintf(stderr,
                 "gridseal: warning: the audit trail refuses appends (%s); this decision is not "
                 "recorded (the anchor reset records who made it)\n",
                 head.error().message().c_str());
    GS_TRY(tx.commit());
    return result;
  }
  if (!head.ok()) return Error(head.error().code, "audit trail: " + head.error().message());
  GS_TRY(tx.commit());
  // Without the confirmation the anchor stays "pending" (weaker evidence, still consistent).
  (void)trail.confirm(lease.session());
  return result;
}

namespace {
const Gate* g_current = nullptr;
}  // namespace

const Gate* current_gate() noexcept { return g_current; }

void Gate::install(CLI::App& app) {
  if (mode_ == Mode::run || mode_ == Mode::quorum) g_current = this;
  std::function<void(CLI::App*)> walk = [&](CLI::App* a) {
    auto named = a->get_subcommands([](CLI::App* s) { return !s->get_name().empty(); });
    if (named.empty()) {
      std::string path = path_of(a);
      if (path.empty() || is_open(path)) return;
      a->add_option("--operator", name_, "operator name (an enrolled operator signs this command)");
      a->add_option("--operator-key", key_file_,
                    "the operator's P-256 private key: a PEM file, or pkcs11:token=…;object=…?module-path=…"
                    "&pin-source=file:… for a key on their token (default: $GS_OPERATOR_KEY)");
      a->add_option("--request", request_file_,
                    "a request signed elsewhere (`gridseal operators sign-request`)");
      return;
    }
    for (CLI::App* s : named) walk(s);
  };
  walk(&app);
  app.parse_complete_callback([this, &app] { check(app); });
}

void Gate::set_signing(std::string operator_name, std::string key_file, Bytes nonce,
                       std::string out_file) {
  name_ = std::move(operator_name);
  key_file_ = std::move(key_file);
  sign_nonce_ = std::move(nonce);
  sign_out_ = std::move(out_file);
}

void Gate::set_quorum(std::int64_t request_id, Bytes digest) {
  quorum_id_ = request_id;
  quorum_digest_ = std::move(digest);
}

std::string Gate::actor() const {
  if (mode_ == Mode::quorum) return "approval:" + std::to_string(quorum_id_);
  return accepted_ ? "operator:" + *accepted_ : "bootstrap:" + unix_user();
}

void set_current_gate(const Gate* g) noexcept { g_current = g; }

std::string current_actor() {
  return g_current != nullptr ? g_current->actor() : "bootstrap:" + unix_user();
}

Result<Gate::Command> capture_command(const std::vector<std::string>& argv) {
  if (argv.empty()) return Error(Errc::invalid_argument, "no command given");
  CLI::App inner{"gridseal"};
  int inner_code = kExitOk;
  Gate g(Gate::Mode::capture);
  build_app(inner, inner_code, g);
  std::vector<std::string> rev(argv.rbegin(), argv.rend());
  try {
    inner.parse(rev);
  } catch (const GateStop& e) {
    if (e.code() == kExitOk) return g.command();
    std::string what = e.what();
    if (what.starts_with("gridseal: ")) what.erase(0, 10);
    return Error(Errc::invalid_argument, what);
  } catch (const CLI::Error& e) {
    return Error(Errc::invalid_argument, std::string("the command: ") + e.what());
  }
  return Error(Errc::invalid_argument, "not a state-changing gridseal command");
}

Result<std::optional<policy::Policy>> quorum_policy(const config::Config& cfg, db::Db& db) {
  // Once a policy was applied (`gridseal policy apply`, itself under quorum), its recorded
  // content rules: editing the file on disk changes nothing until the change is approved.
  auto applied = policy::newest_applied(db, /*with_content=*/true);
  if (!applied.ok()) {
    return Error(applied.error().code, "the applied policy: " + applied.error().message());
  }
  if (*applied) {
    auto p = policy::parse_policy((*applied)->content,
                                  "applied policy #" + std::to_string((*applied)->seq));
    if (!p.ok()) return Error(p.error().code, "the quorum policy: " + p.error().message());
    return std::optional<policy::Policy>(std::move(p).value());
  }
  if (cfg.policy.empty()) return std::optional<policy::Policy>{};
  auto p = policy::load_policy(cfg.policy);
  if (!p.ok()) return Error(p.error().code, "the quorum policy: " + p.error().message());
  return std::optional<policy::Policy>(std::move(p).value());
}

void Gate::check(CLI::App& app) {
  CLI::App* leaf = &app;
  while (true) {
    auto subs = leaf->get_subcommands();
    if (subs.empty()) break;
    leaf = subs.front();
  }
  const std::string path = path_of(leaf);
  if (path.empty()) return;
  if (is_open(path)) {
    if (mode_ == Mode::sign) {
      throw GateStop(kExitUsage, "gridseal: `" + path + "` is read-only: nothing to sign");
    }
    if (mode_ == Mode::capture) {
      throw GateStop(kExitUsage, "gridseal: `" + path + "` is read-only: nothing to approve");
    }
    return;
  }
  const op::CommandRule* rule = op::rule_for(path);
  if (rule == nullptr) rule = &op::unclassified_rule();
  const std::int64_t now = now_s();
  auto cargs = canonical_args(leaf, *rule);
  if (path == "approvals request") {
    // The requester's signature binds what is to be approved, files included.
    std::vector<std::string> inner;
    for (const auto& [n, v] : cargs) {
      if (n == "COMMAND") inner.push_back(v);
    }
    auto c = capture_command(inner);
    if (!c.ok()) throw GateStop(kExitUsage, "gridseal: approvals request: " + c.error().detail);
    auto d = approvals::command_digest(c->path, c->args);
    if (!d.ok()) throw GateStop(kExitUsage, "gridseal: " + d.error().detail);
    cargs.emplace_back("COMMAND#digest", to_hex(*d));
  }
  const CLI::Option* conf_opt = leaf->get_option_no_throw("--config");
  {
    op::Request shown{"quorum", path, cargs, {}, 0};
    (void)op::canonicalize(shown);
    parsed_ = {path, shown.args, rule->roles,
               conf_opt != nullptr && conf_opt->count() > 0 ? conf_opt->as<std::string>() : "",
               op::describe(shown)};
  }

  if (mode_ == Mode::capture) {
    if (path.starts_with("approvals ")) {
      throw GateStop(kExitUsage, "gridseal: `" + path + "` cannot itself be put to a quorum");
    }
    if (!name_.empty() || !key_file_.empty() || !request_file_.empty()) {
      throw GateStop(kExitUsage,
                     "gridseal: the command to approve must not carry --operator, "
                     "--operator-key or --request: sign the approval request itself");
    }
    throw GateStop(kExitOk, "");
  }
  if (mode_ == Mode::quorum) {
    auto d = approvals::command_digest(path, cargs);
    if (!d.ok() || *d != quorum_digest_) {
      throw GateStop(kExitRefused, "gridseal: refused: approval request " +
                                       std::to_string(quorum_id_) +
                                       ": the command's arguments or files changed since it was "
                                       "requested (its digest differs)");
    }
    command_ = path;
    return;
  }

  if (mode_ == Mode::sign) {
    op::Request r{name_, path, cargs, sign_nonce_, now};
    if (auto st = op::canonicalize(r); !st.ok()) {
      throw GateStop(kExitUsage, "gridseal: " + st.error().detail);
    }
    auto sig = sign_as_operator(r, key_file_);
    if (!sig.ok()) throw GateStop(kExitFailed, "gridseal: " + sig.error().message());
    const std::string text = op::request_file_text(r, *sig);
    int fd = ::open(sign_out_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) throw GateStop(kExitFailed, "gridseal: cannot create " + sign_out_ + " (exists?)");
    bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    ::close(fd);
    if (!ok) throw GateStop(kExitFailed, "gridseal: cannot write " + sign_out_);
    std::printf("signed `%s` as %s into %s\n", op::describe(r).c_str(), name_.c_str(),
                sign_out_.c_str());
    throw GateStop(kExitOk, "");
  }

  config_path_ = conf_opt != nullptr ? conf_opt->as<std::string>() : "conf/gridseal.toml";
  auto cfg = config::load(config_path_);
  if (!cfg.ok()) return;  // the command reports its own configuration error and changes nothing
  const std::string bootstrap =
      "gridseal: warning: bootstrap mode: no operator is enrolled, so `" + path +
      "` runs unsigned; enrol the first security officer (`gridseal hsm init --officer NAME "
      "--officer-pubkey FILE`) to require signed operator requests\n";
  std::error_code ec;
  if (!std::filesystem::exists(cfg->store.path, ec)) {
    std::fputs(bootstrap.c_str(), stderr);
    return;
  }
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  if (!store.ok()) {
    throw GateStop(kExitFailed, "gridseal: refused: cannot read the operator registry: " +
                                    store.error().message());
  }
  op::Registry reg(store->db());
  auto count = reg.active_count();
  if (!count.ok()) {
    throw GateStop(kExitFailed, "gridseal: refused: cannot read the operator registry: " +
                                    count.error().message());
  }
  if (*count == 0) {
    std::fputs(bootstrap.c_str(), stderr);
    return;
  }

  op::Request r;
  EcSignature sig{};
  std::string mismatch;
  if (!request_file_.empty()) {
    auto parsed = op::parse_request_file(read_text(request_file_));
    if (!parsed.ok()) throw GateStop(kExitRefused, "gridseal: refused: " + parsed.error().detail);
    r = std::move(parsed->first);
    sig = parsed->second;
    op::Request local{r.operator_name, path, cargs, r.nonce, r.time};
    if (auto st = op::canonicalize(local); !st.ok()) {
      throw GateStop(kExitUsage, "gridseal: " + st.error().detail);
    }
    if (!name_.empty() && name_ != r.operator_name) {
      mismatch = "--operator " + name_ + " but the request is signed by " + r.operator_name;
    } else if (local.command != r.command || local.args != r.args) {
      mismatch = "the request was signed for `" + op::describe(r) + "`, not `" +
                 op::describe(local) + "`";
    }
  } else if (!name_.empty()) {
    std::string key_path = key_file_;
    if (key_path.empty()) {
      const char* env = std::getenv("GS_OPERATOR_KEY");
      if (env != nullptr) key_path = env;
    }
    if (key_path.empty()) {
      throw GateStop(kExitUsage,
                     "gridseal: --operator needs --operator-key FILE (or GS_OPERATOR_KEY=FILE)");
    }
    r = {name_, path, cargs, {}, now};
    if (auto st = op::canonicalize(r); !st.ok()) {
      throw GateStop(kExitUsage, "gridseal: " + st.error().detail);
    }
    // A key file is read before the nonce is spent, so that a typo costs nothing.
    std::optional<HostEcKey> file_key;
    if (!op::is_token_uri(key_path)) {
      auto key = op::load_private_key(key_path);
      if (!key.ok()) throw GateStop(kExitFailed, "gridseal: " + key.error().detail);
      file_key.emplace(std::move(key).value());
    }
    auto nonce = reg.issue_nonce(op::kDefaultNonceTtl, now);
    if (!nonce.ok()) throw GateStop(kExitFailed, "gridseal: " + nonce.error().message());
    r.nonce = nonce->value;
    auto s = file_key ? op::sign_request(r, *file_key) : sign_as_operator(r, key_path);
    if (!s.ok()) throw GateStop(kExitFailed, "gridseal: " + s.error().message());
    sig = *s;
  } else {
    r = {"", path, cargs, {}, now};
    mismatch = "`" + path + "` changes state and needs a signed request from an operator (" +
               op::roles_text(rule->roles) +
               "): --operator NAME --operator-key FILE, or --request FILE";
  }

  // A command the policy puts to a quorum runs only through `approvals` (refused and recorded
  // here like any other refusal; its nonce is consumed).
  auto qp = quorum_policy(*cfg, store->db());
  if (!qp.ok()) throw GateStop(kExitFailed, "gridseal: refused: " + qp.error().message());
  if (mismatch.empty() && *qp && !path.starts_with("approvals ")) {
    if (const policy::QuorumRule* q = (*qp)->quorum_for(path, cargs)) {
      mismatch = "`" + path + "` needs " + std::to_string(q->approvals) + " approvals from " +
                 op::to_string(q->role) + "s (policy [[quorum]] \"" + q->name +
                 "\"): gridseal approvals request -- " + path + " ...";
    }
  }

  std::string role;
  Status decision = audited(*cfg, store->db(), [&](db::Db&, std::vector<audit::Event>& events) {
    Status st;
    if (!mismatch.empty()) {
      if (r.nonce.size() == op::kNonceSize) (void)reg.consume_nonce(r.nonce, now);
      st = Status(Errc::conflict, mismatch);
    } else {
      auto who = op::authorize(reg, r, sig, *rule, now);
      if (who.ok()) {
        role = op::to_string(who->role);
      } else {
        st = std::move(who).error();
      }
    }
    events.push_back(decision_event(r, st.ok(), role, st.ok() ? "" : st.error().detail));
    return st;
  }, /*unrecorded_ok=*/path == "audit reset-anchor");
  if (!decision.ok()) {
    throw GateStop(kExitRefused, "gridseal: refused: " + decision.error().detail);
  }
  accepted_ = r.operator_name;
  command_ = path;
  request_ = r;
  signature_ = sig;
  role_ = role;
  std::fprintf(stderr, "gridseal: operator %s (%s) authorized `%s`\n", r.operator_name.c_str(),
               role.c_str(), path.c_str());
}

void Gate::finish(int exit_code) {
  if (!accepted_) return;
  auto cfg = config::load(config_path_);
  if (!cfg.ok()) return;
  auto store = store::KeyStore::open(cfg->store.path, {.create = false});
  Status st = store.ok() ? audited(*cfg, store->db(),
                                   [&](db::Db&, std::vector<audit::Event>& events) {
                                     audit::Detail d;
                                     d.add("exit_code", exit_code);
                                     events.push_back({0, "operator:" + *accepted_,
                                                       "operator_command_done", command_,
                                                       d.str()});
                                     return Status{};
                                   })
                         : Status(store.error());
  if (!st.ok()) {
    std::fprintf(stderr, "gridseal: warning: the outcome of `%s` is not in the audit trail: %s\n",
                 command_.c_str(), st.error().message().c_str());
  }
}

}  // namespace gs::cli
