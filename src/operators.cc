// Operator registry, nonces and the signed operator request (src/operators.h; the roles and the
// command rules table are in src/operator_roles.cc, the request encoding and request file in
// src/operator_request.cc).
#include "src/operators.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include <array>
#include <fstream>
#include <memory>

#include "src/audit.h"

namespace gs::operators {

namespace {

using PkeyPtr = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;
using BioPtr = std::unique_ptr<BIO, decltype(&BIO_free)>;

Result<std::string> read_small_file(const std::string& path, std::size_t max) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Error(Errc::not_found, "cannot read " + path);
  std::string text;
  text.resize(max + 1);
  f.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(f.gcount()));
  if (text.size() > max) return Error(Errc::too_large, path + ": larger than expected");
  return text;
}

Result<Operator> read_row(db::Stmt& st) {
  Operator o;
  o.name = st.text(0);
  auto role = role_from(st.text(1));
  if (!role) return Error(Errc::storage_failure, "operator " + o.name + ": unknown role");
  o.role = *role;
  o.public_key = st.blob(2);
  o.enrolled_at = st.int64(3);
  o.enrolled_by = st.text(4);
  if (!st.is_null(5)) o.removed_at = st.int64(5);
  o.removed_by = st.text(6);
  return o;
}

constexpr const char* kColumns =
    "SELECT name, role, public_key, enrolled_at, enrolled_by, removed_at, removed_by "
    "FROM operators ";

}  // namespace

Result<Bytes> load_public_key(const std::string& path) {
  GS_ASSIGN(std::string text, read_small_file(path, 16384));
  if (text.find("-----BEGIN PUBLIC KEY-----") == std::string::npos) {
    auto end = text.find_last_not_of(" \r\n\t");
    auto b = from_hex(std::string_view(text).substr(0, end == std::string::npos ? 0 : end + 1));
    if (!b || b->size() != kEcPointSize || !HostEcKey::from_public(*b).ok()) {
      return Error(Errc::bad_value, path + ": neither a PEM P-256 public key nor a 65-byte point");
    }
    return *b;
  }
  BioPtr bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), BIO_free);
  PkeyPtr key(bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr,
              EVP_PKEY_free);
  if (!key) return Error(Errc::bad_value, path + ": not a PEM public key");
  char group[64] = {};
  std::size_t glen = 0;
  if (EVP_PKEY_get_utf8_string_param(key.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                     &glen) != 1 ||
      std::string_view(group) != "prime256v1") {
    return Error(Errc::bad_value, path + ": not an EC P-256 key");
  }
  Bytes point(kEcPointSize);
  std::size_t n = 0;
  if (EVP_PKEY_get_octet_string_param(key.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                      point.size(), &n) != 1 ||
      n != kEcPointSize || !HostEcKey::from_public(point).ok()) {
    return Error(Errc::bad_value, path + ": not an uncompressed P-256 public key");
  }
  return point;
}

Result<HostEcKey> load_private_key(const std::string& path) {
  GS_ASSIGN(std::string text, read_small_file(path, 16384));
  BioPtr bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), BIO_free);
  // No passphrase callback: an encrypted key file fails here instead of prompting.
  PkeyPtr key(bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr,
                                            [](char*, int, int, void*) { return 0; }, nullptr)
                  : nullptr,
              EVP_PKEY_free);
  secure_zero(text.data(), text.size());
  if (!key) return Error(Errc::bad_value, path + ": not an unencrypted PEM private key");
  char group[64] = {};
  std::size_t glen = 0;
  if (EVP_PKEY_get_utf8_string_param(key.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                     &glen) != 1 ||
      std::string_view(group) != "prime256v1") {
    return Error(Errc::bad_value, path + ": not an EC P-256 private key");
  }
  BIGNUM* d = nullptr;
  if (EVP_PKEY_get_bn_param(key.get(), OSSL_PKEY_PARAM_PRIV_KEY, &d) != 1 || d == nullptr) {
    return Error(Errc::bad_value, path + ": no private scalar");
  }
  std::array<std::uint8_t, kEcScalarSize> scalar{};
  int ok = BN_bn2binpad(d, scalar.data(), static_cast<int>(scalar.size()));
  BN_clear_free(d);
  if (ok != static_cast<int>(scalar.size())) {
    return Error(Errc::bad_value, path + ": private scalar out of range");
  }
  auto k = HostEcKey::from_private(scalar);
  secure_zero(scalar.data(), scalar.size());
  if (!k.ok()) return Error(Errc::bad_value, path + ": " + k.error().detail);
  return k;
}

