// Rate-limit grants: canonical encoding, signature check, the rate_grants table and the SES
// ledger of reserved units (see grants.h).
#include "src/grants.h"

#include <openssl/rand.h>

#include <algorithm>
#include <cstdio>
#include <limits>

namespace gs::grants {

namespace {

constexpr const char* kColumns =
    "SELECT id, client, class, units, not_before, not_after, signature, reserved, reason, "
    "issued_by, issued_at, revoked_at, revoked_by FROM rate_grants ";

void put_be(Bytes& b, std::uint64_t v, int bytes) {
  for (int i = bytes - 1; i >= 0; --i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

bool is_hex_id(std::string_view id) {
  if (id.size() != 2 * kIdSize) return false;
  return std::all_of(id.begin(), id.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// Rows are read as stored; values that do not fit are clamped so that check_terms() (and so the
// signature check) refuses them instead of a narrowing cast giving them another meaning.
Grant read_row(const db::Stmt& st) {
  Grant g;
  g.id = st.text(0);
  g.client = st.text(1);
  const std::int64_t cls = st.int64(2);
  g.command_class = static_cast<CommandClass>(cls >= 0 && cls <= 255 ? cls : 255);
  const std::int64_t units = st.int64(3);
  g.units = static_cast<std::uint32_t>(std::clamp<std::int64_t>(
      units, 0, std::numeric_limits<std::uint32_t>::max()));
  g.not_before = st.int64(4);
  g.not_after = st.int64(5);
  g.signature = st.blob(6);
  g.reserved = static_cast<std::uint32_t>(std::clamp<std::int64_t>(
      st.int64(7), 0, std::numeric_limits<std::uint32_t>::max()));
  g.reason = st.text(8);
  g.issued_by = st.text(9);
  g.issued_at = st.int64(10);
  if (!st.is_null(11)) g.revoked_at = st.int64(11);
  g.revoked_by = st.text(12);
  return g;
}

Result<std::vector<Grant>> read_all(db::Stmt& st, std::size_t limit) {
  std::vector<Grant> out;
  for (;;) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done || out.size() >= limit) break;
    out.push_back(read_row(st));
  }
  return out;
}

// Ids of rows written by someone else may hold anything: never print those into the log.
std::string printable_id(const std::string& id) {
  return is_hex_id(id) ? id : std::string("(malformed id)");
}

bool same_terms(const Grant& a, const Grant& b) {
  return a.id == b.id && a.client == b.client && a.command_class == b.command_class &&
         a.units == b.units && a.not_before == b.not_before && a.not_after == b.not_after &&
         a.signature == b.signature;
}

}  // namespace

Result<std::string> new_id() {
  std::uint8_t b[kIdSize];
  if (RAND_bytes(b, static_cast<int>(kIdSize)) != 1) {
    return Error(Errc::crypto_failure, "no randomness for a grant id");
  }
  return to_hex(ByteView(b, kIdSize));
}

Status check_terms(const Grant& g) {
  if (!is_hex_id(g.id)) return {Errc::invalid_argument, "grant id must be 16 lowercase hex digits"};
  if (g.client.empty() || g.client.size() > kMaxClient) {
    return {Errc::invalid_argument,
            "client name must be 1.." + std::to_string(kMaxClient) + " bytes"};
  }
  for (char ch : g.client) {
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7F) {
      return {Errc::invalid_argument, "client name has a control character"};
    }
  }
  if (static_cast<std::uint8_t>(g.command_class) > c1222::kMaxCommandClass) {
    return {Errc::invalid_argument, "unknown command class"};
  }
  if (g.units == 0 || g.units > kMaxUnits) {
    return {Errc::invalid_argument, "units must be 1.." + std::to_string(kMaxUnits)};
  }
  if (g.not_before < 0 || g.not_after <= g.not_before ||
      g.not_after - g.not_before > kMaxLifetime) {
    return {Errc::invalid_argument, "lifetime must be 1.." + std::to_string(kMaxLifetime) +
                                        " seconds (not_before < not_after)"};
  }
  return {};
}

Result<Bytes> signing_input(const Grant& g) {
  GS_TRY(check_terms(g));
  Bytes b(kDomain, kDomain + 4);
  auto id = from_hex(g.id);
  if (!id || id->size() != kIdSize) return Error(Errc::invalid_argument, "grant id");
  b.insert(b.end(), id->begin(), id->end());
  b.push_back(static_cast<std::uint8_t>(g.client.size()));
  b.insert(b.end(), g.client.begin(), g.client.end());
  b.push_back(static_cast<std::uint8_t>(g.command_class));
  put_be(b, g.units, 4);
  put_be(b, static_cast<std::uint64_t>(g.not_before), 8);
  put_be(b, static_cast<std::uint64_t>(g.not_after), 8);
  return b;
}

Result<Sha256Digest> digest(const Grant& g) {
  GS_ASSIGN(Bytes in, signing_input(g));
  return sha256(in);
}

Status verify(const Grant& g, const HostEcKey& gs_audit) {
  GS_ASSIGN(Sha256Digest d, digest(g));
  if (g.signature.size() != kEcSignatureSize) {
    return {Errc::bad_signature, "grant signature is not 64 bytes"};
  }
  return gs_audit.verify(d, g.signature);
}

// ---- GrantStore -------------------------------------------------------------------------------

Status GrantStore::insert(const Grant& g) {
  GS_TRY(check_terms(g));
  if (g.reason.size() > kMaxReason) {
    return {Errc::invalid_argument, "reason above " + std::to_string(kMaxReason) + " bytes"};
  }
  GS_ASSIGN(auto existing, find(g.id));
  if (existing) return {Errc::conflict, "grant " + g.id + " exists"};
  GS_ASSIGN(auto st, db_->prepare(
                         "INSERT INTO rate_grants (id, client, class, units, not_before, "
                         "not_after, signature, reserved, reason, issued_by, issued_at, "
                         "revoked_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10, '')"));
  st.bind(1, g.id).bind(2, g.client);
  st.bind(3, std::int64_t{static_cast<std::uint8_t>(g.command_class)});
  st.bind(4, std::int64_t{g.units}).bind(5, g.not_before).bind(6, g.not_after);
  st.bind(7, ByteView(g.signature)).bind(8, g.reason).bind(9, g.issued_by).bind(10, g.issued_at);
  return st.run();
}

Result<std::optional<Grant>> GrantStore::find(std::string_view id) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kColumns) + "WHERE id = ?1"));
  st.bind(1, id);
  GS_ASSIGN(db::Step s, st.step());
  if (s == db::Step::done) return std::optional<Grant>();
  return std::optional<Grant>(read_row(st));
}

