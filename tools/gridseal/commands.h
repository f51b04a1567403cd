// Sub-command registration for the `gridseal` CLI: one register_* function per command group.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

#include "gridseal/result.h"

namespace gs::cli {

// Exit codes shared by every command: 0 all well, 1 a checked thing failed, 2 usage error,
// 3 an operator request refused (unsigned, wrongly signed, replayed, expired, role).
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitRefused = 3;

class Gate;

// Shared by the commands (cli_util.cc). "gridseal: <what>" on stderr; returns kExitFailed.
int fail(const std::string& what);
// UTC seconds now, and as ISO 8601 ("2026-11-26T10:00:00Z").
std::int64_t now_s();
std::string utc(std::int64_t t);
// What to tell the operator about `e`: its detail alone when it has one (a refusal's own words),
// else the whole message.
std::string error_text(const Error& e);

// Each group adds its sub-commands to `app`. A sub-command's callback stores its exit code in
// `exit_code` (CLI11 callbacks cannot return one).
void register_c1222(CLI::App& app, int& exit_code);
void register_hsm(CLI::App& app, int& exit_code);
void register_meters(CLI::App& app, int& exit_code);
void register_receipts(CLI::App& app, int& exit_code);
void register_audit(CLI::App& app, int& exit_code);
void register_rollover(CLI::App& app, int& exit_code);
// `policy apply|show`: approved SES policies (policy_cmd.cc).
void register_policy(CLI::App& app, int& exit_code);
// `approvals …`: M-of-N quorum requests; request/approve need the gate's verified signature.
void register_approvals(CLI::App& app, int& exit_code, Gate& gate);
// `grants issue|list|revoke`: signed rate-limit grants for SES clients (grants_cmd.cc).
void register_grants(CLI::App& app, int& exit_code);
// `cmdkeys list|generate|replace|statement|retire`: command keys and MT-2044 statements.
void register_cmdkeys(CLI::App& app, int& exit_code);
// `operators …`: enrol/remove need the gate for who signed (operator_gate.h).
void register_operators(CLI::App& app, int& exit_code, Gate& gate);

}  // namespace gs::cli
