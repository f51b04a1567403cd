// Roles and the command rules table of the operator model (src/operators.h): which role may run
// which state-changing `gridseal` command. Kept apart from the registry and the signed requests,
// so that the policy parser (src/policy.cc, [[quorum]] rules) needs only this.
#include "src/operators.h"

#include <algorithm>
#include <string>

namespace gs::operators {

namespace {

constexpr std::uint8_t bit(Role r) { return static_cast<std::uint8_t>(1U << static_cast<int>(r)); }
constexpr std::uint8_t kSO = bit(Role::security_officer);
constexpr std::uint8_t kKC = bit(Role::key_custodian);
constexpr std::uint8_t kOP = bit(Role::operator_);

// Separation of duties: the security officer manages people and the trail's anchor, the key
// custodian the HSM's keys, operators the fleet. The first `hsm init` is the security officer's.
constexpr CommandRule kRules[] = {
    {"operators enroll", kSO, "--pubkey"},
    {"operators remove", kSO, ""},
    {"audit reset-anchor", kSO, ""},
    {"audit archive", kSO, ""},
    {"hsm init", kSO | kKC, "--officer-pubkey"},
    {"hsm import-transport-key", kKC, ""},
    {"hsm rotate-kek", kKC, ""},
    {"hsm destroy-kek", kKC, ""},
    {"meters import", kOP, "FILE"},
    {"meters revoke", kOP, ""},
    {"meters reinstate", kOP, ""},
    {"policy apply", kSO, "FILE"},
    {"meters challenge", kOP, "--file"},
    {"rollover start", kOP, "--file"},
    {"rollover resume", kOP, ""},
    {"rollover abort", kOP, ""},
    // Rate-limit grants (src/grants.h): traffic beyond the policy's limits is the fleet's.
    {"grants issue", kOP, ""},
    {"grants revoke", kOP, ""},
    // Command keys (src/command_keys.h): key ceremonies, like the KEK's.
    {"cmdkeys generate", kKC, ""},
    {"cmdkeys replace", kKC, ""},
    {"cmdkeys retire", kKC, ""},
    // M-of-N approvals (src/approvals.h): who may ask and sign is checked again against the
    // [[quorum]] rule's role; the auditor only reads.
    {"approvals request", kSO | kKC | kOP, ""},
    {"approvals approve", kSO | kKC | kOP, ""},
    {"approvals cancel", kSO | kKC | kOP, ""},
};
constexpr CommandRule kUnclassified = {"", kSO, ""};

constexpr std::string_view kOpen[] = {
    "hsm status",        "hsm export-pubkey",       "meters list",       "meters show",
    "receipts show",     "rollover status",         "rollover list",     "audit verify",
    "audit export",      "c1222 decode",            "c1222 seal",        "c1222 open",
    "c1222 encode",      "operators list",          "operators roles",   "operators challenge",
    "operators sign-request", "policy show",           "approvals list",    "approvals show",
    "grants list",       "cmdkeys list",            "cmdkeys statement",
};

}  // namespace

const char* to_string(Role r) noexcept {
  switch (r) {
    case Role::security_officer: return "security-officer";
    case Role::key_custodian: return "key-custodian";
    case Role::operator_: return "operator";
    case Role::auditor: return "auditor";
  }
  return "?";
}

std::optional<Role> role_from(std::string_view s) noexcept {
  for (Role r : kAllRoles) {
    if (s == to_string(r)) return r;
  }
  return std::nullopt;
}

bool valid_name(std::string_view name) noexcept {
  if (name.empty() || name.size() > kMaxName) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

std::span<const CommandRule> command_rules() noexcept { return kRules; }
std::span<const std::string_view> open_commands() noexcept { return kOpen; }
const CommandRule& unclassified_rule() noexcept { return kUnclassified; }

const CommandRule* rule_for(std::string_view command) noexcept {
  for (const auto& r : kRules) {
    if (r.command == command) return &r;
  }
  return nullptr;
}

bool allows(const CommandRule& rule, Role r) noexcept { return (rule.roles & bit(r)) != 0; }

std::string roles_text(std::uint8_t roles) {
  std::string out;
  for (Role r : kAllRoles) {
    if ((roles & bit(r)) == 0) continue;
    if (!out.empty()) out += ", ";
    out += to_string(r);
  }
  return out;
}

}  // namespace gs::operators
