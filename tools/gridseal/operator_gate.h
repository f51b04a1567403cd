// The operator gate of the `gridseal` CLI: after parsing and before any command runs, a
// state-changing command must carry a signed request from an enrolled operator whose role allows
// it (src/operators.h). The decision, the nonce it consumes and its audit record commit together.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "gridseal/bytes.h"
#include "hsm/session.h"
#include "src/audit.h"
#include "src/config.h"
#include "src/host_ecdsa.h"
#include "src/operators.h"
#include "src/policy.h"
#include "src/sqlite.h"

namespace gs::cli {

// Thrown by the gate to stop the parse before the command's callback runs; main() prints
// `what()` (when not empty) and exits with `code`.
class GateStop : public std::runtime_error {
 public:
  GateStop(int code, const std::string& what) : std::runtime_error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

class Gate;
// The gate of this process's CLI (Mode::run), for commands that record who ran them.
const Gate* current_gate() noexcept;
// Who runs the current command, for the records it writes: current_gate()->actor(), or
// "bootstrap:<unix user>" outside the CLI's gate.
std::string current_actor();
// Replaces it (a quorum run installs its own gate and puts the outer one back after).
void set_current_gate(const Gate* g) noexcept;

class Gate {
 public:
  enum class Mode : std::uint8_t {
    run,      // the normal CLI: verify before the command runs
    sign,     // `operators sign-request`: build and sign the request, write it, run nothing
    capture,  // `approvals request`: record the command's path and canonical arguments, run nothing
    quorum,   // `approvals approve`: run a command its quorum approved (set_quorum)
  };

  // A parsed state-changing command: what Mode::capture records, and what Mode::run accepted.
  struct Command {
    std::string path;  // "rollover start"
    std::vector<std::pair<std::string, std::string>> args;  // canonical (signed) arguments
    std::uint8_t roles = 0;       // roles its rule allows (src/operators.h)
    std::string config;           // its --config value, empty when not given
    std::string description;      // "rollover start --all=true ..."
  };
  explicit Gate(Mode mode = Mode::run) : mode_(mode) {}

  // Adds --operator/--operator-key/--request to every state-changing leaf command of `app` and
  // installs the check as `app`'s parse-complete callback (it runs before any sub-command's).
  void install(CLI::App& app);

  // For Mode::sign: the operator, key file, nonce (hex), and the file to write.
  void set_signing(std::string operator_name, std::string key_file, Bytes nonce,
                   std::string out_file);

  // After the command ran: appends its outcome to the audit trail when a signed request was
  // accepted (best effort: a failure is reported on stderr).
  void finish(int exit_code);

  // For Mode::quorum: the approval request being run and the digest (approvals::command_digest)
  // that the command's arguments must still give.
  void set_quorum(std::int64_t request_id, Bytes digest);

  // Who runs this command, for records the command writes itself: "operator:<name>" once a
  // signed request was accepted, "approval:<id>" for a command run by its quorum, else
  // "bootstrap:<unix user>".
  std::string actor() const;
  bool authorized() const noexcept { return accepted_.has_value(); }

  // Mode::capture: the command parsed. Mode::run: the command accepted.
  const Command& command() const noexcept { return parsed_; }
  // Mode::run, once authorized(): the signed request, its signature and the operator's role.
  const operators::Request& accepted_request() const noexcept { return request_; }
  const EcSignature& accepted_signature() const noexcept { return signature_; }
  const std::string& accepted_role() const noexcept { return role_; }

 private:
  void check(CLI::App& app);

  Mode mode_;
  std::string name_, key_file_, request_file_;
  Bytes sign_nonce_;
  std::string sign_out_;
  std::string config_path_;
  std::string command_;
  std::optional<std::string> accepted_;  // operator name
  Command parsed_;
  operators::Request request_;
  EcSignature signature_{};
  std::string role_;
  std::int64_t quorum_id_ = 0;
  Bytes quorum_digest_;
};

// Parses `argv` (a gridseal command line without the program name) with the whole command tree
// in Mode::capture. Refused: read-only commands, the `approvals` commands themselves, operator
// options inside (--operator, --operator-key, --request), usage errors.
Result<Gate::Command> capture_command(const std::vector<std::string>& argv);

// The [[quorum]] rules in force for the store `db` of `cfg`: those of the newest policy applied
// with `gridseal policy apply` (src/policy_record.h), else, before any was applied, those of the
// policy file named by `policy` in the configuration. Neither: no rules (nullopt). An unreadable
// or invalid policy is an error: state-changing commands then fail closed.
Result<std::optional<policy::Policy>> quorum_policy(const config::Config& cfg, db::Db& db);

// The whole `gridseal` command tree (main.cc): sign-request parses a command with it.
void build_app(CLI::App& app, int& exit_code, Gate& gate);

// Runs `action` and appends the audit events it returns in one BEGIN IMMEDIATE transaction on
// `db`, through the configured HSM (the trail's anchor). When `action` fails, its events (a
// refusal, with whatever the refusal itself must keep, such as a consumed nonce) are still
// committed; with no events nothing is. Returns the action's status, or the audit's failure.
// `unrecorded_ok`: when the trail refuses the append because it was tampered with (Errc::conflict,
// the state `audit reset-anchor` exists to resolve), the action's own writes are committed
// without the record, and a warning says so.
Status audited(const config::Config& cfg, db::Db& db,
               const std::function<Status(db::Db&, std::vector<audit::Event>&)>& action,
               bool unrecorded_ok = false);
// The same, with `action` also given the HSM session the trail uses: for a command whose HSM
// work (a key generated, a statement signed) must happen inside the transaction that records it
// (one PKCS#11 module per process: it cannot open the HSM a second time).
Status audited_hsm(
    const config::Config& cfg, db::Db& db,
    const std::function<Status(db::Db&, hsm::Session&, std::vector<audit::Event>&)>& action,
    bool unrecorded_ok = false);

// The Unix user running the CLI (for bootstrap and unsigned actors).
std::string unix_user();

}  // namespace gs::cli