Result<std::vector<Grant>> GrantStore::list(bool all, std::int64_t now, std::size_t limit) {
  GS_ASSIGN(auto st,
            db_->prepare(std::string(kColumns) +
                         (all ? "ORDER BY issued_at DESC, id LIMIT ?2"
                              : "WHERE revoked_at IS NULL AND not_after >= ?1 "
                                "ORDER BY issued_at DESC, id LIMIT ?2")));
  if (!all) st.bind(1, now);
  st.bind(2, static_cast<std::int64_t>(std::min<std::size_t>(limit, INT32_MAX)));
  return read_all(st, limit);
}

Status GrantStore::revoke(std::string_view id, std::string_view by, std::int64_t now) {
  GS_ASSIGN(auto g, find(id));
  if (!g) return {Errc::not_found, "no grant " + std::string(id)};
  if (g->revoked()) {
    return {Errc::conflict, "grant " + g->id + " was revoked already (by " + g->revoked_by + ")"};
  }
  GS_ASSIGN(auto st, db_->prepare("UPDATE rate_grants SET revoked_at = ?2, revoked_by = ?3 "
                                  "WHERE id = ?1 AND revoked_at IS NULL"));
  st.bind(1, id).bind(2, now).bind(3, by);
  return st.run();
}

Result<std::vector<Grant>> GrantStore::unexpired(std::int64_t now, std::size_t limit) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kColumns) +
                                  "WHERE revoked_at IS NULL AND not_after >= ?1 "
                                  "ORDER BY not_after, id LIMIT ?2"));
  st.bind(1, now).bind(2, static_cast<std::int64_t>(std::min<std::size_t>(limit, INT32_MAX)));
  return read_all(st, limit);
}

Result<std::uint32_t> GrantStore::reserve(const Grant& g, std::uint32_t want, std::uint32_t spread,
                                          std::int64_t now) {
  if (want == 0 || spread == 0) return {Errc::invalid_argument, "want and spread must be >= 1"};
  GS_ASSIGN(auto tx, db::Transaction::begin(*db_));
  GS_ASSIGN(auto sel, db_->prepare("SELECT reserved FROM rate_grants WHERE id = ?1 AND "
                                   "revoked_at IS NULL AND not_after >= ?2 AND signature = ?3"));
  sel.bind(1, g.id).bind(2, now).bind(3, ByteView(g.signature));
  GS_ASSIGN(db::Step s, sel.step());
  if (s == db::Step::done) return std::uint32_t{0};  // rolled back: nothing written
  const std::int64_t reserved = std::max<std::int64_t>(sel.int64(0), 0);
  sel.reset();
  if (reserved >= g.units) return std::uint32_t{0};
  const auto left = static_cast<std::uint32_t>(g.units - reserved);
  const std::uint32_t n = std::min({want, std::max<std::uint32_t>(1, left / spread), left});
  GS_ASSIGN(auto up, db_->prepare("UPDATE rate_grants SET reserved = ?2 WHERE id = ?1"));
  up.bind(1, g.id).bind(2, reserved + n);
  GS_TRY(up.run());
  GS_TRY(tx.commit());
  return n;
}