Result<EcSignature> sign_request(const Request& r, const HostEcKey& key) {
  GS_ASSIGN(auto d, request_digest(r));
  return key.sign(d);
}

Result<std::string> file_sha256_hex(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Error(Errc::not_found, "cannot read " + path);
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return Error(Errc::crypto_failure, "SHA-256 unavailable");
  }
  std::array<char, 65536> buf{};
  while (f) {
    f.read(buf.data(), buf.size());
    if (f.gcount() > 0 &&
        EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<std::size_t>(f.gcount())) != 1) {
      return Error(Errc::crypto_failure, "SHA-256 failed");
    }
  }
  if (f.bad()) return Error(Errc::os_failure, "cannot read " + path);
  std::array<std::uint8_t, kSha256Size> out{};
  unsigned n = 0;
  if (EVP_DigestFinal_ex(ctx.get(), out.data(), &n) != 1) {
    return Error(Errc::crypto_failure, "SHA-256 failed");
  }
  return to_hex(out);
}

std::string describe(const Request& r) {
  std::string s = r.command;
  for (const auto& [n, v] : r.args) {
    s += " " + n + "=" + (v.size() > 80 ? v.substr(0, 77) + "..." : v);
  }
  // Arguments from a request file are anybody's bytes: no control characters to the terminal.
  return audit::clip(s, 1024);
}

// ---- Registry ----------------------------------------------------------------------------

Result<std::vector<Operator>> Registry::list(bool include_removed) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kColumns) +
                                  (include_removed ? "" : "WHERE removed_at IS NULL ") +
                                  "ORDER BY name"));
  std::vector<Operator> out;
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    GS_ASSIGN(auto o, read_row(st));
    out.push_back(std::move(o));
  }
  return out;
}

Result<std::optional<Operator>> Registry::find(std::string_view name) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kColumns) + "WHERE name = ?1"));
  st.bind(1, name);
  GS_ASSIGN(db::Step s, st.step());
  if (s == db::Step::done) return std::optional<Operator>{};
  GS_ASSIGN(auto o, read_row(st));
  return std::optional<Operator>(std::move(o));
}

Result<std::int64_t> Registry::active_count(std::optional<Role> role) {
  GS_ASSIGN(auto st, db_->prepare(role ? "SELECT count(*) FROM operators WHERE removed_at IS "
                                         "NULL AND role = ?1"
                                       : "SELECT count(*) FROM operators WHERE removed_at IS NULL"));
  if (role) st.bind(1, std::string_view(to_string(*role)));
  GS_ASSIGN(db::Step s, st.step());
  (void)s;
  return st.int64(0);
}

Status Registry::enroll(const Operator& op) {
  if (!valid_name(op.name)) {
    return {Errc::invalid_argument, "operator name must be 1..64 of A-Z a-z 0-9 . _ -"};
  }
  if (op.public_key.size() != kEcPointSize || !HostEcKey::from_public(op.public_key).ok()) {
    return {Errc::invalid_argument, "operator public key must be a P-256 point"};
  }
  GS_ASSIGN(auto existing, find(op.name));
  if (existing) {
    return {Errc::conflict, "operator '" + op.name + "' " +
                                (existing->active() ? "is already enrolled"
                                                    : "was removed; names are never reused")};
  }
  GS_ASSIGN(auto n, active_count(Role::security_officer));
  if (n == 0 && op.role != Role::security_officer) {
    return {Errc::conflict, "the first operator must be a security-officer"};
  }
  GS_ASSIGN(auto st, db_->prepare("INSERT INTO operators (name, role, public_key, enrolled_at, "
                                  "enrolled_by, removed_by) VALUES (?1, ?2, ?3, ?4, ?5, '')"));
  st.bind(1, op.name).bind(2, std::string_view(to_string(op.role))).bind(3, ByteView(op.public_key));
  st.bind(4, op.enrolled_at).bind(5, op.enrolled_by);
  return st.run();
}

Status Registry::remove(std::string_view name, std::string_view by, std::int64_t now) {
  GS_ASSIGN(auto op, find(name));
  if (!op || !op->active()) {
    return {Errc::not_found, "no enrolled operator '" + std::string(name) + "'"};
  }
  if (op->role == Role::security_officer) {
    GS_ASSIGN(auto n, active_count(Role::security_officer));
    if (n <= 1) {
      return {Errc::conflict, "'" + op->name +
                                  "' is the last security-officer: enrol another one first"};
    }
  }
  GS_ASSIGN(auto st, db_->prepare("UPDATE operators SET removed_at = ?2, removed_by = ?3 "
                                  "WHERE name = ?1 AND removed_at IS NULL"));
  st.bind(1, name).bind(2, now).bind(3, by);
  return st.run();
}

