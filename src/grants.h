// Rate-limit grants (issue 7): a signed token that lets one SES client send up to N commands of
// one class beyond the policy's rate limits until it expires. `gridseal grants issue` signs it
// with gs-audit in the HSM and stores it (table `rate_grants`); gridseal-sesd verifies the
// signature with gs-audit's public key before it honours one, and spends it in blocks reserved
// in SQLite transactions, so the bound holds across worker processes and kill -9.
//
// Signed (README "Rate-limit grants"):
//   bytes  = "GSG1" || id (8) || u8(len) || client || class (1) || u32(units)
//            || i64(not_before) || i64(not_after)
//   digest = SHA-256(bytes); signature = ECDSA P-256 by gs-audit (r || s, 64 bytes).
//   Integers big-endian; times UTC seconds; class as in DESIGN §3.1 (2 = connect_disconnect).
// Not signed, and so trusted no further than the database: the reason, who issued or revoked
// it, and the count of units handed out (`reserved`). Someone with write access to the database
// alone cannot make or widen a grant, but can un-revoke one or reset its count: the audit trail
// (grant_issued / grant_revoked, and every command sent under a grant carries its id) is where
// that shows.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "c1222/profile.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/host_ecdsa.h"
#include "src/sqlite.h"

namespace gs::grants {

using c1222::CommandClass;

inline constexpr std::uint32_t kMaxUnits = 100000;        // commands one grant allows, at most
inline constexpr std::int64_t kMaxLifetime = 7 * 86400;   // not_after - not_before, at most
inline constexpr std::size_t kMaxClient = 128;            // [[client]] name, bytes
inline constexpr std::size_t kMaxReason = 256;            // bytes
inline constexpr std::size_t kIdSize = 8;                 // random bytes; the id is their hex
inline constexpr std::size_t kMaxCached = 4096;           // unexpired grants an SES worker holds
inline constexpr char kDomain[] = "GSG1";

struct Grant {
  std::string id;  // 16 lowercase hex digits
  std::string client;
  CommandClass command_class = CommandClass::read;
  std::uint32_t units = 0;
  std::int64_t not_before = 0;
  std::int64_t not_after = 0;
  Bytes signature;  // r || s
  // Bookkeeping (not signed).
  std::uint32_t reserved = 0;  // units handed out to SES workers (used or lost in a crash)
  std::string reason;
  std::string issued_by;
  std::int64_t issued_at = 0;
  std::optional<std::int64_t> revoked_at;
  std::string revoked_by;

  bool revoked() const noexcept { return revoked_at.has_value(); }
  // Inside [not_before, not_after] at `now`.
  bool in_window(std::int64_t now) const noexcept { return now >= not_before && now <= not_after; }
};

// A fresh random id (16 hex digits).
Result<std::string> new_id();
// Refuses (Errc::invalid_argument, naming the field) terms outside the bounds above: id not 16
// hex digits, client empty/too long/with control characters, units 0 or above kMaxUnits,
// not_after <= not_before or a lifetime above kMaxLifetime, a class above kMaxCommandClass.
Status check_terms(const Grant& g);
// The signed bytes and their SHA-256 (check_terms first).
Result<Bytes> signing_input(const Grant& g);
Result<Sha256Digest> digest(const Grant& g);
// Errc::bad_signature unless `g.signature` is gs-audit's signature of g's terms.
Status verify(const Grant& g, const HostEcKey& gs_audit);

// The table `rate_grants` on one connection (not thread-safe, like db::Db).
class GrantStore {
 public:
  explicit GrantStore(db::Db& db) : db_(&db) {}

  // Inserts a signed grant (checked, not verified: the CLI just signed it). Errc::conflict when
  // the id exists.
  Status insert(const Grant& g);
  Result<std::optional<Grant>> find(std::string_view id);
  // Newest first, at most `limit`; with `all` false only those neither revoked nor expired.
  Result<std::vector<Grant>> list(bool all, std::int64_t now, std::size_t limit);
  // Errc::not_found for an unknown id, Errc::conflict when already revoked.
  Status revoke(std::string_view id, std::string_view by, std::int64_t now);
  // Unrevoked grants with not_after >= now (exhausted ones too: a worker may still hold units of
  // them), soonest expiry first, at most `limit`.
  Result<std::vector<Grant>> unexpired(std::int64_t now, std::size_t limit);
  // Hands out up to `want` more units of the verified grant `g` in one committed BEGIN
  // IMMEDIATE transaction: min(want, max(1, left / spread), left), where left = g.units (the
  // signed count, not the row's) - reserved, so the last units go out in small blocks and few
  // stay stranded in a worker that gets no more traffic. 0 when none is left, or the row is
  // revoked, expired, gone or no longer carries g's signature. A crash after the commit loses
  // the block, never reissues it: units can be lost, never exceed g.units.
  Result<std::uint32_t> reserve(const Grant& g, std::uint32_t want, std::uint32_t spread,
                                std::int64_t now);

 private:
  db::Db* db_;
};

// ---- the SES side ------------------------------------------------------------------------------

struct LedgerOptions {
  std::uint32_t block = 16;    // units reserved per transaction, at most (1..1024)
  std::uint32_t spread = 4;    // see GrantStore::reserve (1..64)
  std::int64_t refresh_s = 2;  // grants re-read this often (new ones, revocations) (>= 1)
};

struct LedgerStats {
  std::uint64_t units_used = 0;
  std::uint64_t units_reserved = 0;
  std::uint64_t blocks_reserved = 0;
  std::uint64_t refused = 0;        // rows whose signature did not verify (each counted once)
  std::uint64_t store_errors = 0;
  std::uint64_t cached = 0;         // verified, unexpired grants held now
};

// One per SES worker process: the verified grants (re-read every refresh_s seconds, and at the
// next use after invalidate()), and the units this process reserved and has not used. Only the
// requests a rate limit refused come here, so the per-message path stays free of commits: one
// transaction per block of units. Thread-safe (a mutex; a block reservation runs under it).
class GrantLedger {
 public:
  // `db_path`: the store (its own connection); `gs_audit_point`: gs-audit's 65-byte public point
  // read from the HSM (never from the database).
  static Result<std::unique_ptr<GrantLedger>> open(const std::string& db_path,
                                                   ByteView gs_audit_point,
                                                   const LedgerOptions& opt = {});
  // Takes one unit of a valid grant for `client` (its [[client]] name) and class `c` at `now`
  // (UTC seconds): the grant's id, or nullopt when there is none. Rows whose signature does not
  // verify are ignored and logged once to stderr.
  std::optional<std::string> take(std::string_view client, CommandClass c, std::int64_t now);
  // Re-read the grants at the next take() (SIGHUP).
  void invalidate();
  LedgerStats stats() const;

 private:
  struct Entry {
    Grant grant;
    std::uint32_t local = 0;  // reserved by this process, not yet used
    bool exhausted = false;   // the store has none left to hand out
  };
  GrantLedger(db::Db db, HostEcKey key, const LedgerOptions& opt)
      : db_(std::move(db)), key_(std::move(key)), opt_(opt) {}
  void refresh(std::int64_t now);

  mutable std::mutex mu_;
  db::Db db_;
  HostEcKey key_;
  LedgerOptions opt_;
  std::map<std::string, Entry> grants_;  // key: id
  std::set<std::string> refused_ids_;    // logged once
  bool stale_ = true;
  std::int64_t refreshed_at_ = 0;
  LedgerStats stats_;
};

}  // namespace gs::grants
