// SQLite schema, migrations and queries of the meter registry and key slots.
#include "src/key_store.h"

#include <algorithm>
#include <cstdint>
#include <ctime>

namespace gs::store {

namespace {

std::int64_t now_seconds() { return static_cast<std::int64_t>(std::time(nullptr)); }

// Each entry upgrades the schema by one version; never edit a released entry, append.
constexpr const char* kMigrations[] = {
    // v1: registry, key slots, invocation counters, replay marks.
    R"sql(
CREATE TABLE meters (
  row            INTEGER PRIMARY KEY,
  meter_id       TEXT NOT NULL UNIQUE,
  ap_title       BLOB NOT NULL UNIQUE,
  ap_title_text  TEXT NOT NULL,
  public_key     BLOB,
  state          TEXT NOT NULL DEFAULT 'active'
                 CHECK (state IN ('active','compromised','quarantined')),
  state_reason   TEXT NOT NULL DEFAULT '',
  created_at     INTEGER NOT NULL
);
CREATE TABLE key_slots (
  meter        INTEGER NOT NULL REFERENCES meters(row),
  slot         INTEGER NOT NULL CHECK (slot BETWEEN 0 AND 3),
  wrapped      BLOB,
  key_version  INTEGER NOT NULL,
  state        TEXT NOT NULL CHECK (state IN
                 ('pending','active','standby','deactivated','compromised','destroyed')),
  origin       TEXT NOT NULL,
  created_at   INTEGER NOT NULL,
  changed_at   INTEGER NOT NULL,
  PRIMARY KEY (meter, slot)
) WITHOUT ROWID;
CREATE TABLE invocation_counters (
  calling_title  BLOB PRIMARY KEY,
  next_value     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE replay_state (
  meter              INTEGER PRIMARY KEY REFERENCES meters(row),
  last_invocation_id INTEGER NOT NULL,
  last_iv_time       INTEGER NOT NULL
);
)sql",
    // v2: MT-2042 signed receipts verified and kept by the DKUS (DESIGN §3.3).
    R"sql(
CREATE TABLE receipts (
  meter          INTEGER NOT NULL REFERENCES meters(row),
  invocation_id  INTEGER NOT NULL,
  result         INTEGER NOT NULL,
  executed_at    INTEGER NOT NULL,
  command_digest BLOB NOT NULL,
  signature      BLOB NOT NULL,
  message_id     INTEGER NOT NULL,
  received_at    INTEGER NOT NULL,
  PRIMARY KEY (meter, invocation_id)
) WITHOUT ROWID;
)sql",
    // v3: key-rollover campaigns and their per-meter steps (src/rollover_store.h).
    R"sql(
CREATE TABLE rollover_campaigns (
  id          INTEGER PRIMARY KEY,
  state       TEXT NOT NULL CHECK (state IN ('running','aborted','done')),
  reason      TEXT NOT NULL CHECK (reason IN ('operator','revocation')),
  rate        REAL NOT NULL,
  created_by  TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  changed_at  INTEGER NOT NULL,
  total       INTEGER NOT NULL
);
CREATE TABLE rollover_steps (
  campaign         INTEGER NOT NULL REFERENCES rollover_campaigns(id),
  meter            INTEGER NOT NULL REFERENCES meters(row),
  state            TEXT NOT NULL CHECK (state IN
                     ('queued','prepared','confirmed','failed','aborted')),
  target_slot      INTEGER,
  key_version      INTEGER,
  ephemeral_point  BLOB,
  seal_slot        INTEGER,
  attempts         INTEGER NOT NULL DEFAULT 0,
  next_attempt_at  INTEGER NOT NULL DEFAULT 0,
  last_error       TEXT NOT NULL DEFAULT '',
  changed_at       INTEGER NOT NULL,
  confirmed_at     INTEGER,
  PRIMARY KEY (campaign, meter)
) WITHOUT ROWID;
CREATE INDEX rollover_steps_by_state ON rollover_steps (state, next_attempt_at);
CREATE INDEX rollover_steps_by_meter ON rollover_steps (meter);
CREATE UNIQUE INDEX rollover_one_live_step ON rollover_steps (meter)
  WHERE state IN ('queued','prepared','failed');
)sql",
    // v4: the hash-chained audit trail and its signed checkpoints (src/audit.h). Append-only:
    // the triggers stop gridseal's own code from changing history; tampering with the file is
    // caught by `gridseal audit verify` and the HSM anchor.
    R"sql(
CREATE TABLE audit (
  seq        INTEGER PRIMARY KEY CHECK (seq >= 1),
  time       INTEGER NOT NULL,
  actor      TEXT NOT NULL,
  event      TEXT NOT NULL,
  subject    TEXT NOT NULL,
  detail     TEXT NOT NULL,
  prev_hash  BLOB NOT NULL,
  hash       BLOB NOT NULL
);
CREATE INDEX audit_by_time ON audit (time);
CREATE TABLE audit_checkpoints (
  seq        INTEGER PRIMARY KEY,
  head       BLOB NOT NULL,
  time       INTEGER NOT NULL,
  signature  BLOB NOT NULL
);
-- The head the HSM anchor was last sealed at (a hint for writers, not evidence).
CREATE TABLE audit_seal (
  id   INTEGER PRIMARY KEY CHECK (id = 1),
  seq  INTEGER NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
  BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
  BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
  BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
  BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
)sql",
    // v5: MT-2043 meter challenges (DESIGN §3.4, src/challenge_store.h): each meter's current
    // challenge (one row per meter) and the proofs it answered with.
    R"sql(
CREATE TABLE meter_challenges (
  meter            INTEGER PRIMARY KEY REFERENCES meters(row),
  state            TEXT NOT NULL CHECK (state IN
                     ('queued','sent','proven','failed','unanswered')),
  origin           TEXT NOT NULL CHECK (origin IN ('operator','rollover')),
  requested_by     TEXT NOT NULL,
  requested_at_ms  INTEGER NOT NULL,
  challenge        BLOB,
  issued_at_ms     INTEGER,
  expires_at_ms    INTEGER,
  invocation_id    INTEGER,
  attempts         INTEGER NOT NULL DEFAULT 0,
  next_attempt_at  INTEGER NOT NULL DEFAULT 0,
  last_error       TEXT NOT NULL DEFAULT '',
  changed_at_ms    INTEGER NOT NULL
);
CREATE INDEX meter_challenges_by_state ON meter_challenges (state, next_attempt_at);
CREATE TABLE challenge_proofs (
  meter           INTEGER NOT NULL REFERENCES meters(row),
  challenge       BLOB NOT NULL,
  meter_time      INTEGER NOT NULL,
  signature       BLOB NOT NULL,
  message_id      INTEGER NOT NULL,
  verified_at_ms  INTEGER NOT NULL,
  PRIMARY KEY (meter, challenge)
) WITHOUT ROWID;
CREATE INDEX challenge_proofs_by_time ON challenge_proofs (meter, verified_at_ms);
)sql",
    // v6: named operators with roles and the single-use nonces of their signed requests
    // (src/operators.h). Operators are never deleted (removed_at), so audit records keep one
    // meaning per name.
    R"sql(
