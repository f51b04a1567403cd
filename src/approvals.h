// M-of-N approvals (issue 7, README "Quorum"): a state-changing `gridseal` command that the
// policy's [[quorum]] names runs only after M distinct operators of the rule's role signed it.
//
// A request stores the command line as given (argv, replayed through the same command tree when
// it runs), its human description, and `digest` = SHA-256 of the canonical operator request of
// the command (src/operators.h request_encoding with operator "quorum", empty nonce, time 0:
// the command path and its canonical arguments, including the SHA-256 of every file argument's
// content).
// What the operators approve is that digest: when the command finally runs, the arguments are
// derived again and must give the same digest (a file edited since is refused).
//
// Each signature is one operator's signed request (`approvals request` by the requester, then
// `approvals approve ID` by each approver), verified by the operator gate before it is stored
// here with its nonce, time and signature. The M-th distinct signature and the claim of the
// single execution commit in one transaction: a request runs at most once, and a crash after the
// claim leaves it `running` (shown as interrupted), never re-run by itself.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/sqlite.h"

namespace gs::approvals {

inline constexpr std::size_t kMaxArgv = 256;             // arguments of the approved command
inline constexpr std::size_t kMaxArgvBytes = 64 * 1024;  // their total size
inline constexpr std::int64_t kMaxPending = 1000;        // open requests at once

enum class State : std::uint8_t { pending, running, done, failed, cancelled };
const char* to_string(State s) noexcept;
std::optional<State> state_from(std::string_view s) noexcept;

struct Signature {
  std::string operator_name;
  std::string role;
  std::int64_t signed_at = 0;
  Bytes nonce;            // the store-issued nonce the request consumed
  std::int64_t time = 0;  // the signer's time in the signed request
  Bytes signature;        // r || s over the operator request (src/operators.h)
};

struct Request {
  std::int64_t id = 0;
  std::string command;            // CLI path
  std::vector<std::string> argv;  // the command line as given
  std::string description;        // "rollover start --all=true --reason=..."
  Bytes digest;                   // 32 bytes
  std::string rule;               // the [[quorum]] rule's name
  std::string role;               // whose signatures count
  std::uint32_t required = 2;     // M
  std::string requested_by;       // operator name
  std::int64_t created_at = 0;
  std::int64_t expires_at = 0;
  State state = State::pending;
  std::string executed_by;
  std::optional<std::int64_t> started_at, finished_at, exit_code;
  std::uint32_t signatures = 0;  // distinct operators so far

  bool expired(std::int64_t now) const noexcept {
    return state == State::pending && now >= expires_at;
  }
  // The state, with "expired" for a pending request past its expiry.
  std::string status_text(std::int64_t now) const;
};

// SHA-256 of the canonical operator request of a command (operator "quorum", no nonce, time 0):
// what a quorum approves.
Result<Bytes> command_digest(std::string_view path,
                             std::vector<std::pair<std::string, std::string>> args);

// Canonical form of argv for the table (u32 big-endian length || bytes, per argument).
Bytes encode_argv(const std::vector<std::string>& argv);
Result<std::vector<std::string>> decode_argv(ByteView b);

class Store {
 public:
  explicit Store(db::Db& db) : db_(&db) {}

  // Inside the caller's transaction: a new pending request with the requester's signature as
  // the first. Errc::busy when kMaxPending requests are open.
  Result<std::int64_t> create(const Request& r, const Signature& first);
  Result<std::optional<Request>> find(std::int64_t id);
  // Newest first; `all`: also finished, cancelled and expired ones. At most `limit`.
  Result<std::vector<Request>> list(bool all, std::int64_t now, std::int64_t limit);
  Result<std::vector<Signature>> signatures(std::int64_t id);

  // Inside the caller's transaction: one more signature. Refused: unknown request
  // (not_found), not pending or expired (conflict), this operator already signed (conflict).
  // Returns the number of distinct signatures now.
  Result<std::uint32_t> add_signature(std::int64_t id, const Signature& s, std::int64_t now);
  // Inside the caller's transaction: pending -> running when it has its M signatures and has not
  // expired. Errc::conflict otherwise (exactly one caller wins).
  Status claim(std::int64_t id, std::string_view executed_by, std::int64_t now);
  // running -> done (exit 0) or failed.
  Status finish(std::int64_t id, int exit_code, std::int64_t now);
  // Inside the caller's transaction: pending -> cancelled.
  Status cancel(std::int64_t id, std::string_view by, std::int64_t now);

 private:
  db::Db* db_;
};

}  // namespace gs::approvals
