// Command keys and MT-2044 replacement statements: see command_keys.h.
#include "src/command_keys.h"

#include <algorithm>

#include "c1222/services.h"
#include "hsm/ops.h"
#include "src/hsm_context.h"

namespace gs::cmdkeys {

namespace {

bool same(ByteView a, ByteView b) { return std::ranges::equal(a, b); }

constexpr const char* kKeyColumns =
    "SELECT key_id, label, public_key, state, created_by, created_at, retired_by, retired_at "
    "FROM command_keys ";
constexpr const char* kStatementColumns =
    "SELECT seq, trust_slot, key_id, public_key, issued_at, signature, data, issued_by "
    "FROM command_key_statements ";

CommandKey read_key(const db::Stmt& st) {
  CommandKey k;
  k.key_id = static_cast<std::uint8_t>(st.int64(0));
  k.label = st.text(1);
  k.public_key = st.blob(2);
  k.state = st.text(3) == "retired" ? KeyState::retired : KeyState::generated;
  k.created_by = st.text(4);
  k.created_at = st.int64(5);
  k.retired_by = st.text(6);
  if (!st.is_null(7)) k.retired_at = st.int64(7);
  return k;
}

// The stored data bytes are what meters receive: they must decode to the row's own columns.
Result<Statement> read_statement(const db::Stmt& st) {
  Statement s;
  s.data = st.blob(6);
  s.issued_by = st.text(7);
  auto r = c1222::decode_replacement_data(s.data);
  if (!r.ok()) {
    return Error(Errc::storage_failure, "statement " + std::to_string(st.int64(0)) +
                                            ": stored data does not decode: " +
                                            r.error().message());
  }
  s.r = *r;
  if (s.r.sequence != static_cast<std::uint64_t>(st.int64(0)) ||
      s.r.trust_slot != st.int64(1) || s.r.key_id != st.int64(2) ||
      !same(s.r.public_key, st.blob_view(3)) ||
      s.r.issued_at != static_cast<std::uint64_t>(st.int64(4))) {
    return Error(Errc::storage_failure, "statement " + std::to_string(st.int64(0)) +
                                            ": stored data does not match its columns");
  }
  return s;
}

bool label_in_token(hsm::Session& s, const std::string& label, Status& err) {
  for (auto cls : {hsm::ObjectClass::private_key, hsm::ObjectClass::public_key}) {
    auto found = hsm::find_objects(s, cls, label);
    if (!found.ok()) {
      err = std::move(found).error();
      return true;  // unknown: treated as taken
    }
    if (!found->empty()) return true;
  }
  return false;
}

std::string statement_name(std::uint32_t seq) {
  return seq == 0 ? std::string("initial trust from hsm init")
                  : "statement " + std::to_string(seq);
}

}  // namespace

const char* to_string(KeyState s) noexcept {
  return s == KeyState::retired ? "retired" : "generated";
}

std::string label_for(std::uint8_t key_id) { return "gs-cmd-" + std::to_string(key_id); }

std::string fingerprint(ByteView point) {
  auto d = sha256(point);
  return d.ok() ? to_hex(*d) : std::string("?");
}

std::optional<std::uint8_t> TrustSlots::slot_of(std::uint8_t key_id) const noexcept {
  for (std::uint8_t i = 0; i < c1222::kTrustSlotCount; ++i) {
    if (key[i] == key_id) return i;
  }
  return std::nullopt;
}

Result<Sha256Digest> statement_digest(const c1222::CommandKeyReplacement& r) {
  return sha256(c1222::replacement_signed_bytes(r));
}

Status verify_statement(const c1222::CommandKeyReplacement& r, const HostEcKey& revocation) {
  // A statement carrying a point that is not on the curve would be accepted by no meter; refuse
  // it here too rather than sign or relay it.
  if (auto k = HostEcKey::from_public(r.public_key); !k.ok()) {
    return Error(Errc::bad_value, "MT-2044 public key is not a P-256 point");
  }
  GS_ASSIGN(Sha256Digest d, statement_digest(r));
  if (auto st = revocation.verify(d, r.signature); !st.ok()) {
    return Error(Errc::bad_signature,
                 "MT-2044 statement " + std::to_string(r.sequence) +
                     " is not signed by gs-revocation");
  }
  return {};
}

// ---- CommandKeyStore -----------------------------------------------------------------------

Result<std::vector<CommandKey>> CommandKeyStore::list() {
  GS_ASSIGN(auto st, db_->prepare(std::string(kKeyColumns) + "ORDER BY key_id"));
  std::vector<CommandKey> out;
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    out.push_back(read_key(st));
  }
  return out;
}