CREATE TABLE operators (
  name         TEXT PRIMARY KEY,
  role         TEXT NOT NULL CHECK (role IN
                 ('security-officer','key-custodian','operator','auditor')),
  public_key   BLOB NOT NULL CHECK (length(public_key) = 65),
  enrolled_at  INTEGER NOT NULL,
  enrolled_by  TEXT NOT NULL,
  removed_at   INTEGER,
  removed_by   TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TRIGGER operators_no_delete BEFORE DELETE ON operators
  BEGIN SELECT RAISE(ABORT, 'operators are removed, never deleted'); END;
CREATE TABLE operator_nonces (
  nonce       BLOB PRIMARY KEY,
  created_at  INTEGER NOT NULL,
  expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
)sql",
    // v7: the replay window of each meter's mark (ReplayMark in key_store.h): which ids below
    // the mark were accepted, and the floor at or below which none is. A mark stored before
    // gets floor = mark: what it accepted below is unknown, so nothing below is accepted.
    R"sql(
ALTER TABLE replay_state ADD COLUMN window_bits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE replay_state ADD COLUMN window_floor INTEGER NOT NULL DEFAULT 0;
UPDATE replay_state SET window_floor = last_invocation_id;
)sql",
    // v8: M-of-N approvals (src/approvals.h): a request for a command named by the policy's
    // [[quorum]], the distinct operators' signatures it collected, and its single execution.
    R"sql(
CREATE TABLE approval_requests (
  id            INTEGER PRIMARY KEY AUTOINCREMENT,
  command       TEXT NOT NULL,
  argv          BLOB NOT NULL,
  description   TEXT NOT NULL,
  digest        BLOB NOT NULL,
  rule          TEXT NOT NULL,
  role          TEXT NOT NULL,
  required      INTEGER NOT NULL,
  requested_by  TEXT NOT NULL,
  created_at    INTEGER NOT NULL,
  expires_at    INTEGER NOT NULL,
  state         TEXT NOT NULL CHECK (state IN ('pending','running','done','failed','cancelled')),
  executed_by   TEXT NOT NULL DEFAULT '',
  started_at    INTEGER,
  finished_at   INTEGER,
  exit_code     INTEGER
);
CREATE INDEX approval_requests_by_state ON approval_requests (state, id);
CREATE TABLE approval_signatures (
  request    INTEGER NOT NULL REFERENCES approval_requests (id),
  operator   TEXT NOT NULL,
  role       TEXT NOT NULL,
  signed_at  INTEGER NOT NULL,
  nonce      BLOB NOT NULL,
  time       INTEGER NOT NULL,
  signature  BLOB NOT NULL,
  PRIMARY KEY (request, operator)
) WITHOUT ROWID;
)sql",
    // v9: KEK rotation (src/kek_rotation.h): the generations of the key-encryption key and
    // which one wraps each key slot. Generation 1 is gs-kek, the one every earlier row is wrapped
    // under. The triggers keep a slot from being written under a KEK that is being created or
    // destroyed, and bring a retired generation back to draining when a slot (a writer that
    // read the generation before the rotation switched) is written under it again.
    R"sql(
CREATE TABLE kek_generations (
  gen         INTEGER PRIMARY KEY CHECK (gen >= 1),
  label       TEXT NOT NULL UNIQUE,
  state       TEXT NOT NULL CHECK (state IN
                ('creating','current','draining','retired','destroyed')),
  created_by  TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  changed_at  INTEGER NOT NULL
);
CREATE UNIQUE INDEX kek_one_current ON kek_generations (state) WHERE state = 'current';
INSERT INTO kek_generations VALUES (1, 'gs-kek', 'current', 'hsm init',
                                    CAST(strftime('%s','now') AS INTEGER),
                                    CAST(strftime('%s','now') AS INTEGER));