Result<Nonce> Registry::issue_nonce(std::int64_t ttl, std::int64_t now) {
  if (ttl < 1 || ttl > kMaxNonceTtl) {
    return Error(Errc::invalid_argument,
                 "nonce lifetime must be 1.." + std::to_string(kMaxNonceTtl) + " seconds");
  }
  Nonce n;
  n.value.resize(kNonceSize);
  if (RAND_bytes(n.value.data(), static_cast<int>(kNonceSize)) != 1) {
    return Error(Errc::crypto_failure, "no randomness for a nonce");
  }
  n.expires_at = now + ttl;
  GS_ASSIGN(auto tx, db::Transaction::begin(*db_));
  GS_ASSIGN(auto del, db_->prepare("DELETE FROM operator_nonces WHERE expires_at <= ?1"));
  del.bind(1, now);
  GS_TRY(del.run());
  GS_ASSIGN(auto cnt, db_->prepare("SELECT count(*) FROM operator_nonces"));
  GS_ASSIGN(db::Step s, cnt.step());
  (void)s;
  if (cnt.int64(0) >= kMaxOutstandingNonces) {
    return Error(Errc::busy, "too many outstanding operator nonces; retry later");
  }
  cnt.reset();
  GS_ASSIGN(auto ins, db_->prepare(
                          "INSERT INTO operator_nonces (nonce, created_at, expires_at) "
                          "VALUES (?1, ?2, ?3)"));
  ins.bind(1, ByteView(n.value)).bind(2, now).bind(3, n.expires_at);
  GS_TRY(ins.run());
  GS_TRY(tx.commit());
  return n;
}

Status Registry::consume_nonce(ByteView nonce, std::int64_t now) {
  GS_ASSIGN(auto sel, db_->prepare("SELECT expires_at FROM operator_nonces WHERE nonce = ?1"));
  sel.bind(1, nonce);
  GS_ASSIGN(db::Step s, sel.step());
  if (s == db::Step::done) {
    return {Errc::not_found, "nonce unknown or already used (a replayed or foreign request)"};
  }
  std::int64_t expires = sel.int64(0);
  sel.reset();
  GS_ASSIGN(auto del, db_->prepare("DELETE FROM operator_nonces WHERE nonce = ?1"));
  del.bind(1, nonce);
  GS_TRY(del.run());
  if (expires <= now) {
    return {Errc::conflict, "nonce expired " + std::to_string(now - expires) +
                                " s ago: take a fresh one (`gridseal operators challenge`)"};
  }
  return {};
}

Result<Operator> authorize(Registry& reg, const Request& r, const EcSignature& sig,
                           const CommandRule& rule, std::int64_t now) {
  // The nonce goes first and whatever follows: one nonce, one decision.
  Status nonce = r.nonce.size() == kNonceSize
                     ? reg.consume_nonce(r.nonce, now)
                     : Status(Errc::bad_value, "request nonce must be 16 bytes");
  GS_ASSIGN(auto op, reg.find(r.operator_name));
  if (!op) return Error(Errc::not_found, "unknown operator '" + r.operator_name + "'");
  if (!op->active()) {
    return Error(Errc::conflict, "operator '" + op->name + "' was removed by " + op->removed_by);
  }
  if (!allows(rule, op->role)) {
    return Error(Errc::conflict, "operator '" + op->name + "' (" + to_string(op->role) +
                                     ") may not run `" + r.command + "` (needs " +
                                     roles_text(rule.roles) + ")");
  }
  auto key = HostEcKey::from_public(op->public_key);
  if (!key.ok()) return Error(Errc::storage_failure, "stored key of '" + op->name + "' unusable");
  GS_ASSIGN(auto digest, request_digest(r));
  if (!key->verify(digest, sig).ok()) {
    return Error(Errc::bad_signature,
                 "signature does not verify with the key of operator '" + op->name +
                     "' (wrong key, or signed for other arguments)");
  }
  if (!nonce.ok()) return std::move(nonce).error();
  if (r.time < now - kMaxClockSkew - kMaxNonceTtl || r.time > now + kMaxClockSkew) {
    return Error(Errc::conflict, "request time is too far from the appliance's clock");
  }
  return std::move(op).value();
}

}  // namespace gs::operators