Result<std::optional<CommandKey>> CommandKeyStore::find(std::uint8_t key_id) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kKeyColumns) + "WHERE key_id = ?1"));
  st.bind(1, std::int64_t{key_id});
  GS_ASSIGN(db::Step s, st.step());
  if (s == db::Step::done) return std::optional<CommandKey>();
  return std::optional<CommandKey>(read_key(st));
}

Result<bool> CommandKeyStore::register_key(std::uint8_t key_id, ByteView point,
                                           std::string_view created_by, std::int64_t now) {
  if (key_id == 0) return Error(Errc::invalid_argument, "command key id 0");
  if (point.size() != kEcPointSize || !HostEcKey::from_public(point).ok()) {
    return Error(Errc::invalid_argument, label_for(key_id) + ": not a P-256 public point");
  }
  GS_ASSIGN(auto existing, find(key_id));
  if (existing) {
    if (same(existing->public_key, point)) return false;
    return Error(Errc::conflict, label_for(key_id) + " is registered with another public key");
  }
  GS_ASSIGN(auto st, db_->prepare("INSERT INTO command_keys (key_id, label, public_key, state, "
                                  "created_by, created_at) VALUES (?1, ?2, ?3, 'generated', ?4, "
                                  "?5)"));
  st.bind(1, std::int64_t{key_id}).bind(2, label_for(key_id)).bind(3, point);
  st.bind(4, created_by).bind(5, now);
  GS_TRY(st.run());
  return true;
}

Result<std::uint8_t> CommandKeyStore::next_free_id(
    const std::function<bool(std::uint8_t)>& taken) {
  GS_ASSIGN(auto keys, list());
  std::array<bool, 256> used{};
  for (const auto& k : keys) used[k.key_id] = true;
  for (unsigned id = kFirstGeneratedId; id <= kMaxKeyId; ++id) {
    const auto i = static_cast<std::uint8_t>(id);
    if (!used[i] && !(taken && taken(i))) return i;
  }
  return Error(Errc::too_large, "every command key id 3..255 is used");
}

Result<TrustSlots> CommandKeyStore::slots() {
  // The newest statement of each slot (seq is the primary key; the index serves the MAX).
  GS_ASSIGN(auto st, db_->prepare("SELECT trust_slot, key_id, seq FROM command_key_statements "
                                  "WHERE seq IN (SELECT MAX(seq) FROM command_key_statements "
                                  "GROUP BY trust_slot)"));
  TrustSlots t;
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    const std::int64_t slot = st.int64(0);
    if (slot < 0 || slot >= c1222::kTrustSlotCount) {
      return Error(Errc::storage_failure, "a statement names trust slot " + std::to_string(slot));
    }
    t.key[static_cast<std::size_t>(slot)] = static_cast<std::uint8_t>(st.int64(1));
    t.seq[static_cast<std::size_t>(slot)] = static_cast<std::uint32_t>(st.int64(2));
  }
  return t;
}

Result<std::optional<Statement>> CommandKeyStore::statement(std::uint32_t seq) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kStatementColumns) + "WHERE seq = ?1"));
  st.bind(1, std::int64_t{seq});
  GS_ASSIGN(db::Step s, st.step());
  if (s == db::Step::done) return std::optional<Statement>();
  GS_ASSIGN(Statement out, read_statement(st));
  return std::optional<Statement>(std::move(out));
}

Result<std::uint32_t> CommandKeyStore::last_sequence() {
  GS_ASSIGN(auto st, db_->prepare("SELECT COALESCE(MAX(seq), 0) FROM command_key_statements"));
  GS_ASSIGN(db::Step s, st.step());
  (void)s;
  return static_cast<std::uint32_t>(st.int64(0));
}