ALTER TABLE key_slots ADD COLUMN kek INTEGER NOT NULL DEFAULT 1;
CREATE INDEX key_slots_by_kek ON key_slots (kek);
CREATE TRIGGER key_slots_kek_usable_insert BEFORE INSERT ON key_slots
  WHEN NEW.wrapped IS NOT NULL AND NOT EXISTS (SELECT 1 FROM kek_generations WHERE
    gen = NEW.kek AND state IN ('current','draining','retired'))
  BEGIN SELECT RAISE(ABORT, 'key slot wrapped under a KEK generation that is not usable'); END;
CREATE TRIGGER key_slots_kek_usable_update BEFORE UPDATE OF wrapped, kek ON key_slots
  WHEN NEW.wrapped IS NOT NULL AND NOT EXISTS (SELECT 1 FROM kek_generations WHERE
    gen = NEW.kek AND state IN ('current','draining','retired'))
  BEGIN SELECT RAISE(ABORT, 'key slot wrapped under a KEK generation that is not usable'); END;
CREATE TRIGGER key_slots_kek_unretire_insert AFTER INSERT ON key_slots
  WHEN NEW.wrapped IS NOT NULL
  BEGIN UPDATE kek_generations SET state = 'draining' WHERE gen = NEW.kek AND state = 'retired';
  END;
CREATE TRIGGER key_slots_kek_unretire_update AFTER UPDATE OF wrapped, kek ON key_slots
  WHEN NEW.wrapped IS NOT NULL
  BEGIN UPDATE kek_generations SET state = 'draining' WHERE gen = NEW.kek AND state = 'retired';
  END;
)sql",
    // v10: applied SES policies (`gridseal policy apply`, src/policy_record.h): each approved
    // policy file's SHA-256, size and content, who applied it and when. gridseal-sesd with
    // ses.require_approved_policy serves only the newest one. Append-only: approved acts.
    R"sql(
CREATE TABLE policy_applied (
  seq         INTEGER PRIMARY KEY CHECK (seq >= 1),
  sha256      BLOB NOT NULL CHECK (length(sha256) = 32),
  size        INTEGER NOT NULL CHECK (size >= 0),
  content     BLOB NOT NULL,
  applied_by  TEXT NOT NULL,
  applied_at  INTEGER NOT NULL
);
CREATE TRIGGER policy_applied_no_update BEFORE UPDATE ON policy_applied
  BEGIN SELECT RAISE(ABORT, 'applied policies are append-only'); END;
CREATE TRIGGER policy_applied_no_delete BEFORE DELETE ON policy_applied
  BEGIN SELECT RAISE(ABORT, 'applied policies are append-only'); END;
)sql",
    // v11: rate-limit grants (src/grants.h, `gridseal grants`): signed by gs-audit over id,
    // client, class, units, not_before, not_after; `reserved` counts the units handed out to SES
    // workers in blocks (used, or lost in a crash), never above `units`. Never deleted.
    R"sql(
CREATE TABLE rate_grants (
  id          TEXT PRIMARY KEY CHECK (length(id) = 16),
  client      TEXT NOT NULL,
  class       INTEGER NOT NULL CHECK (class BETWEEN 0 AND 6),
  units       INTEGER NOT NULL CHECK (units >= 1),
  not_before  INTEGER NOT NULL,
  not_after   INTEGER NOT NULL CHECK (not_after > not_before),
  signature   BLOB NOT NULL,
  reserved    INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= units),
  reason      TEXT NOT NULL,
  issued_by   TEXT NOT NULL,
  issued_at   INTEGER NOT NULL,
  revoked_at  INTEGER,
  revoked_by  TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX rate_grants_by_expiry ON rate_grants (not_after);
CREATE TRIGGER rate_grants_no_delete BEFORE DELETE ON rate_grants
  BEGIN SELECT RAISE(ABORT, 'rate-limit grants are revoked, never deleted'); END;
)sql",
    // v12: command keys (src/command_keys.h, `gridseal cmdkeys`): the registry of gs-cmd-<n>
    // (public point, who made it, generated or retired; never deleted, never un-retired) and
    // the MT-2044 replacement statements gs-revocation signed (append-only: what was sent to
    // the fleet cannot be rewritten). The latest statement of each trust slot says which key
    // meters trust there; with none, slot 0 holds key 1 and slot 1 key 2 (`hsm init`).
    R"sql(
CREATE TABLE command_keys (
  key_id      INTEGER PRIMARY KEY CHECK (key_id BETWEEN 1 AND 255),
  label       TEXT NOT NULL UNIQUE,
  public_key  BLOB NOT NULL CHECK (length(public_key) = 65),
  state       TEXT NOT NULL CHECK (state IN ('generated','retired')),
  created_by  TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  retired_by  TEXT NOT NULL DEFAULT '',
  retired_at  INTEGER
);
CREATE TRIGGER command_keys_no_delete BEFORE DELETE ON command_keys
  BEGIN SELECT RAISE(ABORT, 'command keys are retired, never deleted'); END;
CREATE TRIGGER command_keys_fixed BEFORE UPDATE OF key_id, label, public_key, created_by,
  created_at ON command_keys
  BEGIN SELECT RAISE(ABORT, 'a command key''s identity cannot change'); END;
CREATE TRIGGER command_keys_no_unretire BEFORE UPDATE OF state ON command_keys
  WHEN OLD.state = 'retired'
  BEGIN SELECT RAISE(ABORT, 'a retired command key stays retired'); END;
