// Applied SES policies (issue 7): `gridseal policy apply` records each approved
// policy file (its SHA-256, size, content, who applied it and when) and
// gridseal-sesd, with ses.require_approved_policy, serves only a file whose
// SHA-256 is the newest one applied.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/host_ecdsa.h"
#include "src/policy.h"
#include "src/sqlite.h"

namespace gs::policy {

// The largest policy file read (the same bound as load_policy).
inline constexpr std::size_t kMaxPolicyFile = std::size_t{1} << 24;

// A policy file as read once: the bytes that were hashed are the bytes that
// were parsed, so a file changed between the two can never be served under
// another file's approval.
struct PolicyFile {
  Policy policy;
  std::string text;
  Sha256Digest sha256{};
};

// Reads `path` (at most kMaxPolicyFile bytes), hashes and parses it (errors
// name the key, as load_policy's do).
Result<PolicyFile> read_policy_file(const std::string &path,
                                    ByteView base_oid = {});

struct AppliedPolicy {
  std::int64_t seq = 0;
  Sha256Digest sha256{};
  std::int64_t size = 0;
  std::string content;         // filled by newest_applied(.., true) only
  std::string applied_by;      // "operator:<name>" or "bootstrap:<unix user>"
  std::int64_t applied_at = 0; // UTC seconds
};

// Appends `text` as the newest applied policy (inside the caller's transaction,
// with its audit record). Returns the new record (without content).
Result<AppliedPolicy> record_applied(db::Db &db, std::string_view text,
                                     const Sha256Digest &sha,
                                     std::string_view applied_by,
                                     std::int64_t now);

// The newest applied policy, or nullopt when none was ever applied.
Result<std::optional<AppliedPolicy>> newest_applied(db::Db &db,
                                                    bool with_content = false);

// What gridseal-sesd decides for a policy file whose SHA-256 is `sha`:
//   approved    it is the newest applied policy;
//   bootstrap   no policy was ever applied (a fresh install): served, with a
//   warning, until the
//               first `gridseal policy apply`;
// otherwise Errc::conflict whose detail names both hashes and the command that
// approves it.
enum class Approval : std::uint8_t { approved, bootstrap };
Result<Approval> check_approved(db::Db &db, const std::string &path,
                                const Sha256Digest &sha);

} // namespace gs::policy