Status CommandKeyStore::check_replacement(std::uint8_t slot, std::uint8_t key_id) {
  if (slot >= c1222::kTrustSlotCount) {
    return Error(Errc::invalid_argument, "trust slot " + std::to_string(slot) + " is not 0 or 1");
  }
  GS_ASSIGN(auto key, find(key_id));
  if (!key) {
    return Error(Errc::not_found, "command key " + std::to_string(key_id) +
                                      " is not registered (`gridseal cmdkeys list`)");
  }
  if (key->state == KeyState::retired) {
    return Error(Errc::conflict, key->label + " is retired");
  }
  GS_ASSIGN(TrustSlots t, slots());
  const auto other = static_cast<std::uint8_t>(1 - slot);
  if (t.key[other] == key_id) {
    return Error(Errc::conflict, key->label + " is in trust slot " + std::to_string(other) +
                                     " (" + statement_name(t.seq[other]) +
                                     "): a meter's two slots must hold different keys");
  }
  if (t.key[slot] == key_id) {
    return Error(Errc::conflict, key->label + " is already in trust slot " +
                                     std::to_string(slot) + " (" + statement_name(t.seq[slot]) +
                                     ")");
  }
  return {};
}

Status CommandKeyStore::insert_statement(const Statement& s) {
  GS_TRY(check_replacement(s.r.trust_slot, s.r.key_id));
  GS_ASSIGN(const std::uint32_t last, last_sequence());
  if (last == UINT32_MAX || s.r.sequence != last + 1) {
    return Error(Errc::conflict, "statement sequence " + std::to_string(s.r.sequence) +
                                     " does not follow " + std::to_string(last));
  }
  GS_ASSIGN(auto key, find(s.r.key_id));
  if (!key || !same(key->public_key, s.r.public_key)) {
    return Error(Errc::conflict, "the statement's public key is not the registered " +
                                     label_for(s.r.key_id));
  }
  const auto data = c1222::encode_replacement_data(s.r);
  if (!same(data, s.data)) {
    return Error(Errc::invalid_argument, "statement data does not match its fields");
  }
  GS_ASSIGN(auto st, db_->prepare("INSERT INTO command_key_statements (seq, trust_slot, key_id, "
                                  "public_key, issued_at, signature, data, issued_by) VALUES "
                                  "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
  st.bind(1, std::int64_t{s.r.sequence}).bind(2, std::int64_t{s.r.trust_slot});
  st.bind(3, std::int64_t{s.r.key_id}).bind(4, ByteView(s.r.public_key));
  st.bind(5, std::int64_t{s.r.issued_at}).bind(6, ByteView(s.r.signature));
  st.bind(7, ByteView(s.data)).bind(8, s.issued_by);
  return st.run();
}

Status CommandKeyStore::retire(std::uint8_t key_id, std::string_view by, std::int64_t now) {
  GS_ASSIGN(auto key, find(key_id));
  if (!key) {
    return Error(Errc::not_found, "command key " + std::to_string(key_id) + " is not registered");
  }
  if (key->state == KeyState::retired) {
    return Error(Errc::conflict, key->label + " was retired already (by " + key->retired_by + ")");
  }
  GS_ASSIGN(TrustSlots t, slots());
  if (auto slot = t.slot_of(key_id)) {
    return Error(Errc::conflict, key->label + " is in trust slot " + std::to_string(*slot) +
                                     " (" + statement_name(t.seq[*slot]) +
                                     "): replace it there first (`gridseal cmdkeys replace "
                                     "--slot " + std::to_string(*slot) + " --key N`)");
  }
  GS_ASSIGN(auto st, db_->prepare("UPDATE command_keys SET state = 'retired', retired_by = ?2, "
                                  "retired_at = ?3 WHERE key_id = ?1 AND state = 'generated'"));
  st.bind(1, std::int64_t{key_id}).bind(2, by).bind(3, now);
  return st.run();
}

// ---- HSM operations ----------------------------------------------------------------------

Result<std::vector<std::uint8_t>> register_initial_keys(db::Db& db, hsm::Session& s,
                                                        std::int64_t now) {
  CommandKeyStore store(db);
  std::vector<std::uint8_t> out;
  for (std::uint8_t id : kInitialSlotKey) {
    GS_ASSIGN(auto known, store.find(id));
    if (known) continue;
    auto point = token_public_point(s, label_for(id));
    if (!point.ok() && point.error().code == Errc::not_found) continue;
    if (!point.ok()) return std::move(point).error();
    GS_ASSIGN(const bool added, store.register_key(id, *point, kCreatedByInit, now));
    if (added) out.push_back(id);
  }
  return out;
}

Result<CommandKey> generate_key(db::Db& db, hsm::Session& s, std::string_view actor,
                                std::int64_t now, bool session_copyable) {
  CommandKeyStore store(db);
  // A label already in the token (a key generated by a run whose transaction did not commit, or
  // made by hand) is skipped, never adopted: its attributes are not known to be gridseal's.
  Status lookup;
  GS_ASSIGN(const std::uint8_t id,
            store.next_free_id([&](std::uint8_t i) { return label_in_token(s, label_for(i), lookup); }));
  GS_TRY(lookup);
  const std::string label = label_for(id);
  // The same call `hsm init` makes for gs-cmd-1/2: sign only, sensitive, non-extractable.
  auto kp = hsm::generate_ec_p256(s, label, hsm::EcKeyUse::sign, session_copyable);
  if (!kp.ok()) return Error(kp.error().code, "creating " + label + ": " + kp.error().message());
  GS_ASSIGN(EcPoint point, hsm::export_ec_point(s, kp->public_key));
  GS_TRY(store.register_key(id, point, actor, now));
  GS_ASSIGN(auto key, store.find(id));
  if (!key) return Error(Errc::storage_failure, label + ": not found after registration");
  return std::move(*key);
}

Result<EcPoint> token_public_point(hsm::Session& s, const std::string& label) {
  auto pub = hsm::find_object(s, hsm::ObjectClass::public_key, label);
  if (!pub.ok()) return Error(pub.error().code, label + ": " + pub.error().message());
  return hsm::export_ec_point(s, *pub);
}

Result<HostEcKey> revocation_public_key(hsm::Session& s) {
  GS_ASSIGN(EcPoint point, token_public_point(s, kLabelRevocation));
  return HostEcKey::from_public(point);
}

Result<Statement> issue_replacement(db::Db& db, hsm::Session& s, std::uint8_t slot,
                                    std::uint8_t key_id, std::string_view actor,
                                    std::int64_t now) {
  CommandKeyStore store(db);
  GS_TRY(store.check_replacement(slot, key_id));
  GS_ASSIGN(auto key, store.find(key_id));
  GS_ASSIGN(const std::uint32_t last, store.last_sequence());
  if (last == UINT32_MAX) return Error(Errc::too_large, "statement sequence exhausted");
  if (now < 0 || now > static_cast<std::int64_t>(UINT32_MAX)) {
    return Error(Errc::invalid_argument, "issue time outside 0..2^32-1");
  }
  // The registered point must still be the token's (the database alone is not trusted with the
  // key the whole fleet will accept).
  GS_ASSIGN(EcPoint token_point, token_public_point(s, key->label));
  if (!same(token_point, key->public_key)) {
    return Error(Errc::conflict, key->label + ": the token's public key differs from the registry");
  }
  Statement out;
  out.r.trust_slot = slot;
  out.r.key_id = key_id;
  out.r.sequence = last + 1;
  out.r.issued_at = static_cast<std::uint32_t>(now);
  std::copy(token_point.begin(), token_point.end(), out.r.public_key.begin());
  GS_ASSIGN(Sha256Digest digest, statement_digest(out.r));
  auto priv = hsm::find_object(s, hsm::ObjectClass::private_key, kLabelRevocation);
  if (!priv.ok()) {
    return Error(priv.error().code, std::string(kLabelRevocation) + ": " + priv.error().message());
  }
  GS_ASSIGN(auto sig, hsm::sign_digest(s, *priv, digest));
  if (sig.size() != out.r.signature.size()) {
    return Error(Errc::crypto_failure, "gs-revocation signature is not 64 bytes");
  }
  std::copy(sig.begin(), sig.end(), out.r.signature.begin());
  GS_ASSIGN(HostEcKey revocation, revocation_public_key(s));
  GS_TRY(verify_statement(out.r, revocation));
  const auto data = c1222::encode_replacement_data(out.r);
  out.data.assign(data.begin(), data.end());
  out.issued_by = std::string(actor);
  GS_TRY(store.insert_statement(out));
  return out;
}

// ---- daemons ---------------------------------------------------------------------------------

Status check_signing_key(db::Db& db, std::uint8_t key_id, std::string_view setting) {
  CommandKeyStore store(db);
  const std::string label = label_for(key_id);
  auto key = store.find(key_id);
  if (!key.ok()) {
    return Error(key.error().code, std::string(setting) + ": cannot read the command-key "
                                       "registry: " + key.error().message());
  }
  if (*key && (*key)->state == KeyState::retired) {
    return Error(Errc::conflict, std::string(setting) + " = " + std::to_string(key_id) + ": " +
                                     label + " is retired (by " + (*key)->retired_by +
                                     "); set a key a trust slot holds (`gridseal cmdkeys list`)");
  }
  auto t = store.slots();
  if (!t.ok()) {
    return Error(t.error().code, std::string(setting) + ": cannot read the command-key "
                                     "statements: " + t.error().message());
  }
  if (t->slot_of(key_id)) return {};
  // Why not: the newest statement that named it and the one that displaced it, else the
  // statement that replaced an initial key, else it never was in a slot.
  std::string why = "no replacement statement ever put it into a trust slot";
  for (std::uint8_t slot = 0; slot < c1222::kTrustSlotCount; ++slot) {
    if (kInitialSlotKey[slot] == key_id && t->seq[slot] != 0) {
      why = "statement " + std::to_string(t->seq[slot]) + " replaced it in trust slot " +
            std::to_string(slot);
    }
  }
  auto st = db.prepare("SELECT seq, trust_slot FROM command_key_statements WHERE key_id = ?1 "
                       "ORDER BY seq DESC LIMIT 1");
  if (!st.ok()) return Error(st.error().code, std::string(setting) + ": " + st.error().message());
  st->bind(1, std::int64_t{key_id});
  auto row = st->step();
  if (!row.ok()) return Error(row.error().code, std::string(setting) + ": " + row.error().message());
  if (*row == db::Step::row) {
    const std::int64_t slot = st->int64(1);
    if (slot >= 0 && slot < c1222::kTrustSlotCount) {
      why = "statement " + std::to_string(t->seq[static_cast<std::size_t>(slot)]) +
            " displaced it from trust slot " + std::to_string(slot) + ", where statement " +
            std::to_string(st->int64(0)) + " had put it";
    }
  }
  return Error(Errc::conflict, std::string(setting) + " = " + std::to_string(key_id) + ": " +
                                   label + " is in no trust slot meters accept (" + why +
                                   "; slot 0 = key " + std::to_string(t->key[0]) +
                                   ", slot 1 = key " + std::to_string(t->key[1]) + ")");
}

Status check_replacement_writes(const c1222::Message& m, const HostEcKey* revocation) {
  GS_ASSIGN(c1222::Epsem e, c1222::split_epsem(m.epsem, m.epsem_offset));
  if (c1222::security_mode(e.control) != c1222::SecurityMode::cleartext) {
    return Error(Errc::unsupported, "command must arrive in security mode 0");
  }
  GS_ASSIGN(auto spans, c1222::split_services(e.body, m.epsem_offset + 1 + (e.ed_class ? 4 : 0)));
  c1222::ServiceOptions so;
  so.strict = true;
  for (const auto& span : spans) {
    auto req = c1222::decode_request(span.bytes, span.offset, so);
    if (!req.ok()) return std::move(req).error();
    const c1222::TableId* table = nullptr;
    if (const auto* w = std::get_if<c1222::FullWriteRequest>(&*req)) table = &w->table;
    if (const auto* w = std::get_if<c1222::PartialWriteOffsetRequest>(&*req)) table = &w->table;
    if (const auto* w = std::get_if<c1222::PartialWriteIndexRequest>(&*req)) table = &w->table;
    if (table == nullptr || !table->manufacturer() ||
        (table->number() | c1222::TableId::kManufacturer) != c1222::kTableCommandKeyReplacement) {
      continue;
    }
    auto r = c1222::decode_replacement_write(span.bytes);
    if (!r.ok()) {
      return Error(Errc::bad_value, "MT-2044 write is not a valid statement: " +
                                        r.error().message(), span.offset);
    }
    if (revocation == nullptr) {
      return Error(Errc::bad_signature, "MT-2044 statements cannot be checked: gs-revocation's "
                                        "public key is unavailable", span.offset);
    }
    if (auto st = verify_statement(*r, *revocation); !st.ok()) {
      Error err = std::move(st).error();
      err.offset = span.offset;
      return err;
    }
  }
  return {};
}

}  // namespace gs::cmdkeys