CREATE TABLE command_key_statements (
  seq         INTEGER PRIMARY KEY CHECK (seq BETWEEN 1 AND 4294967295),
  trust_slot  INTEGER NOT NULL CHECK (trust_slot IN (0, 1)),
  key_id      INTEGER NOT NULL REFERENCES command_keys (key_id),
  public_key  BLOB NOT NULL CHECK (length(public_key) = 65),
  issued_at   INTEGER NOT NULL,
  signature   BLOB NOT NULL CHECK (length(signature) = 64),
  data        BLOB NOT NULL CHECK (length(data) = 141),
  issued_by   TEXT NOT NULL
);
CREATE INDEX command_key_statements_by_slot ON command_key_statements (trust_slot, seq);
CREATE TRIGGER command_key_statements_no_update BEFORE UPDATE ON command_key_statements
  BEGIN SELECT RAISE(ABORT, 'replacement statements are append-only'); END;
CREATE TRIGGER command_key_statements_no_delete BEFORE DELETE ON command_key_statements
  BEGIN SELECT RAISE(ABORT, 'replacement statements are append-only'); END;
)sql",
    // v13: the meter change feed (src/meter_cache.h): the absolute AP title of every meter whose
    // record (KeyStore::meter_by_title: its meters row and key_slots rows) changed, in commit
    // order, so that the daemons' per-thread meter caches drop exactly those entries instead of
    // re-reading every record after a short TTL. The UPDATE triggers name the columns the record
    // holds (today all of them); a column added to either table for per-message bookkeeping must
    // stay out of those lists, or every message would empty the caches of every process. The
    // per-message writes (replay_state, receipts, invocation_counters, rate_grants, audit,
    // challenges, rollover_steps) touch neither table. The feed keeps its last 65536 rows (up to
    // 1023 more: it is pruned once per 1024 inserts, which halves the cost of a bulk import); a
    // cache further behind starts over.
    R"sql(
CREATE TABLE meter_changes (
  seq    INTEGER PRIMARY KEY AUTOINCREMENT,
  title  BLOB NOT NULL
);
CREATE TRIGGER meter_changes_bounded AFTER INSERT ON meter_changes WHEN NEW.seq % 1024 = 0
  BEGIN DELETE FROM meter_changes WHERE seq <= NEW.seq - 65536; END;
CREATE TRIGGER meters_feed_insert AFTER INSERT ON meters
  BEGIN INSERT INTO meter_changes (title) VALUES (NEW.ap_title); END;
CREATE TRIGGER meters_feed_delete AFTER DELETE ON meters
  BEGIN INSERT INTO meter_changes (title) VALUES (OLD.ap_title); END;
CREATE TRIGGER meters_feed_update AFTER UPDATE OF row, meter_id, ap_title, ap_title_text,
  public_key, state, state_reason, created_at ON meters
  BEGIN
    INSERT INTO meter_changes (title) VALUES (NEW.ap_title);
    INSERT INTO meter_changes (title) SELECT OLD.ap_title WHERE OLD.ap_title IS NOT NEW.ap_title;
  END;
CREATE TRIGGER key_slots_feed_insert AFTER INSERT ON key_slots
  BEGIN INSERT INTO meter_changes (title) SELECT ap_title FROM meters WHERE row = NEW.meter; END;
CREATE TRIGGER key_slots_feed_delete AFTER DELETE ON key_slots
  BEGIN INSERT INTO meter_changes (title) SELECT ap_title FROM meters WHERE row = OLD.meter; END;
CREATE TRIGGER key_slots_feed_update AFTER UPDATE OF meter, slot, wrapped, key_version, state,
  origin, created_at, changed_at, kek ON key_slots
  BEGIN
    INSERT INTO meter_changes (title) SELECT ap_title FROM meters WHERE row = NEW.meter;
    INSERT INTO meter_changes (title) SELECT ap_title FROM meters
      WHERE row = OLD.meter AND OLD.meter IS NOT NEW.meter;
  END;
)sql",
    // v14: audit archives (src/audit.h, `gridseal audit archive`). Records 1..through were written
    // to an archive file whose SHA-256 an `audit_archive` record in the chain registers; they, and
    // the checkpoints before `through`, may then be deleted. The checkpoint at `through` stays: it
    // is the signed base the rest of the table links to. Nothing else may be deleted.
    R"sql(
CREATE TABLE audit_archives (
  through     INTEGER PRIMARY KEY CHECK (through >= 1),
  first_seq   INTEGER NOT NULL CHECK (first_seq >= 1 AND first_seq <= through),
  records     INTEGER NOT NULL,
  checkpoints INTEGER NOT NULL,
  file        TEXT NOT NULL,
  sha256      BLOB NOT NULL,
  time        INTEGER NOT NULL,
  record_seq  INTEGER NOT NULL CHECK (record_seq > through)
);
CREATE TRIGGER audit_archives_no_update BEFORE UPDATE ON audit_archives
  BEGIN SELECT RAISE(ABORT, 'audit archives are append-only'); END;
CREATE TRIGGER audit_archives_no_delete BEFORE DELETE ON audit_archives
  BEGIN SELECT RAISE(ABORT, 'audit archives are append-only'); END;
DROP TRIGGER audit_no_delete;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
  WHEN OLD.seq > (SELECT coalesce(max(through), 0) FROM audit_archives)
  BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
DROP TRIGGER audit_checkpoints_no_delete;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
  WHEN OLD.seq >= (SELECT coalesce(max(through), 0) FROM audit_archives)
  BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
)sql",
};

constexpr int kMigrationCount = static_cast<int>(sizeof kMigrations / sizeof kMigrations[0]);
static_assert(kMigrationCount == kSchemaVersion);

constexpr const char* kMeterColumns =
    "SELECT m.row, m.meter_id, m.ap_title, m.ap_title_text, m.public_key, m.state, "
    "m.state_reason, m.created_at, s.slot, s.wrapped, s.key_version, s.state, s.origin, "
    "s.created_at, s.changed_at, s.kek FROM meters m LEFT JOIN key_slots s ON s.meter = m.row ";

}  // namespace

