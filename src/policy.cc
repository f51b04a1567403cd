// SES policy: TOML loading with key-naming errors, command classification, token buckets.
#include "src/policy.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <cmath>
#include <new>
#include <set>
#include <toml++/toml.h>

#include "src/invocation_ids.h"
#include "src/toml_text.h"

namespace gs::policy {

namespace {

constexpr std::uint32_t kMaxWindow = 30U * 24 * 3600;  // 30 days
constexpr std::uint32_t kMaxSkew = 3600;
constexpr std::size_t kMaxClients = 4096;
constexpr std::size_t kMaxGroups = 65536;
constexpr std::size_t kMaxListEntries = 4096;
constexpr std::size_t kMaxQuorumRules = 256;
constexpr std::uint32_t kMaxQuorumApprovals = 16;
constexpr std::uint32_t kMaxQuorumExpiry = 7U * 24 * 3600;

struct Ctx {
  std::string file;
  Error err(const std::string& key, const std::string& what) const {
    return Error(Errc::invalid_argument, file + ": " + key + ": " + what);
  }
};

Status check_keys(const Ctx& cx, const toml::table& t, const std::string& prefix,
                  const std::set<std::string>& allowed) {
  for (const auto& [k, v] : t) {
    (void)v;
    if (!allowed.contains(std::string(k.str()))) {
      return cx.err(prefix + std::string(k.str()), "unknown key");
    }
  }
  return {};
}

const toml::table* sub_table(const toml::table& t, const char* key) {
  const toml::node* n = t.get(key);
  return n == nullptr ? nullptr : n->as_table();
}

Status need_table(const Ctx& cx, const toml::table& t, const char* key, const std::string& name) {
  const toml::node* n = t.get(key);
  if (n != nullptr && n->as_table() == nullptr) return cx.err(name, "must be a table");
  return {};
}

Status get_u32(const Ctx& cx, const toml::table& t, const char* key, const std::string& name,
               std::uint32_t lo, std::uint32_t hi, std::uint32_t& out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return {};
  auto v = n->value<std::int64_t>();
  if (!v || !n->is_integer()) return cx.err(name, "must be an integer");
  if (*v < lo || *v > hi) {
    return cx.err(name, "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  }
  out = static_cast<std::uint32_t>(*v);
  return {};
}

Status get_string(const Ctx& cx, const toml::table& t, const char* key, const std::string& name,
                  std::string& out, bool required) {
  const toml::node* n = t.get(key);
  if (n == nullptr) {
    if (required) return cx.err(name, "is required");
    return {};
  }
  auto v = n->value<std::string>();
  if (!v || !n->is_string()) return cx.err(name, "must be a string");
  out = *v;
  return {};
}

Result<CommandClass> class_named(const Ctx& cx, std::string_view s, const std::string& name) {
  auto c = c1222::parse_command_class(s);
  if (!c.ok()) {
    return cx.err(name, "unknown command class \"" + std::string(s) +
                            "\" (read, write, connect_disconnect, demand_response, "
                            "key_management, firmware, time)");
  }
  return *c;
}

// "SP-26" / "MP-5" (procedures) or "ST-64" / "MT-40" (tables): number | 0x0800 for M.
Result<std::uint16_t> parse_numbered(const Ctx& cx, std::string_view s, char kind,
                                     const std::string& name) {
  if (s.size() < 4 || (s[0] != 'S' && s[0] != 'M') || s[1] != kind || s[2] != '-') {
    return cx.err(name, std::string("must look like S") + kind + "-<n> or M" + kind + "-<n>");
  }
  std::uint32_t n = 0;
  for (std::size_t i = 3; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9' || n > 0x7FF) return cx.err(name, "bad number");
    n = n * 10 + static_cast<std::uint32_t>(s[i] - '0');
  }
  if (n > 0x7FF) return cx.err(name, "number above 2047");
  return static_cast<std::uint16_t>(n | (s[0] == 'M' ? kMfgProcedure : 0));
}

Status parse_limit(const Ctx& cx, const toml::table& t, const char* key, const std::string& name,
                   RateLimit& out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return {};
  const toml::table* lt = n->as_table();
  if (lt == nullptr) return cx.err(name, "must be a table { count, per, burst }");
  GS_TRY(check_keys(cx, *lt, name + ".", {"count", "per", "burst"}));
  if (lt->get("count") == nullptr) return cx.err(name + ".count", "is required");
  GS_TRY(get_u32(cx, *lt, "count", name + ".count", 1, 10'000'000, out.count));
  GS_TRY(get_u32(cx, *lt, "per", name + ".per", 1, 86400 * 7, out.per_s));
  GS_TRY(get_u32(cx, *lt, "burst", name + ".burst", 1, 10'000'000, out.burst));
  return {};
}

Status parse_class_list(const Ctx& cx, const toml::table& t, const std::string& prefix, char kind,
                        std::map<std::uint16_t, CommandClass>& out,
                        const std::set<std::string>& extra_keys) {
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    if (extra_keys.contains(key)) continue;
    const std::string name = prefix + key;
    GS_ASSIGN(CommandClass c, class_named(cx, key, name));
    const toml::array* arr = v.as_array();
    if (arr == nullptr) return cx.err(name, "must be an array of strings");
    if (arr->size() > kMaxListEntries) return cx.err(name, "too many entries");
    for (std::size_t i = 0; i < arr->size(); ++i) {
      const std::string ename = name + "[" + std::to_string(i) + "]";
      auto s = (*arr)[i].value<std::string>();
      if (!s || !(*arr)[i].is_string()) return cx.err(ename, "must be a string");
      GS_ASSIGN(std::uint16_t id, parse_numbered(cx, *s, kind, ename));
      if (!out.emplace(id, c).second) return cx.err(ename, "\"" + *s + "\" listed twice");
    }
  }
  return {};
}

// [[quorum]]: which `gridseal` commands need M approvals (src/approvals.h).
Status parse_quorum(const Ctx& cx, const toml::node& n, std::vector<QuorumRule>& out) {
  const toml::array* arr = n.as_array();
  if (arr == nullptr) return cx.err("quorum", "must be an array of tables ([[quorum]])");
  if (arr->size() > kMaxQuorumRules) return cx.err("quorum", "too many rules");
  std::set<std::string> names;
  for (std::size_t i = 0; i < arr->size(); ++i) {
    const std::string name = "quorum[" + std::to_string(i) + "]";
    const toml::table* qt = (*arr)[i].as_table();
    if (qt == nullptr) return cx.err(name, "must be a table");
    GS_TRY(check_keys(cx, *qt, name + ".", {"name", "command", "when", "role", "approvals",
                                             "expires"}));
    QuorumRule q;
    GS_TRY(get_string(cx, *qt, "command", name + ".command", q.command, true));
    const operators::CommandRule* rule = operators::rule_for(q.command);
    if (rule == nullptr || q.command.starts_with("approvals ")) {
      return cx.err(name + ".command",
                    "\"" + q.command + "\" is not a state-changing gridseal command that a quorum "
                    "can approve (see `gridseal operators roles`)");
    }
    q.name = q.command;
    GS_TRY(get_string(cx, *qt, "name", name + ".name", q.name, false));
    if (q.name.empty() || q.name.size() > 64) {
      return cx.err(name + ".name", "must be 1..64 characters");
    }
    if (!names.insert(q.name).second) return cx.err(name + ".name", "used twice");
    if (const toml::node* w = qt->get("when")) {
      const toml::array* wa = w->as_array();
      if (wa == nullptr || wa->size() > 16) {
        return cx.err(name + ".when", "must be an array of at most 16 argument names");
      }
      for (std::size_t j = 0; j < wa->size(); ++j) {
        auto a = (*wa)[j].value<std::string>();
        if (!a || !(*wa)[j].is_string() || a->empty() || a->size() > 64) {
          return cx.err(name + ".when[" + std::to_string(j) + "]",
                        "must be an argument name such as \"--all\"");
        }
        q.when.push_back(*a);
      }
    }
    std::string role;
    GS_TRY(get_string(cx, *qt, "role", name + ".role", role, true));
    auto r = operators::role_from(role);
    if (!r) {
      return cx.err(name + ".role", "must be security-officer, key-custodian or operator");
    }
    if (*r == operators::Role::auditor || !operators::allows(*rule, *r)) {
      return cx.err(name + ".role", "\"" + role + "\" may not run `" + q.command + "` (" +
                                        operators::roles_text(rule->roles) + " may)");
    }
    q.role = *r;
    GS_TRY(get_u32(cx, *qt, "approvals", name + ".approvals", 2, kMaxQuorumApprovals,
                   q.approvals));
    GS_TRY(get_u32(cx, *qt, "expires", name + ".expires", 60, kMaxQuorumExpiry, q.expires_s));
    out.push_back(std::move(q));
  }
  return {};
}

Result<Policy> parse_root(const Ctx& cx, const toml::table& root, ByteView base_oid) {
  Policy p;
  p.source = cx.file;
  const ByteView base = base_oid.empty() ? c1222::default_base_oid() : base_oid;
  GS_TRY(check_keys(cx, root, "",
                    {"clock_skew", "invocation_ids", "rate_limits", "classes", "procedures",
                     "table_writes", "client", "demand_response_group", "quorum"}));
  GS_TRY(get_u32(cx, root, "clock_skew", "clock_skew", 0, kMaxSkew, p.clock_skew_s));

  GS_TRY(need_table(cx, root, "invocation_ids", "invocation_ids"));
  if (const toml::table* t = sub_table(root, "invocation_ids")) {
    GS_TRY(check_keys(cx, *t, "invocation_ids.", {"peak_rate", "max_block_age"}));
    std::uint32_t rate = static_cast<std::uint32_t>(p.peak_rate);
    GS_TRY(get_u32(cx, *t, "peak_rate", "invocation_ids.peak_rate", 1, 100'000'000, rate));
    p.peak_rate = rate;
    GS_TRY(get_u32(cx, *t, "max_block_age", "invocation_ids.max_block_age", 1, 86400,
                   p.max_block_age_s));
  }
  GS_TRY(need_table(cx, root, "rate_limits", "rate_limits"));
  if (const toml::table* t = sub_table(root, "rate_limits")) {
    GS_TRY(check_keys(cx, *t, "rate_limits.", {"meter_slots"}));
    GS_TRY(get_u32(cx, *t, "meter_slots", "rate_limits.meter_slots", 1, 1U << 24,
                   p.meter_rate_slots));
  }

  GS_TRY(need_table(cx, root, "classes", "classes"));
  if (const toml::table* t = sub_table(root, "classes")) {
    for (const auto& [k, v] : *t) {
      const std::string name = "classes." + std::string(k.str());
      GS_ASSIGN(CommandClass c, class_named(cx, k.str(), name));
      const toml::table* ct = v.as_table();
      if (ct == nullptr) return cx.err(name, "must be a table");
      GS_TRY(check_keys(cx, *ct, name + ".", {"window", "fleet", "meter"}));
      ClassRules& r = p.classes[class_index(c)];
      GS_TRY(get_u32(cx, *ct, "window", name + ".window", 1, kMaxWindow, r.window_s));
      GS_TRY(parse_limit(cx, *ct, "fleet", name + ".fleet", r.fleet));
      GS_TRY(parse_limit(cx, *ct, "meter", name + ".meter", r.meter));
    }
  }

  GS_TRY(need_table(cx, root, "procedures", "procedures"));
  if (const toml::table* t = sub_table(root, "procedures")) {
    std::string order = "little";
    GS_TRY(get_string(cx, *t, "byte_order", "procedures.byte_order", order, false));
    if (order == "little") {
      p.procedure_order = c1222::ByteOrder::little;
    } else if (order == "big") {
      p.procedure_order = c1222::ByteOrder::big;
    } else {
      return cx.err("procedures.byte_order", "must be \"little\" or \"big\"");
    }
    std::string unlisted = "refuse";
    GS_TRY(get_string(cx, *t, "unlisted", "procedures.unlisted", unlisted, false));
    if (unlisted != "refuse") {
      GS_ASSIGN(CommandClass c, class_named(cx, unlisted, "procedures.unlisted"));
      p.unlisted_procedure = c;
    }
    GS_TRY(parse_class_list(cx, *t, "procedures.", 'P', p.procedures,
                            {"byte_order", "unlisted"}));
  }
  GS_TRY(need_table(cx, root, "table_writes", "table_writes"));
  if (const toml::table* t = sub_table(root, "table_writes")) {
    GS_TRY(parse_class_list(cx, *t, "table_writes.", 'T', p.table_writes, {}));
    for (const auto& [table, c] : p.table_writes) {
      (void)c;
      const bool profile = table == c1222::kTableSignedAuthorization ||
                           table == c1222::kTableKeyUpdate ||
                           table == c1222::kTableSignedReceipt ||
                           table == c1222::kTableChallenge ||
                           table == c1222::kTableCommandKeyReplacement;
      if (profile || table == c1222::kProcedureTable) {
        return cx.err("table_writes", "ST-7 and MT-2040..2044 are classified by gridseal itself");
      }
    }
  }

  if (const toml::node* n = root.get("client")) {
    const toml::array* arr = n->as_array();
    if (arr == nullptr) return cx.err("client", "must be an array of tables ([[client]])");
    if (arr->size() > kMaxClients) return cx.err("client", "too many clients");
    std::set<std::string> subjects;
    for (std::size_t i = 0; i < arr->size(); ++i) {
      const std::string name = "client[" + std::to_string(i) + "]";
      const toml::table* ct = (*arr)[i].as_table();
      if (ct == nullptr) return cx.err(name, "must be a table");
      GS_TRY(check_keys(cx, *ct, name + ".", {"name", "subject", "classes"}));
      ClientRules c;
      GS_TRY(get_string(cx, *ct, "subject", name + ".subject", c.subject, true));
      if (c.subject.empty()) return cx.err(name + ".subject", "must not be empty");
      c.name = c.subject;
      GS_TRY(get_string(cx, *ct, "name", name + ".name", c.name, false));
      if (!subjects.insert(c.subject).second) {
        return cx.err(name + ".subject", "subject configured twice");
      }
      const toml::node* cl = ct->get("classes");
      if (cl == nullptr) return cx.err(name + ".classes", "is required");
      const toml::array* ca = cl->as_array();
      if (ca == nullptr) return cx.err(name + ".classes", "must be an array of class names");
      for (std::size_t j = 0; j < ca->size(); ++j) {
        const std::string ename = name + ".classes[" + std::to_string(j) + "]";
        auto s = (*ca)[j].value<std::string>();
        if (!s || !(*ca)[j].is_string()) return cx.err(ename, "must be a string");
        GS_ASSIGN(CommandClass cc, class_named(cx, *s, ename));
        c.allowed[class_index(cc)] = true;
      }
      p.clients.push_back(std::move(c));
    }
  }

  if (const toml::node* n = root.get("demand_response_group")) {
    const toml::array* arr = n->as_array();
    if (arr == nullptr) {
      return cx.err("demand_response_group", "must be an array of tables");
    }
    if (arr->size() > kMaxGroups) return cx.err("demand_response_group", "too many groups");
    for (std::size_t i = 0; i < arr->size(); ++i) {
      const std::string name = "demand_response_group[" + std::to_string(i) + "]";
      const toml::table* gt = (*arr)[i].as_table();
      if (gt == nullptr) return cx.err(name, "must be a table");
      GS_TRY(check_keys(cx, *gt, name + ".", {"name", "title", "max_event_window"}));
      GroupRules g;
      std::string title;
      GS_TRY(get_string(cx, *gt, "title", name + ".title", title, true));
      auto t = c1222::OwnedApTitle::parse(title);
      if (!t.ok()) return cx.err(name + ".title", "not an AP title: " + t.error().detail);
      g.title = std::move(*t);
      g.absolute_title = g.title.view().absolute(base);
      g.name = title;
      GS_TRY(get_string(cx, *gt, "name", name + ".name", g.name, false));
      if (gt->get("max_event_window") == nullptr) {
        return cx.err(name + ".max_event_window", "is required");
      }
      GS_TRY(get_u32(cx, *gt, "max_event_window", name + ".max_event_window", 1, kMaxWindow,
                     g.max_event_window_s));
      if (p.group(g.absolute_title) != nullptr) return cx.err(name + ".title", "listed twice");
      Status w = ids::check_window(g.max_event_window_s, p.peak_rate, p.max_block_age_s);
      if (!w.ok()) return cx.err(name + ".max_event_window", w.error().detail);
      p.groups.push_back(std::move(g));
    }
  }

  if (const toml::node* n = root.get("quorum")) GS_TRY(parse_quorum(cx, *n, p.quorum));

  for (std::size_t i = 0; i < kClassCount; ++i) {
    const auto c = static_cast<CommandClass>(i);
    Status w = ids::check_window(p.classes[i].window_s, p.peak_rate, p.max_block_age_s);
    if (!w.ok()) {
      return cx.err(std::string("classes.") + c1222::command_class_name(c) + ".window",
                    w.error().detail);
    }
  }
  return p;
}

}  // namespace

bool QuorumRule::applies(std::string_view path,
                         const std::vector<std::pair<std::string, std::string>>& args) const {
  if (path != command) return false;
  for (const auto& w : when) {
    if (std::none_of(args.begin(), args.end(), [&](const auto& a) { return a.first == w; })) {
      return false;
    }
  }
  return true;
}

const QuorumRule* Policy::quorum_for(
    std::string_view path, const std::vector<std::pair<std::string, std::string>>& args) const {
  for (const auto& q : quorum) {
    if (q.applies(path, args)) return &q;
  }
  return nullptr;
}

const ClientRules* Policy::client(std::string_view subject) const noexcept {
  for (const auto& c : clients) {
    if (c.subject == subject) return &c;
  }
  return nullptr;
}

const GroupRules* Policy::group(ByteView absolute_title) const noexcept {
  for (const auto& g : groups) {
    if (g.absolute_title.size() == absolute_title.size() &&
        std::equal(g.absolute_title.begin(), g.absolute_title.end(), absolute_title.begin())) {
      return &g;
    }
  }
  return nullptr;
}

Validity Policy::validity(CommandClass c, std::uint32_t now) const noexcept {
  const std::uint32_t nb = now > clock_skew_s ? now - clock_skew_s : 0;
  const std::uint64_t na = std::uint64_t{nb} + classes[class_index(c)].window_s;
  return {nb, static_cast<std::uint32_t>(std::min<std::uint64_t>(na, UINT32_MAX))};
}

Validity Policy::broadcast_validity(const GroupRules& g, std::uint32_t now) const noexcept {
  Validity v = validity(CommandClass::demand_response, now);
  const std::uint64_t cap = std::uint64_t{v.not_before} + g.max_event_window_s;
  if (v.not_after > cap) v.not_after = static_cast<std::uint32_t>(cap);
  return v;
}

Result<Policy> parse_policy(std::string_view toml_text, const std::string& source,
                            ByteView base_oid) {
  GS_ASSIGN(toml::table root, gs::toml_text::parse(toml_text, source));
  return parse_root(Ctx{source}, root, base_oid);
}

Result<Policy> load_policy(const std::string& path, ByteView base_oid) {
  GS_ASSIGN(std::string text, gs::toml_text::read_file(path));
  return parse_policy(text, path, base_oid);
}

// ---- classification ---------------------------------------------------------------------------

namespace {

bool is_profile_table(std::uint16_t raw) {
  return raw == c1222::kTableSignedAuthorization || raw == c1222::kTableKeyUpdate ||
         raw == c1222::kTableSignedReceipt;
}

std::uint16_t table_key(const c1222::TableId& t) {
  return static_cast<std::uint16_t>(t.number() | (t.manufacturer() ? 0x0800 : 0));
}

// The class of one write to `t`, or an error for tables only gridseal writes.
Result<CommandClass> write_class(const c1222::TableId& t, const Policy& p,
                                 const ClassifyOptions& opt) {
  const std::uint16_t key = table_key(t);
  if (key == c1222::kTableKeyUpdate && opt.allow_key_update) return CommandClass::key_management;
  if (is_profile_table(key)) {
    return Error(Errc::bad_value, t.name() + " is written only by gridseal");
  }
  if (key == c1222::kTableChallenge) return CommandClass::key_management;
  // An MT-2044 command-key replacement statement: the SES relays it only when gs-revocation's
  // signature verifies (cmdkeys::check_replacement_writes).
  if (key == c1222::kTableCommandKeyReplacement) return CommandClass::key_management;
  if (key == c1222::kProcedureTable) {
    return Error(Errc::bad_value, "ST-7 write that is not a procedure call");
  }
  auto it = p.table_writes.find(key);
  return it == p.table_writes.end() ? CommandClass::write : it->second;
}

// nullopt: a read (or session service that combines with anything).
Result<std::optional<CommandClass>> request_class(const c1222::Request& r, const Policy& p,
                                                  const ClassifyOptions& opt) {
  using R = Result<std::optional<CommandClass>>;
  using namespace c1222;
  if (const auto* w = std::get_if<FullWriteRequest>(&r)) {
    GS_ASSIGN(CommandClass c, write_class(w->table, p, opt));
    return R(std::optional(c));
  }
  if (const auto* w = std::get_if<PartialWriteOffsetRequest>(&r)) {
    GS_ASSIGN(CommandClass c, write_class(w->table, p, opt));
    return R(std::optional(c));
  }
  if (const auto* w = std::get_if<PartialWriteIndexRequest>(&r)) {
    GS_ASSIGN(CommandClass c, write_class(w->table, p, opt));
    return R(std::optional(c));
  }
  if (const auto* pr = std::get_if<ProcedureRequest>(&r)) {
    const auto key = static_cast<std::uint16_t>(pr->number() | (pr->manufacturer() ? 0x0800 : 0));
    auto it = p.procedures.find(key);
    if (it != p.procedures.end()) return R(std::optional(it->second));
    if (p.unlisted_procedure) return R(std::optional(*p.unlisted_procedure));
    return R(Errc::bad_value, std::string(pr->manufacturer() ? "MP-" : "SP-") +
                                  std::to_string(pr->number()) + " is not an allowed procedure");
  }
  if (std::holds_alternative<FullReadRequest>(r) ||
      std::holds_alternative<PartialReadIndexRequest>(r) ||
      std::holds_alternative<PartialReadOffsetRequest>(r) ||
      std::holds_alternative<DefaultReadRequest>(r) ||
      std::holds_alternative<IdentifyRequest>(r) || std::holds_alternative<WaitRequest>(r) ||
      std::holds_alternative<LogonRequest>(r) || std::holds_alternative<LogoffRequest>(r) ||
      std::holds_alternative<TerminateRequest>(r) ||
      std::holds_alternative<DisconnectRequest>(r)) {
    return R(std::optional<CommandClass>());
  }
  if (std::holds_alternative<SecurityRequest>(r) ||
      std::holds_alternative<AuthenticateRequest>(r)) {
    return R(std::optional(CommandClass::write));
  }
  return R(Errc::unsupported,
           std::string("service ") + request_code_name(request_code(r)) + " is not relayed");
}

bool is_receipt_read(const c1222::Request& r) {
  const auto* fr = std::get_if<c1222::FullReadRequest>(&r);
  return fr != nullptr && fr->table.raw == c1222::kTableSignedReceipt;
}

bool reads_profile_table(const c1222::Request& r) {
  if (const auto* x = std::get_if<c1222::FullReadRequest>(&r)) {
    return x->table.raw == c1222::kTableSignedReceipt;
  }
  if (const auto* x = std::get_if<c1222::PartialReadOffsetRequest>(&r)) {
    return x->table.raw == c1222::kTableSignedReceipt;
  }
  if (const auto* x = std::get_if<c1222::PartialReadIndexRequest>(&r)) {
    return x->table.raw == c1222::kTableSignedReceipt;
  }
  return false;
}

}  // namespace

Result<Classification> classify(const std::vector<c1222::DecodedService>& services,
                                const Policy& p, const ClassifyOptions& opt) {
  if (services.empty()) return {Errc::missing_element, "command without services"};
  std::optional<CommandClass> cls;
  Classification out;
  out.services = services.size();
  for (std::size_t i = 0; i < services.size(); ++i) {
    const auto& s = services[i];
    if (s.is_response()) {
      return {Errc::unsupported, "a response service in a command", s.offset};
    }
    const auto& req = std::get<c1222::Request>(s.value);
    if (reads_profile_table(req)) {
      if (!is_receipt_read(req) || i + 1 != services.size()) {
        return {Errc::bad_value, "MT-2042 may only be read whole, as the last service", s.offset};
      }
      out.ends_with_receipt_read = true;
      continue;
    }
    auto rc = request_class(req, p, opt);
    if (!rc.ok()) {
      Error e = std::move(rc).error();
      e.offset = s.offset;
      return e;
    }
    if (!rc->has_value()) continue;
    if (cls && *cls != **rc) {
      return {Errc::bad_value,
              std::string("command mixes classes ") + c1222::command_class_name(*cls) + " and " +
                  c1222::command_class_name(**rc),
              s.offset};
    }
    cls = **rc;
  }
  out.command_class = cls.value_or(CommandClass::read);
  return out;
}

Result<Classification> classify_message(const c1222::Message& m, const Policy& p,
                                        const ClassifyOptions& opt) {
  GS_ASSIGN(c1222::Epsem e, c1222::split_epsem(m.epsem, m.epsem_offset));
  if (c1222::security_mode(e.control) != c1222::SecurityMode::cleartext) {
    return {Errc::unsupported, "command must arrive in security mode 0", m.epsem_offset};
  }
  GS_ASSIGN(auto spans, c1222::split_services(e.body, m.epsem_offset + 1 + (e.ed_class ? 4 : 0)));
  c1222::ServiceOptions so;
  so.strict = true;
  so.procedure_order = p.procedure_order;
  GS_ASSIGN(auto decoded, c1222::decode_services(spans, {}, so));
  return classify(decoded, p, opt);
}

// ---- rate limits ------------------------------------------------------------------------------

static_assert(std::atomic_ref<std::int64_t>::is_always_lock_free);

const char* admission_name(Admission a) noexcept {
  switch (a) {
    case Admission::allowed: return "allowed";
    case Admission::fleet_limited: return "fleet_rate_limited";
    case Admission::meter_limited: return "meter_rate_limited";
  }
  return "unknown";
}

Result<RateLimiter> RateLimiter::create(std::uint32_t meter_slots, bool shared) {
  if (meter_slots == 0 || meter_slots > (1U << 24)) {
    return {Errc::invalid_argument, "meter_slots must be 1..16777216"};
  }
  const std::size_t count = kClassCount + kClassCount * std::size_t{meter_slots};
  const std::size_t bytes = count * sizeof(std::int64_t);
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return {Errc::too_large, "cannot map rate-limit buckets"};
  // Untouched pages read as zero (an empty bucket) and cost no memory until used.
  return RateLimiter(static_cast<std::int64_t*>(mem), count, meter_slots, shared);
}

Result<RateLimiter> RateLimiter::create_memfd(std::uint32_t meter_slots, int* fd_out) {
  if (meter_slots == 0 || meter_slots > (1U << 24)) {
    return {Errc::invalid_argument, "meter_slots must be 1..16777216"};
  }
  const std::size_t count = kClassCount + kClassCount * std::size_t{meter_slots};
  const int fd = memfd_create("gridseal-rate-limits", MFD_CLOEXEC);
  if (fd < 0) return {Errc::os_failure, std::string("memfd_create: ") + std::strerror(errno)};
  if (ftruncate(fd, static_cast<off_t>(count * sizeof(std::int64_t))) != 0) {
    ::close(fd);
    return {Errc::too_large, "cannot size the rate-limit buckets"};
  }
  auto r = attach(fd, meter_slots);
  if (!r.ok()) {
    ::close(fd);
    return r;
  }
  *fd_out = fd;
  return r;
}

Result<RateLimiter> RateLimiter::attach(int fd, std::uint32_t meter_slots) {
  if (meter_slots == 0 || meter_slots > (1U << 24)) {
    return {Errc::invalid_argument, "meter_slots must be 1..16777216"};
  }
  const std::size_t count = kClassCount + kClassCount * std::size_t{meter_slots};
  const std::size_t bytes = count * sizeof(std::int64_t);
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<std::size_t>(st.st_size) != bytes) {
    return {Errc::invalid_argument, "rate-limit memory does not match meter_rate_slots"};
  }
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mem == MAP_FAILED) return {Errc::too_large, "cannot map rate-limit buckets"};
  return RateLimiter(static_cast<std::int64_t*>(mem), count, meter_slots, true);
}