// ---- GrantLedger ------------------------------------------------------------------------------

Result<std::unique_ptr<GrantLedger>> GrantLedger::open(const std::string& db_path,
                                                       ByteView gs_audit_point,
                                                       const LedgerOptions& opt) {
  if (opt.block == 0 || opt.block > 1024 || opt.spread == 0 || opt.spread > 64 ||
      opt.refresh_s < 1) {
    return {Errc::invalid_argument, "grant ledger options out of range"};
  }
  auto key = HostEcKey::from_public(gs_audit_point);
  if (!key.ok()) return Error(key.error().code, "gs-audit public key: " + key.error().message());
  db::OpenOptions o;
  o.create = false;
  GS_ASSIGN(db::Db db, db::Db::open(db_path, o));
  return std::unique_ptr<GrantLedger>(
      new GrantLedger(std::move(db), std::move(key).value(), opt));
}

void GrantLedger::invalidate() {
  std::lock_guard lock(mu_);
  stale_ = true;
}

LedgerStats GrantLedger::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

void GrantLedger::refresh(std::int64_t now) {
  GrantStore store(db_);
  auto rows = store.unexpired(now, kMaxCached);
  if (!rows.ok()) {
    // Keep what is cached (its units were reserved durably); try again next time.
    ++stats_.store_errors;
    std::fprintf(stderr, "gridseal-sesd: rate-limit grants not re-read: %s\n",
                 rows.error().message().c_str());
    return;
  }
  std::map<std::string, Entry> next;
  for (Grant& g : *rows) {
    auto it = grants_.find(g.id);
    const bool known = it != grants_.end() && same_terms(it->second.grant, g);
    if (!known) {
      Status st = verify(g, key_);
      if (!st.ok()) {
        if (refused_ids_.size() < kMaxCached && refused_ids_.insert(g.id).second) {
          ++stats_.refused;
          std::fprintf(stderr,
                       "gridseal-sesd: rate-limit grant %s refused: %s (not signed by gs-audit "
                       "for these terms)\n",
                       printable_id(g.id).c_str(), st.error().message().c_str());
        }
        continue;
      }
    }
    Entry e;
    if (known) e.local = it->second.local;
    e.exhausted = g.reserved >= g.units;
    e.grant = std::move(g);
    const std::string id = e.grant.id;
    next.emplace(id, std::move(e));
  }
  // Units held for grants that are gone (revoked, expired) are dropped with them.
  grants_ = std::move(next);
  stats_.cached = grants_.size();
  stale_ = false;
  refreshed_at_ = now;
}

std::optional<std::string> GrantLedger::take(std::string_view client, CommandClass c,
                                             std::int64_t now) {
  std::lock_guard lock(mu_);
  if (stale_ || now < refreshed_at_ || now - refreshed_at_ >= opt_.refresh_s) refresh(now);
  std::vector<Entry*> candidates;
  for (auto& [id, e] : grants_) {
    if (e.grant.client == client && e.grant.command_class == c && e.grant.in_window(now)) {
      candidates.push_back(&e);
    }
  }
  if (candidates.empty()) return std::nullopt;
  // The grant that expires first is spent first.
  std::sort(candidates.begin(), candidates.end(), [](const Entry* a, const Entry* b) {
    return a->grant.not_after != b->grant.not_after ? a->grant.not_after < b->grant.not_after
                                                    : a->grant.id < b->grant.id;
  });
  Entry* use = nullptr;
  for (Entry* e : candidates) {
    if (e->local > 0) {
      use = e;
      break;
    }
  }
  if (use == nullptr) {
    GrantStore store(db_);
    for (Entry* e : candidates) {
      if (e->exhausted) continue;
      auto n = store.reserve(e->grant, opt_.block, opt_.spread, now);
      if (!n.ok()) {
        ++stats_.store_errors;
        std::fprintf(stderr, "gridseal-sesd: rate-limit grant %s: no units reserved: %s\n",
                     e->grant.id.c_str(), n.error().message().c_str());
        return std::nullopt;
      }
      if (*n == 0) {
        e->exhausted = true;
        continue;
      }
      e->local = *n;
      ++stats_.blocks_reserved;
      stats_.units_reserved += *n;
      use = e;
      break;
    }
  }
  if (use == nullptr) return std::nullopt;
  --use->local;
  ++stats_.units_used;
  return use->grant.id;
}

}  // namespace gs::grants