const char* to_string(MeterState s) noexcept {
  switch (s) {
    case MeterState::active: return "active";
    case MeterState::compromised: return "compromised";
    case MeterState::quarantined: return "quarantined";
  }
  return "?";
}

const char* to_string(KeyState s) noexcept {
  switch (s) {
    case KeyState::pending: return "pending";
    case KeyState::active: return "active";
    case KeyState::standby: return "standby";
    case KeyState::deactivated: return "deactivated";
    case KeyState::compromised: return "compromised";
    case KeyState::destroyed: return "destroyed";
  }
  return "?";
}

std::optional<MeterState> meter_state_from(std::string_view s) noexcept {
  for (auto v : {MeterState::active, MeterState::compromised, MeterState::quarantined}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

const char* to_string(ReplayVerdict v) noexcept {
  switch (v) {
    case ReplayVerdict::accepted: return "accepted";
    case ReplayVerdict::replayed: return "replayed";
    case ReplayVerdict::too_old: return "older than the reorder window";
  }
  return "?";
}

namespace {

// The bits kept below the mark for a window of `w` ids (w-1 of them, at most 63).
std::uint64_t window_mask(unsigned w) noexcept {
  return w <= 1 ? 0 : (std::uint64_t{1} << (std::min(w, kMaxReplayWindow) - 1)) - 1;
}

}  // namespace

ReplayVerdict ReplayMark::judge(std::uint64_t id, unsigned window) const noexcept {
  const std::uint64_t w = std::min(window, kMaxReplayWindow);
  if (id > invocation_id) return ReplayVerdict::accepted;
  if (id == invocation_id) return ReplayVerdict::replayed;
  const std::uint64_t back = invocation_id - id;  // >= 1
  if (back < w && ((below >> (back - 1)) & 1) != 0) return ReplayVerdict::replayed;
  if (back >= w || (floor >= 0 && id <= static_cast<std::uint64_t>(floor))) {
    return ReplayVerdict::too_old;
  }
  return ReplayVerdict::accepted;
}

void ReplayMark::accept(std::uint64_t id, std::int64_t iv, unsigned window) noexcept {
  const unsigned w = std::min(window, kMaxReplayWindow);
  if (id > invocation_id) {
    const std::uint64_t up = id - invocation_id;
    below = up >= 64 ? 0 : below << up;
    if (up <= 63) below |= std::uint64_t{1} << (up - 1);  // the old mark
    below &= window_mask(w);
    invocation_id = id;
    iv_time = iv;
  } else if (const std::uint64_t back = invocation_id - id; back >= 1 && back <= 63) {
    below |= std::uint64_t{1} << (back - 1);
  }
  floor = std::max(floor, static_cast<std::int64_t>(invocation_id) - static_cast<std::int64_t>(w));
}

ReplayMark ReplayMark::first(std::uint64_t id, std::int64_t iv, unsigned window) noexcept {
  ReplayMark m;
  m.invocation_id = id;
  m.iv_time = iv;
  m.floor = static_cast<std::int64_t>(id) -
            static_cast<std::int64_t>(std::min(window, kMaxReplayWindow));
  return m;
}

std::optional<KeyState> key_state_from(std::string_view s) noexcept {
  for (auto v : {KeyState::pending, KeyState::active, KeyState::standby, KeyState::deactivated,
                 KeyState::compromised, KeyState::destroyed}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

const KeySlot* Meter::active_slot() const noexcept {
  for (const auto& s : slots) {
    if (s.state == KeyState::active) return &s;
  }
  return nullptr;
}

const KeySlot* Meter::slot_for_key_id(std::uint8_t key_id) const noexcept {
  for (const auto& s : slots) {
    if (s.slot == key_id) return &s;
  }
  return nullptr;
}

Result<KeyStore> KeyStore::open(const std::string& path, const db::OpenOptions& opt) {
  GS_ASSIGN(db::Db db, db::Db::open(path, opt));
  KeyStore ks(std::move(db));
  // Freed cells are overwritten with zeros (without extra I/O), so that a destroyed or replaced
  // wrapped key does not linger in the file's free space.
  GS_TRY(ks.db_.exec("PRAGMA secure_delete=FAST"));
  if (!opt.read_only) GS_TRY(ks.migrate());
  GS_TRY(ks.prepare_statements());
  return ks;
}

Status create_schema_version(db::Db& db, int version) {
  if (version < 1 || version > kSchemaVersion) {
    return {Errc::invalid_argument, "no schema version " + std::to_string(version)};
  }
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  GS_TRY(db.exec("CREATE TABLE schema_version (version INTEGER NOT NULL)"));
  for (int v = 0; v < version; ++v) GS_TRY(db.exec(kMigrations[v]));
  GS_TRY(db.exec("INSERT INTO schema_version VALUES (" + std::to_string(version) + ")"));
  return tx.commit();
}

Status KeyStore::migrate() {
  GS_TRY(db_.exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"));
  GS_ASSIGN(auto tx, db::Transaction::begin(db_));
  GS_ASSIGN(auto st, db_.prepare("SELECT version FROM schema_version"));
  GS_ASSIGN(db::Step step, st.step());
  int version = step == db::Step::row ? static_cast<int>(st.int64(0)) : 0;
  st.reset();
  if (version > kSchemaVersion) {
    return {Errc::storage_failure, "database schema version " + std::to_string(version) +
                                       " is newer than this gridseal (" +
                                       std::to_string(kSchemaVersion) + ")"};
  }
  for (int v = version; v < kSchemaVersion; ++v) GS_TRY(db_.exec(kMigrations[v]));
  if (version != kSchemaVersion) {
    GS_TRY(db_.exec("DELETE FROM schema_version"));
    GS_TRY(db_.exec("INSERT INTO schema_version VALUES (" + std::to_string(kSchemaVersion) + ")"));
  }
  return tx.commit();
}

Status KeyStore::prepare_statements() {
  GS_ASSIGN(auto t, db_.prepare(std::string(kMeterColumns) + "WHERE m.ap_title = ?1 ORDER BY s.slot"));
  by_title_.emplace(std::move(t));
  GS_ASSIGN(auto i, db_.prepare(std::string(kMeterColumns) + "WHERE m.meter_id = ?1 ORDER BY s.slot"));
  by_id_.emplace(std::move(i));
  GS_ASSIGN(auto r, db_.prepare(std::string(kMeterColumns) + "WHERE m.row = ?1 ORDER BY s.slot"));
  by_row_.emplace(std::move(r));
  return {};
}

Result<std::optional<Meter>> KeyStore::load(db::Stmt& st) {
  std::optional<Meter> out;
  while (true) {
    auto step = st.step();
    if (!step.ok()) {
      st.reset();
      return std::move(step).error();
    }
    if (*step == db::Step::done) break;
    if (!out) {
      Meter m;
      m.row = st.int64(0);
      m.meter_id = st.text(1);
      m.ap_title = st.blob(2);
      m.ap_title_text = st.text(3);
      m.public_key = st.blob(4);
      m.state = meter_state_from(st.text(5)).value_or(MeterState::quarantined);
      m.state_reason = st.text(6);
      m.created_at = st.int64(7);
      out = std::move(m);
    }
    if (st.is_null(8)) continue;
    KeySlot k;
    k.slot = static_cast<int>(st.int64(8));
    k.wrapped = st.blob(9);
    k.key_version = static_cast<std::uint32_t>(st.int64(10));
    k.state = key_state_from(st.text(11)).value_or(KeyState::compromised);
    k.origin = st.text(12);
    k.created_at = st.int64(13);
    k.changed_at = st.int64(14);
    k.kek = static_cast<std::uint32_t>(st.int64(15));
    out->slots.push_back(std::move(k));
  }
  st.reset();
  return out;
}

Result<std::optional<Meter>> KeyStore::meter_by_title(ByteView absolute_title) {
  by_title_->bind(1, absolute_title);
  return load(*by_title_);
}

Result<std::optional<Meter>> KeyStore::meter_by_id(std::string_view meter_id) {
  by_id_->bind(1, meter_id);
  return load(*by_id_);
}

Result<std::optional<Meter>> KeyStore::meter_by_row(std::int64_t row) {
  by_row_->bind(1, row);
  return load(*by_row_);
}

Result<std::vector<Meter>> KeyStore::list_meters(std::string_view after, std::size_t limit) {
  GS_ASSIGN(auto ids, db_.prepare("SELECT meter_id FROM meters WHERE meter_id > ?1 "
                                  "ORDER BY meter_id LIMIT ?2"));
  ids.bind(1, after).bind(2, static_cast<std::int64_t>(limit));
  std::vector<std::string> names;
  while (true) {
    GS_ASSIGN(db::Step s, ids.step());
    if (s == db::Step::done) break;
    names.push_back(ids.text(0));
  }
  std::vector<Meter> out;
  out.reserve(names.size());
  for (const auto& n : names) {
    GS_ASSIGN(auto m, meter_by_id(n));
    if (m) out.push_back(std::move(*m));
  }
  return out;
}

Result<std::int64_t> KeyStore::count_meters() {
  GS_ASSIGN(auto st, db_.prepare("SELECT count(*) FROM meters"));
  GS_ASSIGN(db::Step s, st.step());
  (void)s;
  return st.int64(0);
}

Result<ImportOutcome> KeyStore::import_meters(std::span<const NewMeter> batch) {
  ImportOutcome outcome;
  GS_ASSIGN(auto tx, db::Transaction::begin(db_));
  GS_ASSIGN(auto ins_meter,
            db_.prepare("INSERT INTO meters (meter_id, ap_title, ap_title_text, public_key, "
                        "created_at) VALUES (?1, ?2, ?3, ?4, ?5)"));
  GS_ASSIGN(auto ins_slot,
            db_.prepare("INSERT INTO key_slots (meter, slot, wrapped, key_version, state, "
                        "origin, created_at, changed_at, kek) VALUES (?1, ?2, ?3, ?4, 'active', "
                        "?5, ?6, ?6, ?7)"));
  const std::int64_t now = now_seconds();
  for (const NewMeter& n : batch) {
    if (n.meter_id.empty() || n.meter_id.size() > kMaxMeterIdLength) {
      return {Errc::invalid_argument, "meter id must be 1..64 characters"};
    }
    if (n.slot < 0 || n.slot >= kSlotsPerMeter) {
      return {Errc::invalid_argument, "meter " + n.meter_id + ": key slot must be 0..3"};
    }
    if (!n.public_key.empty() && n.public_key.size() != kPublicKeySize) {
      return {Errc::invalid_argument, "meter " + n.meter_id + ": public key must be 65 bytes"};
    }
    GS_ASSIGN(auto existing, meter_by_id(n.meter_id));
    if (existing) {
      const KeySlot* s = existing->slot_for_key_id(static_cast<std::uint8_t>(n.slot));
      bool same = existing->ap_title == n.ap_title && existing->public_key == n.public_key &&
                  s != nullptr && s->kek == n.kek && s->wrapped == n.wrapped_key &&
                  s->key_version == n.key_version;
      if (!same) {
        return {Errc::conflict,
                "meter " + n.meter_id + " is already registered with other values"};
      }
      ++outcome.unchanged;
      continue;
    }
    GS_ASSIGN(auto other, meter_by_title(n.ap_title));
    if (other) {
      return {Errc::conflict, "meter " + n.meter_id + ": AP title " + n.ap_title_text +
                                  " already belongs to meter " + other->meter_id};
    }
    ins_meter.bind(1, n.meter_id).bind(2, ByteView(n.ap_title)).bind(3, n.ap_title_text);
    if (n.public_key.empty()) {
      ins_meter.bind_null(4);
    } else {
      ins_meter.bind(4, ByteView(n.public_key));
    }
    ins_meter.bind(5, now);
    GS_TRY(ins_meter.run());
    std::int64_t row = db_.last_insert_rowid();
    ins_slot.bind(1, row).bind(2, std::int64_t{n.slot}).bind(3, ByteView(n.wrapped_key));
    ins_slot.bind(4, std::int64_t{n.key_version}).bind(5, n.origin).bind(6, now);
    ins_slot.bind(7, std::int64_t{n.kek});
    GS_TRY(ins_slot.run());
    ++outcome.inserted;
  }
  GS_TRY(tx.commit());
  return outcome;
}

Status KeyStore::revoke(std::string_view meter_id, std::string_view reason) {
  GS_ASSIGN(auto tx, db::Transaction::begin(db_));
  GS_ASSIGN(auto m, meter_by_id(meter_id));
  if (!m) return {Errc::not_found, "no meter " + std::string(meter_id)};
  const std::int64_t now = now_seconds();
  GS_ASSIGN(auto up, db_.prepare("UPDATE meters SET state = 'compromised', state_reason = ?2 "
                                 "WHERE row = ?1"));
  up.bind(1, m->row).bind(2, reason);
  GS_TRY(up.run());
  GS_ASSIGN(auto slots, db_.prepare("UPDATE key_slots SET state = 'compromised', changed_at = ?2 "
                                    "WHERE meter = ?1 AND state IN "
                                    "('pending','active','standby')"));
  slots.bind(1, m->row).bind(2, now);
  GS_TRY(slots.run());
  // Its live rollover step (at most one) can never finish now: aborted, and its campaign done
  // when that was the last step in flight (the same rule as RolloverStore::confirm).
  GS_ASSIGN(auto live, db_.prepare("SELECT campaign FROM rollover_steps WHERE meter = ?1 AND "
                                   "state IN ('queued','prepared','failed')"));
  live.bind(1, m->row);
  GS_ASSIGN(db::Step ls, live.step());
  if (ls == db::Step::row) {
    const std::int64_t campaign = live.int64(0);
    live.reset();
    GS_ASSIGN(auto ab, db_.prepare("UPDATE rollover_steps SET state = 'aborted', last_error = "
                                   "'meter revoked', changed_at = ?2 WHERE meter = ?1 AND state "
                                   "IN ('queued','prepared','failed')"));
    ab.bind(1, m->row).bind(2, now);
    GS_TRY(ab.run());
    GS_ASSIGN(auto done,
              db_.prepare("UPDATE rollover_campaigns SET state = 'done', changed_at = ?2 WHERE "
                          "id = ?1 AND state = 'running' AND NOT EXISTS (SELECT 1 FROM "
                          "rollover_steps WHERE campaign = ?1 AND state IN ('queued','prepared'))"));
    done.bind(1, campaign).bind(2, now);
    GS_TRY(done.run());
  }
  return tx.commit();
}

Result<std::uint64_t> KeyStore::reserve_counter_block(ByteView calling_title, std::uint64_t count) {
  if (count == 0 || count > (std::uint64_t{1} << 32)) {
    return {Errc::invalid_argument, "block size must be 1..2^32"};
  }
  GS_ASSIGN(auto tx, db::Transaction::begin(db_));
  GS_ASSIGN(auto sel, db_.prepare("SELECT next_value FROM invocation_counters "
                                  "WHERE calling_title = ?1"));
  sel.bind(1, calling_title);
  GS_ASSIGN(db::Step s, sel.step());
  std::uint64_t first = s == db::Step::row ? static_cast<std::uint64_t>(sel.int64(0)) : 0;
  sel.reset();
  GS_ASSIGN(auto up, db_.prepare("INSERT INTO invocation_counters (calling_title, next_value) "
                                 "VALUES (?1, ?2) ON CONFLICT(calling_title) DO UPDATE SET "
                                 "next_value = excluded.next_value"));
  up.bind(1, calling_title).bind(2, static_cast<std::int64_t>(first + count));
  GS_TRY(up.run());
  GS_TRY(tx.commit());
  return first;
}

Result<ReplayVerdict> KeyStore::raise_replay_mark(std::int64_t meter_row,
                                                  std::uint64_t invocation_id,
                                                  std::int64_t iv_time, unsigned window) {
  if (invocation_id > static_cast<std::uint64_t>(INT64_MAX)) {
    return {Errc::invalid_argument, "invocation id above 2^63-1"};
  }
  if (window > kMaxReplayWindow) {
    return {Errc::invalid_argument, "replay window above " + std::to_string(kMaxReplayWindow)};
  }
  if (!raise_mark_) {
    // ReplayMark::judge and ::accept in one conditional upsert: its WHERE refuses what judge()
    // refuses (the row then stays as it is, changes() == 0), its SET is accept(). SET reads the
    // row as it was. Shifts: SQLite shifts the 64-bit pattern and gives 0 for counts >= 64; the
    // bits stay below 2^63 (mask ?5), so >> never sees a negative value, and 1 << 63 (the old
    // mark when the id jumps by 64) is masked off. No row yet: the id is the first mark.
    GS_ASSIGN(auto st, db_.prepare(R"sql(
INSERT INTO replay_state (meter, last_invocation_id, last_iv_time, window_bits, window_floor)
VALUES (?1, ?2, ?3, 0, ?2 - ?4)
ON CONFLICT(meter) DO UPDATE SET
  window_bits = CASE WHEN ?2 > last_invocation_id
    THEN ((window_bits << (?2 - last_invocation_id)) | (1 << (?2 - last_invocation_id - 1))) & ?5
    ELSE window_bits | (1 << (last_invocation_id - ?2 - 1)) END,
  window_floor = max(window_floor, max(last_invocation_id, ?2) - ?4),
  last_iv_time = CASE WHEN ?2 > last_invocation_id THEN ?3 ELSE last_iv_time END,
  last_invocation_id = max(last_invocation_id, ?2)
WHERE ?2 > last_invocation_id
   OR (?2 < last_invocation_id AND last_invocation_id - ?2 < ?4 AND ?2 > window_floor
       AND ((window_bits >> (last_invocation_id - ?2 - 1)) & 1) = 0)
)sql"));
    raise_mark_.emplace(std::move(st));
  }
  raise_mark_->bind(1, meter_row)
      .bind(2, static_cast<std::int64_t>(invocation_id))
      .bind(3, iv_time)
      .bind(4, static_cast<std::int64_t>(window))
      .bind(5, static_cast<std::int64_t>(window_mask(window)));
  GS_TRY(raise_mark_->run());
  if (db_.changes() > 0) return ReplayVerdict::accepted;
  // Refused (rare): say why, from the row as this transaction sees it.
  GS_ASSIGN(auto mark, replay_mark(meter_row));
  const ReplayVerdict v =
      mark ? mark->judge(invocation_id, window) : ReplayVerdict::accepted;
  if (v == ReplayVerdict::accepted) {
    return {Errc::storage_failure, "replay window of meter row " + std::to_string(meter_row) +
                                       " refused id " + std::to_string(invocation_id) +
                                       " that it should accept"};
  }
  return v;
}

Result<std::optional<ReplayMark>> KeyStore::replay_mark(std::int64_t meter_row) {
  if (!read_mark_) {
    GS_ASSIGN(auto st, db_.prepare("SELECT last_invocation_id, last_iv_time, window_bits, "
                                   "window_floor FROM replay_state WHERE meter = ?1"));
    read_mark_.emplace(std::move(st));
  }
  db::Stmt& st = *read_mark_;
  st.bind(1, meter_row);
  GS_ASSIGN(db::Step s, st.step());
  std::optional<ReplayMark> out;
  if (s == db::Step::row) {
    out = ReplayMark{static_cast<std::uint64_t>(st.int64(0)), st.int64(1),
                     static_cast<std::uint64_t>(st.int64(2)), st.int64(3)};
  }
  st.reset();
  return out;
}

Result<bool> KeyStore::insert_receipt(const Receipt& r) {
  if (r.invocation_id > static_cast<std::uint64_t>(INT64_MAX) ||
      r.message_id > static_cast<std::uint64_t>(INT64_MAX)) {
    return {Errc::invalid_argument, "invocation id above 2^63-1"};
  }
  if (!insert_receipt_) {
    GS_ASSIGN(auto st, db_.prepare("INSERT INTO receipts (meter, invocation_id, result, "
                                   "executed_at, command_digest, signature, message_id, "
                                   "received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) "
                                   "ON CONFLICT(meter, invocation_id) DO NOTHING"));
    insert_receipt_.emplace(std::move(st));
  }
  insert_receipt_->bind(1, r.meter_row)
      .bind(2, static_cast<std::int64_t>(r.invocation_id))
      .bind(3, std::int64_t{r.result})
      .bind(4, r.executed_at)
      .bind(5, ByteView(r.command_digest))
      .bind(6, ByteView(r.signature))
      .bind(7, static_cast<std::int64_t>(r.message_id))
      .bind(8, r.received_at);
  GS_TRY(insert_receipt_->run());
  return db_.changes() > 0;
}

Result<std::vector<Receipt>> KeyStore::receipts_for_meter(std::int64_t meter_row,
                                                          std::size_t limit) {
  GS_ASSIGN(auto st, db_.prepare("SELECT r.meter, m.meter_id, r.invocation_id, r.result, "
                                 "r.executed_at, r.command_digest, r.signature, r.message_id, "
                                 "r.received_at FROM receipts r JOIN meters m ON m.row = r.meter "
                                 "WHERE r.meter = ?1 ORDER BY r.invocation_id DESC LIMIT ?2"));
  st.bind(1, meter_row).bind(2, static_cast<std::int64_t>(limit));
  std::vector<Receipt> out;
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    Receipt r;
    r.meter_row = st.int64(0);
    r.meter_id = st.text(1);
    r.invocation_id = static_cast<std::uint64_t>(st.int64(2));
    r.result = static_cast<std::uint8_t>(st.int64(3));
    r.executed_at = st.int64(4);
    r.command_digest = st.blob(5);
    r.signature = st.blob(6);
    r.message_id = static_cast<std::uint64_t>(st.int64(7));
    r.received_at = st.int64(8);
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace gs::store