RateLimiter::RateLimiter(RateLimiter&& o) noexcept
    : cells_(o.cells_), count_(o.count_), slots_(o.slots_), shared_(o.shared_) {
  o.cells_ = nullptr;
  o.count_ = 0;
}

RateLimiter::~RateLimiter() {
  if (cells_ != nullptr) munmap(cells_, count_ * sizeof(std::int64_t));
}

namespace {

std::int64_t interval_ns(const RateLimit& l) {
  return static_cast<std::int64_t>(l.per_s) * 1'000'000'000 / l.count;
}

// GCRA: allowed when the new theoretical arrival time is at most burst intervals ahead of now.
bool take(std::int64_t& cell, const RateLimit& l, std::int64_t now) {
  std::atomic_ref<std::int64_t> tat(cell);
  const std::int64_t t = std::max<std::int64_t>(interval_ns(l), 1);
  const std::int64_t burst = l.burst != 0 ? l.burst : l.count;
  const std::int64_t limit = t * burst;
  std::int64_t cur = tat.load(std::memory_order_relaxed);
  for (;;) {
    const std::int64_t next = std::max(cur, now) + t;
    if (next - now > limit) return false;
    if (tat.compare_exchange_weak(cur, next, std::memory_order_acq_rel)) return true;
  }
}

void give_back(std::int64_t& cell, const RateLimit& l) {
  std::atomic_ref<std::int64_t>(cell).fetch_sub(std::max<std::int64_t>(interval_ns(l), 1), std::memory_order_acq_rel);
}

std::uint64_t fnv1a(ByteView b) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::uint8_t x : b) {
    h ^= x;
    h *= 0x100000001b3ULL;
  }
  return h;
}

}  // namespace

Admission RateLimiter::admit(const Policy& p, CommandClass c, ByteView meter_title,
                             std::int64_t now_ns) {
  const std::size_t ci = class_index(c);
  if (ci >= kClassCount || cells_ == nullptr) return Admission::fleet_limited;
  const ClassRules& r = p.classes[ci];
  std::int64_t* meter_cell = nullptr;
  if (r.meter.enabled()) {
    const std::size_t slot = static_cast<std::size_t>(fnv1a(meter_title) % slots_);
    meter_cell = &cells_[kClassCount + ci * slots_ + slot];
    if (!take(*meter_cell, r.meter, now_ns)) return Admission::meter_limited;
  }
  if (r.fleet.enabled() && !take(cells_[ci], r.fleet, now_ns)) {
    if (meter_cell != nullptr) give_back(*meter_cell, r.meter);
    return Admission::fleet_limited;
  }
  return Admission::allowed;
}

}  // namespace gs::policy
