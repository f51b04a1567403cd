// The audit trail: see audit.h (and the README section "Audit trail").
#include "src/audit.h"

#include <openssl/bn.h>
#include <unistd.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <exception>
#include <future>

#include "gridseal/clock.h"
#include "gridseal/thread_name.h"
#include "gridseal/thread_sched.h"
#include "hsm/data_object.h"
#include "hsm/ops.h"
#include "src/host_ecdsa.h"
#include "src/hsm_context.h"
#include "src/metrics.h"

namespace gs::audit {

namespace {

constexpr char kRecordDomain[] = "GSAR1";
constexpr char kCheckpointDomain[] = "GSAC1";
constexpr char kAnchorDomain[] = "GSAA1";
constexpr std::size_t kDomainSize = 5;
// A batch that takes this long is logged with where its time went (Writer::apply).
constexpr std::chrono::milliseconds kSlowBatch{100};

// Writes into a buffer sized up front; take() checks that it was filled exactly.
class Writer8 {
 public:
  explicit Writer8(std::size_t size) : out_(size) {}
  void u64(std::uint64_t v) {
    for (int shift = 56; shift >= 0; shift -= 8)
      out_[at_++] = static_cast<std::uint8_t>(v >> shift);
  }
  void i64(std::int64_t v) { u64(static_cast<std::uint64_t>(v)); }
  void raw(const void* p, std::size_t n) {
    if (n > 0) std::memcpy(out_.data() + at_, p, n);
    at_ += n;
  }
  void lp(std::string_view s) {
    const auto n = static_cast<std::uint32_t>(s.size());
    for (int shift = 24; shift >= 0; shift -= 8)
      out_[at_++] = static_cast<std::uint8_t>(n >> shift);
    raw(s.data(), s.size());
  }
  Bytes take() {
    GS_CHECK(at_ == out_.size());
    return std::move(out_);
  }

 private:
  Bytes out_;
  std::size_t at_ = 0;
};

Digest sha256_of(ByteView data) {
  // SHA-256 of in-memory input fails only when out of memory.
  auto d = gs::sha256(data);
  GS_CHECK(d.ok());
  return *d;
}

Digest to_digest(ByteView v) {
  Digest d{};
  if (v.size() == d.size()) std::memcpy(d.data(), v.data(), d.size());
  return d;
}

// True when every byte is printable ASCII (0x20..0x7E): the usual text, which clip() keeps as
// it is, json_string() escapes only at quotes and backslashes, and which is valid UTF-8.
bool printable_ascii(std::string_view s) {
  unsigned bad = 0;
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    bad |= static_cast<unsigned>(c < 0x20) | static_cast<unsigned>(c > 0x7E);
  }
  return bad == 0;
}

bool valid_utf8(std::string_view s) {
  if (printable_ascii(s)) return true;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_sequence_length(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

Status check_text(std::string_view s, std::size_t max, const char* field) {
  if (s.size() > max) {
    return Error(Errc::invalid_argument,
                 std::string("audit ") + field + " longer than " + std::to_string(max) + " bytes");
  }
  if (!valid_utf8(s)) {
    return Error(Errc::invalid_argument, std::string("audit ") + field + " is not valid UTF-8");
  }
  return {};
}

std::string hex_short(const Digest& d) { return to_hex(ByteView(d.data(), 8)); }

std::string head_text(const Head& h) {
  return "record " + std::to_string(h.seq) + " (hash " + hex_short(h.hash) + "...)";
}

std::int64_t now_s() { return static_cast<std::int64_t>(utc_now()); }

Result<Record> read_record(db::Stmt& st) {
  Record r;
  r.seq = st.int64(0);
  r.e.time = st.int64(1);
  r.e.actor = st.text(2);
  r.e.event = st.text(3);
  r.e.subject = st.text(4);
  r.e.detail = st.text(5);
  const ByteView prev = st.blob_view(6);
  const ByteView hash = st.blob_view(7);
  if (prev.size() != 32 || hash.size() != 32) {
    // A malformed row is reported by verify() as a changed record (the zero hashes never match).
    return r;
  }
  r.prev_hash = to_digest(prev);
  r.hash = to_digest(hash);
  return r;
}

Checkpoint read_checkpoint(db::Stmt& st) {
  Checkpoint c;
  c.seq = st.int64(0);
  c.head = to_digest(st.blob_view(1));
  c.time = st.int64(2);
  const ByteView sig = st.blob_view(3);
  if (sig.size() == c.signature.size()) std::memcpy(c.signature.data(), sig.data(), sig.size());
  return c;
}

constexpr const char* kRecordColumns =
    "SELECT seq, time, actor, event, subject, detail, prev_hash, hash FROM audit ";
constexpr const char* kCheckpointColumns =
    "SELECT seq, head, time, signature FROM audit_checkpoints ";

}  // namespace

// ---- encodings --------------------------------------------------------------------------------

Bytes record_encoding(const Record& r) {
  Writer8 w(kDomainSize + 8 + 8 + 4 * 4 + r.e.actor.size() + r.e.event.size() + r.e.subject.size() +
            r.e.detail.size() + 32);
  w.raw(kRecordDomain, kDomainSize);
  w.i64(r.seq);
  w.i64(r.e.time);
  w.lp(r.e.actor);
  w.lp(r.e.event);
  w.lp(r.e.subject);
  w.lp(r.e.detail);
  w.raw(r.prev_hash.data(), r.prev_hash.size());
  return w.take();
}

Digest record_hash(const Record& r) { return sha256_of(record_encoding(r)); }

Bytes checkpoint_encoding(std::int64_t seq, const Digest& head, std::int64_t time) {
  Writer8 w(kDomainSize + 8 + 32 + 8);
  w.raw(kCheckpointDomain, kDomainSize);
  w.i64(seq);
  w.raw(head.data(), head.size());
  w.i64(time);
  return w.take();
}

Digest checkpoint_digest(std::int64_t seq, const Digest& head, std::int64_t time) {
  return sha256_of(checkpoint_encoding(seq, head, time));
}

std::string anchor_encoding(const Head& h, AnchorMark mark) {
  return std::string(kAnchorDomain) + " " + std::to_string(h.seq) + " " + to_hex(h.hash) + " " +
         static_cast<char>(mark);
}

std::optional<AnchorValue> anchor_decode(std::string_view text) {
  const std::string_view prefix = "GSAA1 ";
  if (text.size() > 120 || text.substr(0, prefix.size()) != prefix) return std::nullopt;
  std::string_view rest = text.substr(prefix.size());
  const auto space = rest.find(' ');
  if (space == std::string_view::npos || space == 0 || space > 18) return std::nullopt;
  std::int64_t seq = 0;
  for (char c : rest.substr(0, space)) {
    if (c < '0' || c > '9') return std::nullopt;
    seq = seq * 10 + (c - '0');
  }
  rest.remove_prefix(space + 1);
  if (rest.size() != 64 + 2) return std::nullopt;
  auto bytes = from_hex(rest.substr(0, 64));
  if (!bytes || bytes->size() != 32) return std::nullopt;
  AnchorValue v;
  v.head = Head{seq, to_digest(*bytes)};
  const char m = rest[65];
  if (m != 'S' && m != 'C' && m != 'P') return std::nullopt;
  v.mark = static_cast<AnchorMark>(m);
  // Only the canonical form (no leading zeros, lower-case hex).
  if (anchor_encoding(v.head, v.mark) != text) return std::nullopt;
  return v;
}

// ---- events -----------------------------------------------------------------------------------

Status validate(const Event& e) {
  if (e.actor.empty()) return Error(Errc::invalid_argument, "audit actor is required");
  GS_TRY(check_text(e.actor, kMaxActor, "actor"));
  if (e.event.empty() || e.event.size() > kMaxEvent) {
    return Error(Errc::invalid_argument, "audit event name must be 1..48 characters");
  }
  for (char c : e.event) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-')) {
      return Error(Errc::invalid_argument, "audit event name must be [a-z0-9_.-]");
    }
  }
  GS_TRY(check_text(e.subject, kMaxSubject, "subject"));
  GS_TRY(check_text(e.detail, kMaxDetail, "detail"));
  return {};
}

std::string clip(std::string_view text, std::size_t max) {
  if (text.size() <= max && printable_ascii(text)) return std::string(text);
  std::string out;
  out.reserve(std::min(text.size(), max));
  const std::size_t room = max >= 3 ? max - 3 : 0;
  for (std::size_t i = 0; i < text.size();) {
    std::size_t n = utf8_sequence_length(text, i);
    std::string_view piece;
    char replacement = 0;
    if (n == 0) {
      replacement = '?';
      n = 1;
    } else if (n == 1 && (static_cast<unsigned char>(text[i]) < 0x20 || text[i] == 0x7F)) {
      replacement = ' ';
    } else {
      piece = text.substr(i, n);
    }
    const std::size_t len = replacement != 0 ? 1 : piece.size();
    // Would the rest still fit whole? Otherwise stop at `room` and mark the cut.
    if (out.size() + len > room && text.size() - i + out.size() > max) {
      out += std::string_view("...").substr(0, std::min<std::size_t>(3, max - out.size()));
      return out;
    }
    if (replacement != 0) {
      out.push_back(replacement);
    } else {
      out.append(piece);
    }
    i += n;
  }
  return out;
}

namespace {
void append_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  if (s.find_first_of("\"\\") == std::string_view::npos && printable_ascii(s)) {
    out.append(s);
    out.push_back('"');
    return;
  }
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out.push_back(ch);
    }
  }
  out.push_back('"');
}

// `"key":` after a comma when the body is not empty.
void append_key(std::string& body, std::string_view key) {
  if (!body.empty()) body.push_back(',');
  append_json_string(body, key.size() <= 64 && printable_ascii(key) ? std::string_view(key)
                                                                   : std::string_view(clip(key, 64)));
  body.push_back(':');
}
}  // namespace

std::string json_string(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  append_json_string(out, s);
  return out;
}

Detail& Detail::add(std::string_view key, std::string_view value) {
  append_key(body_, key);
  if (value.size() <= kMaxDetailValue && printable_ascii(value)) {
    append_json_string(body_, value);
  } else {
    append_json_string(body_, clip(value, kMaxDetailValue));
  }
  return *this;
}

Detail& Detail::add(std::string_view key, std::int64_t value) {
  append_key(body_, key);
  char buf[24];
  const int n = std::snprintf(buf, sizeof buf, "%" PRId64, value);
  body_.append(buf, static_cast<std::size_t>(n));
  return *this;
}

Detail& Detail::add(std::string_view key, std::uint64_t value) {
  append_key(body_, key);
  char buf[24];
  const int n = std::snprintf(buf, sizeof buf, "%" PRIu64, value);
  body_.append(buf, static_cast<std::size_t>(n));
  return *this;
}

std::string Detail::str() const {
  if (body_.size() + 2 > kMaxDetail) return "{\"truncated\":true}";
  return "{" + body_ + "}";
}

// ---- Chain ------------------------------------------------------------------------------------

Result<Chain> Chain::over(db::Db& db) {
  Chain c(db);
  GS_ASSIGN(auto head, db.prepare("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"));
  c.head_.emplace(std::move(head));
  GS_ASSIGN(auto ins, db.prepare("INSERT INTO audit (seq, time, actor, event, subject, detail, "
                                 "prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
  c.insert_.emplace(std::move(ins));
  GS_ASSIGN(auto rec, db.prepare(std::string(kRecordColumns) + "WHERE seq = ?1"));
  c.record_.emplace(std::move(rec));
  GS_ASSIGN(auto lcp, db.prepare(std::string(kCheckpointColumns) + "ORDER BY seq DESC LIMIT 1"));
  c.last_cp_.emplace(std::move(lcp));
  GS_ASSIGN(auto icp, db.prepare("INSERT INTO audit_checkpoints (seq, head, time, signature) "
                                 "VALUES (?1, ?2, ?3, ?4)"));
  c.insert_cp_.emplace(std::move(icp));
  GS_ASSIGN(auto since, db.prepare("SELECT min(seq) FROM audit WHERE time >= ?1"));
  c.since_.emplace(std::move(since));
  GS_ASSIGN(auto sealed, db.prepare("SELECT seq FROM audit_seal WHERE id = 1"));
  c.sealed_.emplace(std::move(sealed));
  GS_ASSIGN(auto set_sealed, db.prepare("INSERT INTO audit_seal (id, seq) VALUES (1, ?1) "
                                        "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq"));
  c.set_sealed_.emplace(std::move(set_sealed));
  return c;
}

Result<Head> Chain::head() {
  db::Stmt& st = *head_;
  GS_ASSIGN(db::Step step, st.step());
  Head h;
  if (step == db::Step::row) {
    h.seq = st.int64(0);
    h.hash = to_digest(st.blob_view(1));
  }
  st.reset();
  return h;
}

Result<Head> Chain::append_after(const Head& prev, const Event& e) {
  GS_TRY(validate(e));
  Record r;
  r.seq = prev.seq + 1;
  r.e = e;
  if (r.e.time == 0) r.e.time = now_s();
  r.prev_hash = prev.hash;
  r.hash = record_hash(r);
  db::Stmt& st = *insert_;
  st.bind(1, r.seq).bind(2, r.e.time).bind(3, r.e.actor).bind(4, r.e.event);
  st.bind(5, r.e.subject).bind(6, r.e.detail);
  st.bind(7, ByteView(r.prev_hash)).bind(8, ByteView(r.hash));
  GS_TRY(st.run());
  return Head{r.seq, r.hash};
}

Result<std::optional<Record>> Chain::record(std::int64_t seq) {
  db::Stmt& st = *record_;
  st.bind(1, seq);
  GS_ASSIGN(db::Step step, st.step());
  std::optional<Record> out;
  if (step == db::Step::row) {
    auto r = read_record(st);
    if (r.ok()) out = std::move(r).value();
  }
  st.reset();
  return out;
}

Result<std::optional<Checkpoint>> Chain::last_checkpoint() {
  db::Stmt& st = *last_cp_;
  GS_ASSIGN(db::Step step, st.step());
  std::optional<Checkpoint> out;
  if (step == db::Step::row) out = read_checkpoint(st);
  st.reset();
  return out;
}

Status Chain::add_checkpoint(const Checkpoint& c) {
  db::Stmt& st = *insert_cp_;
  st.bind(1, c.seq).bind(2, ByteView(c.head)).bind(3, c.time).bind(4, ByteView(c.signature));
  return st.run();
}

Result<std::optional<std::int64_t>> Chain::sealed_seq() {
  db::Stmt& st = *sealed_;
  GS_ASSIGN(db::Step step, st.step());
  std::optional<std::int64_t> out;
  if (step == db::Step::row) out = st.int64(0);
  st.reset();
  return out;
}

Status Chain::set_sealed_seq(std::int64_t seq) {
  set_sealed_->bind(1, seq);
  return set_sealed_->run();
}

Result<std::optional<std::int64_t>> Chain::first_seq_since(std::int64_t t) {
  db::Stmt& st = *since_;
  st.bind(1, t);
  GS_ASSIGN(db::Step step, st.step());
  std::optional<std::int64_t> out;
  if (step == db::Step::row && !st.is_null(0)) out = st.int64(0);
  st.reset();
  return out;
}

Result<std::vector<Record>> Chain::records(std::int64_t first, std::int64_t last) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kRecordColumns) + "WHERE seq BETWEEN ?1 AND ?2 "
                                                               "ORDER BY seq"));
  st.bind(1, first).bind(2, last);
  std::vector<Record> out;
  for (;;) {
    GS_ASSIGN(db::Step step, st.step());
    if (step != db::Step::row) break;
    GS_ASSIGN(Record r, read_record(st));
    out.push_back(std::move(r));
  }
  return out;
}

Result<std::vector<Checkpoint>> Chain::checkpoints(std::int64_t first, std::int64_t last) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kCheckpointColumns) +
                                  "WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq"));
  st.bind(1, first).bind(2, last);
  std::vector<Checkpoint> out;
  for (;;) {
    GS_ASSIGN(db::Step step, st.step());
    if (step != db::Step::row) break;
    out.push_back(read_checkpoint(st));
  }
  return out;
}

Result<std::optional<Checkpoint>> Chain::checkpoint_at(std::int64_t seq) {
  GS_ASSIGN(auto cps, checkpoints(seq, seq));
  if (cps.empty()) return std::optional<Checkpoint>{};
  return std::optional<Checkpoint>{cps.front()};
}

// ---- archives ---------------------------------------------------------------------------------

Result<std::optional<Archive>> newest_archive(db::Db& db) {
  {
    // A store older than schema v14 has no archives.
    GS_ASSIGN(auto has, db.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                   "name = 'audit_archives'"));
    GS_ASSIGN(db::Step t, has.step());
    if (t != db::Step::row) return std::optional<Archive>{};
  }
  auto st = db.prepare(
      "SELECT through, first_seq, records, checkpoints, file, sha256, time, record_seq "
      "FROM audit_archives ORDER BY through DESC LIMIT 1");
  if (!st.ok()) return st.error();
  GS_ASSIGN(db::Step step, st->step());
  std::optional<Archive> out;
  if (step == db::Step::row) {
    Archive a;
    a.through = st->int64(0);
    a.first_seq = st->int64(1);
    a.records = st->int64(2);
    a.checkpoints = st->int64(3);
    a.file = st->text(4);
    a.sha256 = to_digest(st->blob_view(5));
    a.time = st->int64(6);
    a.record_seq = st->int64(7);
    out = std::move(a);
  }
  return out;
}

std::string archive_detail(const Archive& a) {
  Detail d;
  d.add("first_seq", a.first_seq).add("through", a.through);
  d.add("records", a.records).add("checkpoints", a.checkpoints);
  d.add("file", a.file).add("sha256", to_hex(a.sha256));
  return d.str();
}

Status check_registration(Chain& chain, const Archive& a) {
  GS_ASSIGN(auto r, chain.record(a.record_seq));
  const std::string what = "the archive of records " + std::to_string(a.first_seq) + ".." +
                           std::to_string(a.through) + " (" + a.file + ")";
  if (!r) {
    return Error(Errc::conflict, what + " names record " + std::to_string(a.record_seq) +
                                     " as its registration, which is not in the table");
  }
  if (r->e.event != kArchiveEvent || r->e.detail != archive_detail(a)) {
    return Error(Errc::conflict, what + " is not what record " + std::to_string(a.record_seq) +
                                     " registers: the archive row was forged or changed");
  }
  return {};
}

// ---- anchors ----------------------------------------------------------------------------------

const char* anchor_state_name(AnchorState s) noexcept {
  switch (s) {
    case AnchorState::fresh:
      return "fresh";
    case AnchorState::sealed:
      return "sealed";
    case AnchorState::consistent:
      return "consistent";
    case AnchorState::lost_batch:
      return "lost_batch";
    case AnchorState::missing:
      return "missing";
    case AnchorState::truncated:
      return "truncated";
    case AnchorState::beyond_anchor:
      return "beyond_anchor";
    case AnchorState::rewritten:
      return "rewritten";
  }
  return "?";
}

namespace {

// The anchor values of `handles`; `failed` is set when an object could not be read at all (gone,
// or the session lost) rather than read and found malformed.
Result<Anchors> read_anchor_objects(hsm::Session& s, const std::vector<hsm::ObjectHandle>& handles,
                                    bool* failed) {
  Anchors a;
  for (hsm::ObjectHandle h : handles) {
    auto v = hsm::read_data_text(s, h);
    if (!v.ok() && s.lost()) return std::move(v).error();
    if (!v.ok() && failed != nullptr) *failed = true;
    std::optional<AnchorValue> value = v.ok() ? anchor_decode(*v) : std::nullopt;
    if (value) {
      value->object = h;
      a.values.push_back(*value);
    } else {
      a.unreadable.push_back(h);
    }
  }
  std::sort(a.values.begin(), a.values.end(),
            [](const AnchorValue& x, const AnchorValue& y) { return x.head.seq > y.head.seq; });
  return a;
}

}  // namespace

Result<Anchors> read_anchors(hsm::Session& s) {
  GS_ASSIGN(auto handles, hsm::find_data_objects(s, kAnchorApplication));
  return read_anchor_objects(s, handles, nullptr);
}

Result<AnchorCheck> check_anchor(Chain& chain, const Head& table_head, const Anchors& anchors) {
  AnchorCheck c;
  c.table_head = table_head;
  if (anchors.values.empty()) {
    c.must_write = true;
    if (table_head.seq == 0) {
      c.state = AnchorState::fresh;
      c.message = anchors.unreadable.empty()
                      ? "audit table empty, no anchor yet"
                      : "audit table empty; the unreadable anchor objects will be replaced";
      return c;
    }
    c.state = AnchorState::missing;
    c.message = "the HSM holds no readable audit anchor (" + std::string(kAnchorApplication) +
                ") but the audit table ends at " + head_text(table_head) +
                ": the anchor was deleted or the token replaced; check the table with "
                "`gridseal audit verify` and accept it with `gridseal audit reset-anchor`";
    return c;
  }
  c.newest = anchors.values.front().head;
  // Every anchored record the table should hold must be there with the anchored hash.
  std::vector<const AnchorValue*> pending;
  for (const AnchorValue& v : anchors.values) {
    if (v.head.seq > table_head.seq) {
      pending.push_back(&v);
      continue;
    }
    if (v.head.seq == 0) {
      if (!c.committed) c.committed = v.head;
      continue;
    }
    Digest have = table_head.hash;
    bool present = true;
    if (v.head.seq != table_head.seq) {
      GS_ASSIGN(auto r, chain.record(v.head.seq));
      present = r.has_value();
      if (present) have = r->hash;
      if (!present) {
        // Archived: the checkpoint at the archive's end holds that record's hash; records
        // before it are in the archive file (verify() checks the registration too).
        GS_ASSIGN(auto arch, newest_archive(chain.db()));
        if (arch && v.head.seq <= arch->through && check_registration(chain, *arch).ok()) {
          if (v.head.seq < arch->through) {
            present = true;
            have = v.head.hash;
          } else {
            GS_ASSIGN(auto cp, chain.checkpoint_at(arch->through));
            present = cp.has_value();
            if (present) have = cp->head;
          }
        }
      }
    }
    if (present && have != v.head.hash && v.mark == AnchorMark::pending) {
      // A transaction wrote this value and died before COMMIT; other writers went past it.
      c.stale_pending = true;
      c.must_write = true;
      continue;
    }
    if (!present || have != v.head.hash) {
      c.state = AnchorState::rewritten;
      c.message = "audit record " + std::to_string(v.head.seq) +
                  (present ? " differs from the one the HSM anchor holds (hash "
                           : " is missing; the HSM anchor holds it (hash ") +
                  hex_short(v.head.hash) + "...): the chain was rewritten or the file replaced";
      return c;
    }
    if (!c.committed || v.head.seq > c.committed->seq) c.committed = v.head;
  }
  bool all_sealed = true;
  for (const AnchorValue& v : anchors.values) {
    all_sealed =
        all_sealed && v.mark == AnchorMark::sealed && v.head == anchors.values.front().head;
  }
  const Head newest = *c.newest;
  if (all_sealed) {
    c.must_write = true;  // an append must not leave records after a sealed head
    if (newest == table_head) {
      c.state = AnchorState::sealed;
      c.message = "audit table ends at " + head_text(table_head) + " as sealed at the last stop";
    } else if (table_head.seq < newest.seq) {
      c.state = AnchorState::truncated;
      c.message = "audit table truncated: it ends at record " + std::to_string(table_head.seq) +
                  " but the HSM anchor sealed it at " + head_text(newest) + " (records " +
                  std::to_string(table_head.seq + 1) + ".." + std::to_string(newest.seq) +
                  " removed, or the file rolled back)";
    } else {
      c.state = AnchorState::beyond_anchor;
      c.message = "audit records " + std::to_string(newest.seq + 1) + ".." +
                  std::to_string(table_head.seq) + " follow the head sealed in the HSM at " +
                  head_text(newest) + ": appended by something other than a gridseal writer";
    }
    return c;
  }
  const AnchorValue* committed_beyond = nullptr;
  for (const AnchorValue* v : pending) {
    if (v->mark != AnchorMark::pending && !committed_beyond) committed_beyond = v;
  }
  if (committed_beyond != nullptr || pending.size() > 1) {
    const Head gone = committed_beyond != nullptr ? committed_beyond->head : newest;
    c.state = AnchorState::truncated;
    c.message = "audit table truncated: it ends at record " + std::to_string(table_head.seq) +
                " but the HSM anchor says the chain reached " + head_text(gone) + " (records " +
                std::to_string(table_head.seq + 1) + ".." + std::to_string(gone.seq) +
                " removed, or the file rolled back)";
    return c;
  }
  c.unanchored = table_head.seq - (c.committed ? c.committed->seq : 0);
  if (!pending.empty()) {
    c.state = AnchorState::lost_batch;
    c.must_write = true;  // overwrite the value beyond the table before committing past it
    c.message = "audit table ends at " + head_text(table_head) + "; record " +
                std::to_string(pending.front()->head.seq) +
                " was anchored by a transaction that died before its COMMIT or its confirmation";
    return c;
  }
  c.state = AnchorState::consistent;
  c.message = "audit table ends at " + head_text(table_head) + "; anchored up to " +
              head_text(c.committed.value_or(Head{}));
  if (c.unanchored > 0) {
    c.message += " (records " + std::to_string(table_head.seq - c.unanchored + 1) + ".." +
                 std::to_string(table_head.seq) +
                 " came after the last anchor update: a running daemon, or a crash)";
  }
  if (c.stale_pending) {
    c.message += "; a pending anchor value was left by a transaction that died before its COMMIT";
  }
  return c;
}

// ---- Notary -----------------------------------------------------------------------------------

Result<Anchors> Notary::anchors(hsm::Session& s) {
  if (!anchor_objects_.empty()) {
    bool failed = false;
    auto a = read_anchor_objects(s, anchor_objects_, &failed);
    if (a.ok() && !failed && a->unreadable.empty()) return a;
  }
  anchor_objects_.clear();
  ++searches_;
  GS_ASSIGN(auto handles, hsm::find_data_objects(s, kAnchorApplication));
  GS_ASSIGN(Anchors a, read_anchor_objects(s, handles, nullptr));
  // Cached once the set is settled (two readable objects); until then found every time.
  if (a.values.size() == 2 && a.unreadable.empty()) anchor_objects_ = std::move(handles);
  return a;
}

Status Notary::find_key(hsm::Session& s) {
  if (key_ != hsm::kNoObject) return {};
  ++searches_;
  auto k = hsm::find_object(s, hsm::ObjectClass::private_key, kLabelAudit);
  if (!k.ok()) return Error(k.error().code, std::string(kLabelAudit) + ": " + k.error().message());
  key_ = *k;
  return {};
}

void Notary::prepare(hsm::Session& s) {
  (void)find_key(s);
  if (anchor_objects_.empty()) (void)anchors(s);
}

Result<Checkpoint> Notary::sign(hsm::Session& s, const Head& head, std::int64_t time) {
  GS_TRY(find_key(s));
  Checkpoint c;
  c.seq = head.seq;
  c.head = head.hash;
  c.time = time;
  const Digest d = checkpoint_digest(c.seq, c.head, c.time);
  auto sig = hsm::sign_digest(s, key_, d);
  if (!sig.ok()) {
    key_ = hsm::kNoObject;  // found again next time (the session may have been replaced)
    return Error(sig.error().code,
                 "signing an audit checkpoint with gs-audit: " + sig.error().message());
  }
  std::memcpy(c.signature.data(), sig->data(), c.signature.size());
  return c;
}

Result<hsm::ObjectHandle> Notary::advance(hsm::Session& s, const Anchors& current,
                                          const std::optional<Head>& keep, const Head& next) {
  std::optional<hsm::ObjectHandle> keeper, target;
  std::vector<hsm::ObjectHandle> extra;
  // Newest first: a value that never committed (beyond the table) is overwritten first.
  for (const AnchorValue& v : current.values) {
    if (!keeper && keep && v.head == *keep) {
      keeper = v.object;
    } else if (!target) {
      target = v.object;
    } else {
      extra.push_back(v.object);
    }
  }
  if (!keeper || !target || !current.unreadable.empty() || !extra.empty()) {
    anchor_objects_.clear();  // objects are created or destroyed below
  }
  // Torn or foreign objects and a third value: removed so that two objects remain.
  for (hsm::ObjectHandle h : current.unreadable) (void)hsm::destroy_object(s, h);
  for (hsm::ObjectHandle h : extra) (void)hsm::destroy_object(s, h);
  if (!keeper && keep) {
    // No object holds the committed state (a fresh table): one must, in case this transaction
    // does not commit.
    GS_TRY(hsm::create_data_object(s, kAnchorApplication,
                                   anchor_encoding(*keep, AnchorMark::committed)));
  }
  const std::string value = anchor_encoding(next, AnchorMark::pending);
  if (target) {
    Status st = hsm::write_data_text(s, *target, value);
    if (st.ok()) return *target;
    if (s.lost()) return std::move(st).error();
    anchor_objects_.clear();
    (void)hsm::destroy_object(s, *target);  // unwritable (torn): replace it
  }
  return hsm::create_data_object(s, kAnchorApplication, value);
}

Status Notary::confirm(hsm::Session& s, hsm::ObjectHandle object, const Head& head) {
  Status st = hsm::write_data_text(s, object, anchor_encoding(head, AnchorMark::committed));
  if (!st.ok()) anchor_objects_.clear();
  return st;
}

Status Notary::seal(hsm::Session& s, const Anchors& current, const Head& head) {
  anchor_objects_.clear();
  const std::string value = anchor_encoding(head, AnchorMark::sealed);
  for (hsm::ObjectHandle h : current.unreadable) (void)hsm::destroy_object(s, h);
  std::vector<hsm::ObjectHandle> sealed;
  for (const AnchorValue& v : current.values) {
    if (sealed.size() == 2) {
      (void)hsm::destroy_object(s, v.object);
      continue;
    }
    if (v.head == head && v.mark == AnchorMark::sealed) {
      sealed.push_back(v.object);
      continue;
    }
    Status st = hsm::write_data_text(s, v.object, value);
    if (st.ok()) {
      sealed.push_back(v.object);
    } else if (s.lost()) {
      return st;
    } else {
      (void)hsm::destroy_object(s, v.object);
    }
  }
  while (sealed.size() < 2) {
    GS_ASSIGN(const hsm::ObjectHandle h, hsm::create_data_object(s, kAnchorApplication, value));
    sealed.push_back(h);
  }
  // The pair is settled: the next batch reads it through these handles (anchors()). Forgetting
  // them cost that batch a C_FindObjects, which SoftHSM2 answers by walking every object of
  // the token and of every session: 160-240 ms with 100,000 meter keys resident, while the batch
  // held the database's write lock and every waiting response waited with it.
  anchor_objects_ = std::move(sealed);
  return {};
}

// ---- Trail ------------------------------------------------------------------------------------

Result<Trail> Trail::over(db::Db& db) {
  GS_ASSIGN(Chain c, Chain::over(db));
  return Trail(std::move(c));
}

Result<Batch> Trail::begin(hsm::Session& s, bool with_anchor) {
  Batch b;
  GS_ASSIGN(b.prev, chain_.head());
  if (!with_anchor) {
    GS_ASSIGN(auto sealed, chain_.sealed_seq());
    with_anchor = sealed && *sealed == b.prev.seq;  // the pair is sealed at this head
  }
  if (!with_anchor) {
    b.head = b.prev;
    return b;
  }
  GS_ASSIGN(b.anchors, notary_.anchors(s));
  GS_ASSIGN(b.check, check_anchor(chain_, b.prev, b.anchors));
  if (!b.check.ok()) return Error(Errc::conflict, b.check.message);
  b.head = b.prev;
  return b;
}

Result<Head> Trail::add(Batch& b, const Event& e) {
  GS_ASSIGN(b.head, chain_.append_after(b.head, e));
  return b.head;
}

Status Trail::finish(hsm::Session& s, Batch& b, bool checkpoint, bool anchor) {
  if (b.head == b.prev) return {};
  if (checkpoint) {
    GS_ASSIGN(Checkpoint cp, notary_.sign(s, b.head, now_s()));
    GS_TRY(chain_.add_checkpoint(cp));
  }
  if (!anchor && !b.check.must_write) return {};
  GS_ASSIGN(b.anchor_object, notary_.advance(s, b.anchors, b.check.committed, b.head));
  b.anchored = true;
  return {};
}

Status Trail::confirm(hsm::Session& s, const Batch& b) {
  if (!b.anchored) return {};
  return notary_.confirm(s, b.anchor_object, b.head);
}

Status Trail::confirm(hsm::Session& s) {
  if (!last_) return {};
  Status st = confirm(s, *last_);
  last_.reset();
  return st;
}

Result<Head> Trail::append(hsm::Session& s, std::span<const Event> events, bool checkpoint) {
  GS_ASSIGN(Batch b, begin(s));
  for (const Event& e : events) GS_TRY(add(b, e));
  GS_TRY(finish(s, b, checkpoint, true));
  last_ = b;
  return b.head;
}

Status Trail::seal(hsm::Session& s, bool checkpoint) {
  GS_ASSIGN(Batch b, begin(s));
  if (checkpoint && b.head.seq > 0) {
    GS_ASSIGN(auto last, chain_.last_checkpoint());
    if (!last || last->seq < b.head.seq) {
      GS_ASSIGN(Checkpoint cp, notary_.sign(s, b.head, now_s()));
      GS_TRY(chain_.add_checkpoint(cp));
    }
  }
  if (b.head.seq == 0 && !b.anchors.exists()) return {};  // nothing to anchor yet
  GS_TRY(notary_.seal(s, b.anchors, b.head));
  return chain_.set_sealed_seq(b.head.seq);
}

Result<AnchorCheck> Trail::check(hsm::Session& s) {
  GS_ASSIGN(Head h, chain_.head());
  GS_ASSIGN(Anchors a, read_anchors(s));
  return check_anchor(chain_, h, a);
}

Result<Head> Trail::reset_anchor(hsm::Session& s, Event event) {
  GS_ASSIGN(Head prev, chain_.head());
  GS_ASSIGN(Anchors a, read_anchors(s));
  GS_ASSIGN(AnchorCheck c, check_anchor(chain_, prev, a));
  Detail d;
  d.add("previous_state", anchor_state_name(c.state)).add("table_head", prev.seq);
  if (c.newest) d.add("anchored_seq", c.newest->seq).add("anchored_hash", to_hex(c.newest->hash));
  if (!event.detail.empty()) d.add("note", event.detail);
  event.detail = d.str();
  GS_ASSIGN(Head h, chain_.append_after(prev, event));
  GS_ASSIGN(Checkpoint cp, notary_.sign(s, h, now_s()));
  GS_TRY(chain_.add_checkpoint(cp));
  GS_TRY(notary_.seal(s, a, h));
  GS_TRY(chain_.set_sealed_seq(h.seq));
  return h;
}

// ---- Writer -----------------------------------------------------------------------------------

Writer::Writer(db::Db db, HsmContext& hsm, const WriterOptions& opt, metrics::Registry* registry)
    : db_(std::move(db)), hsm_(hsm), opt_(opt) {
  if (opt_.max_batch == 0) opt_.max_batch = 1;
  if (registry == nullptr) {
    own_registry_ = std::make_unique<metrics::Registry>();
    registry = own_registry_.get();
  }
  m_records_ = &registry->counter("gridseal_audit_records_total", "Audit records committed");
  m_commits_ = &registry->counter("gridseal_audit_commits_total", "Audit transactions committed");
  m_failures_ = &registry->counter("gridseal_audit_commit_failures_total",
                                   "Audit transactions that did not commit");
  m_checkpoints_ = &registry->counter("gridseal_audit_checkpoints_total",
                                      "Audit checkpoints signed by gs-audit");
  m_commit_seconds_ = &registry->histogram("gridseal_audit_commit_seconds",
                                           "Time to append, anchor and commit one batch",
                                           metrics::latency_buckets());
  // The two parts of a batch's time that set the daemons' tail latency (README "Performance"):
  // waiting for another writer's transaction (the other SES worker's, or the CLI's), and the
  // COMMIT itself (the WAL write and its fsync).
  m_lock_wait_seconds_ = &registry->histogram(
      "gridseal_audit_write_lock_wait_seconds",
      "Time a committed audit batch waited for the store's write lock", metrics::latency_buckets());
  m_sql_commit_seconds_ = &registry->histogram(
      "gridseal_audit_sql_commit_seconds",
      "Time of a committed audit batch's COMMIT (WAL write, and its fsync unless the sync "
      "thread does it)",
      metrics::latency_buckets());
  m_fsync_seconds_ = &registry->histogram(
      "gridseal_audit_fsync_seconds",
      "Time of one fsync of the write-ahead log on the audit sync thread (audit.fsync_thread)",
      metrics::latency_buckets());
  m_synced_batches_ = &registry->counter(
      "gridseal_audit_synced_batches_total",
      "Committed audit batches made durable and released by the sync thread");
  m_batch_ = &registry->histogram("gridseal_audit_batch", "Audit records per transaction",
                                  {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096});
}

Writer::~Writer() { stop(); }

Result<AnchorCheck> check_store(db::Db& db, HsmContext& hsm) {
  GS_ASSIGN(Trail trail, Trail::over(db));
  GS_ASSIGN(auto lease, hsm.pool->acquire());
  // Under the write lock, so that no writer is between its anchor update and its COMMIT.
  GS_ASSIGN(auto tx, db::Transaction::begin(db));
  return trail.check(lease.session());
}

Result<std::unique_ptr<Writer>> Writer::open(const std::string& db_path, HsmContext& hsm,
                                             const WriterOptions& opt,
                                             metrics::Registry* registry) {
  db::OpenOptions o;
  o.create = false;
  GS_ASSIGN(db::Db db, db::Db::open(db_path, o));
  if (opt.fsync_outside_lock) GS_TRY(db.exec("PRAGMA synchronous=NORMAL"));
  std::unique_ptr<Writer> w(new Writer(std::move(db), hsm, opt, registry));
  auto trail = Trail::over(w->db_);
  if (!trail.ok()) {
    return Error(trail.error().code,
                 db_path + ": no audit tables (schema older than v4?): " + trail.error().message());
  }
  w->trail_.emplace(std::move(trail).value());
  GS_ASSIGN(w->start_, check_store(w->db_, hsm));
  if (!w->start_.ok()) {
    return Error(Errc::conflict, "audit trail check failed: " + w->start_.message);
  }
  if (w->start_.state == AnchorState::lost_batch) {
    std::fprintf(stderr, "%s: audit: %s\n", opt.program.c_str(), w->start_.message.c_str());
  }
  if (auto lease = hsm.pool->acquire(); lease.ok()) {
    w->trail_->prepare(lease->session());
    w->token_searches_.store(w->trail_->token_searches());
  }
  // Checkpoints off the commit path: SQLite runs one in the COMMIT that crosses the
  // wal_autocheckpoint threshold, with an fsync of the database file, while the write lock and
  // every response waiting for that commit wait too.
  GS_ASSIGN(w->checkpointer_, db::Checkpointer::take_over(w->db_, db_path));
  if (opt.fsync_outside_lock && opt.fsync_thread) {
    GS_ASSIGN(auto wal, db::WalSyncer::open(w->db_));
    w->wal_.emplace(std::move(wal));
    // The default policy: its wake-up after an fsync is a response's latency.
    w->sync_thread_ = std::thread([raw = w.get()] {
      name_this_thread("gs-audit-sync");
      raw->run_sync();
    });
  }
  w->thread_ = std::thread([raw = w.get()] {
    name_this_thread("gs-audit");
    if (raw->opt_.sched_batch && !use_batch_scheduling()) {
      std::fprintf(stderr, "%s: audit: SCHED_BATCH refused; default policy\n",
                   raw->opt_.program.c_str());
    }
    raw->run();
  });
  return w;
}

Status Writer::submit(Item item) {
  GS_TRY(validate(item.event));
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return Error(Errc::busy, "audit writer stopped");
    if (queue_.size() >= opt_.max_pending) {
      return Error(Errc::busy,
                   "audit writer has " + std::to_string(queue_.size()) + " records waiting");
    }
    queue_.push_back(std::move(item));
    if (opt_.caller_commits) {
      // The submitter commits; the writer thread looks on its own schedule (run_caller_commits).
      if (queue_.size() == 1) oldest_ = std::chrono::steady_clock::now();
      return {};
    }
    // The writer waits for the first record of a batch, then (batch_delay_us) for a full batch
    // or stop: only those two events can end its wait. Waking it for every record cost a futex
    // wake and a context switch per record for a predicate that is still false.
    wake = queue_.size() == 1 || queue_.size() == opt_.max_batch;
  }
  if (wake) cv_.notify_one();
  return {};
}

Status Writer::append(Event e, std::chrono::milliseconds timeout) {
  auto promise = std::make_shared<std::promise<Status>>();
  auto future = promise->get_future();
  Item it;
  it.event = std::move(e);
  it.done = [promise](const Status& st) { promise->set_value(st); };
  GS_TRY(submit(std::move(it)));
  if (opt_.caller_commits) commit_queued();
  if (future.wait_for(timeout) != std::future_status::ready) {
    return Error(Errc::busy, "the audit writer did not commit within " +
                                 std::to_string(timeout.count()) + " ms");
  }
  return future.get();
}

void Writer::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // The writer thread's last seal fsynced everything committed; the sync thread releases what
  // it still holds and ends.
  {
    std::lock_guard<std::mutex> lock(sync_mu_);
    sync_stopping_ = true;
  }
  sync_cv_.notify_all();
  if (sync_thread_.joinable()) sync_thread_.join();
  checkpointer_.reset();
  std::lock_guard<std::mutex> lock(mu_);
  stopped_ = true;
}

WriterStats Writer::stats() const {
  return {records_.load(),     commits_.load(), failures_.load(),
          checkpoints_.load(), seals_.load(),   token_searches_.load()};
}

bool Writer::checkpoint_due(std::int64_t now) {
  return opt_.checkpoint_interval.count() == 0 || now >= next_checkpoint_check_;
}

void Writer::commit_queued() {
  std::lock_guard<std::mutex> a(apply_mu_);
  std::size_t n;
  {
    std::lock_guard<std::mutex> lock(mu_);
    n = queue_.size();
  }
  if (n > 0) take_and_apply(n);
}

void Writer::take_and_apply(std::size_t limit) {
  const bool all = limit == 0;
  std::vector<Item> batch;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::size_t n = std::min(queue_.size(), opt_.max_batch);
      if (!all) n = std::min(n, limit);
      batch.reserve(n);
      for (std::size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
    }
    if (batch.empty()) return;
    if (!all) limit -= batch.size();
    apply(batch);
    batch.clear();
    if (!all && limit == 0) return;
  }
}

void Writer::run_caller_commits() {
  // A submitter that does not commit is covered here: what has waited a whole poll period is
  // committed on this thread. Looking every 5 ms (or max_delay, when longer) costs 200
  // wake-ups a second instead of one per batch; a submitter's commit queued behind a few ms of
  // requests is not taken from it.
  const auto poll = std::max<std::chrono::steady_clock::duration>(opt_.max_delay,
                                                                  std::chrono::milliseconds(5));
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    cv_.wait_for(lock, poll, [this] { return stopping_; });
    if (stopping_) break;
    const auto now = std::chrono::steady_clock::now();
    const bool stale = !queue_.empty() && now - oldest_ >= poll;
    const bool idle = queue_.empty();
    lock.unlock();
    {
      std::lock_guard<std::mutex> a(apply_mu_);
      if (stale) {
        take_and_apply(0);
      } else if (idle && dirty_ && now - last_commit_ >= opt_.seal_after_idle) {
        seal(checkpoint_due(now_s()));
      }
    }
    lock.lock();
  }
  lock.unlock();
  std::lock_guard<std::mutex> a(apply_mu_);
  take_and_apply(0);
  seal(true);  // clean stop: final checkpoint, both anchors at the head
}

void Writer::run() {
  if (opt_.caller_commits) {
    run_caller_commits();
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    if (queue_.empty() && !stopping_) {
      if (dirty_) {
        // Idle: seal the anchor once nothing came for seal_after_idle.
        if (!cv_.wait_for(lock, opt_.seal_after_idle,
                          [this] { return stopping_ || !queue_.empty(); })) {
          lock.unlock();
          {
            std::lock_guard<std::mutex> a(apply_mu_);
            seal(checkpoint_due(now_s()));
          }
          lock.lock();
          continue;
        }
      } else {
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      }
    }
    if (queue_.empty()) break;  // stopping and drained
    // The delay counts from when the writer looks, not from the oldest record: records that
    // came during the last commit wait it again. Counting from the oldest (as the DKUS's replay
    // committer does) halved the SES's batches under full load (25 -> 14.5 records), 55 % more
    // commits and 5-15 % fewer secured commands/s on 2 cores; the wait is what gathers them.
    if (opt_.max_delay.count() > 0 && queue_.size() < opt_.max_batch && !stopping_) {
      cv_.wait_for(lock, opt_.max_delay,
                   [this] { return stopping_ || queue_.size() >= opt_.max_batch; });
    }
    // apply_mu_ comes before mu_: a commit_queued() in progress finishes first.
    lock.unlock();
    {
      std::lock_guard<std::mutex> a(apply_mu_);
      take_and_apply(opt_.max_batch);
    }
    lock.lock();
  }
  lock.unlock();
  std::lock_guard<std::mutex> a(apply_mu_);
  seal(true);  // clean stop: final checkpoint, both anchors at the head
}

void Writer::apply(std::vector<Item>& batch) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t now = now_s();
  std::vector<Status> outcome(batch.size());
  std::size_t kept = 0;
  bool signed_cp = false;
  bool anchored = false;
  bool handed_over = false;  // to the sync thread (WriterOptions::fsync_thread)
  // Where a slow batch spent its time (logged below): session, write lock, chain head and
  // anchor read, records, checkpoint and anchor write, COMMIT (fsync).
  using Clock = std::chrono::steady_clock;
  std::array<Clock::time_point, 7> mark{};
  bool anchor_read = false;
  auto attempt = [&]() -> Status {
    std::fill(outcome.begin(), outcome.end(), Status{});
    kept = 0;
    signed_cp = false;
    anchored = false;
    mark[0] = Clock::now();
    GS_ASSIGN(auto lease, hsm_.pool->acquire());
    hsm::Session& s = lease.session();
    mark[1] = Clock::now();
    GS_ASSIGN(auto tx, db::Transaction::begin(db_));
    mark[2] = Clock::now();
    // The first transaction (last_anchor_ is the epoch) and then one per anchor_interval read,
    // check and advance the HSM anchor; the others make no HSM call unless a checkpoint is due.
    const bool anchor = opt_.anchor_interval.count() == 0 ||
                        std::chrono::steady_clock::now() - last_anchor_ >= opt_.anchor_interval;
    anchor_read = anchor;
    GS_ASSIGN(Batch b, trail_->begin(s, anchor));
    mark[3] = Clock::now();
    for (std::size_t i = 0; i < batch.size(); ++i) {
      Item& it = batch[i];
      if (it.event.time == 0) it.event.time = now;
      if (!it.action) {
        GS_TRY(trail_->add(b, it.event));
        ++kept;
        continue;
      }
      GS_TRY(db_.exec("SAVEPOINT audit_item"));
      Status one = it.action(db_);
      if (one.ok()) {
        auto h = trail_->add(b, it.event);
        if (!h.ok()) one = std::move(h).error();
      }
      if (one.ok()) {
        ++kept;
      } else {
        GS_TRY(db_.exec("ROLLBACK TO audit_item"));
        outcome[i] = std::move(one);
      }
      GS_TRY(db_.exec("RELEASE audit_item"));
    }
    mark[4] = Clock::now();
    bool cp = false;
    if (b.head.seq > b.prev.seq && checkpoint_due(now)) {
      if (opt_.checkpoint_interval.count() == 0) {
        cp = true;
      } else {
        GS_ASSIGN(auto last, trail_->chain().last_checkpoint());
        const std::int64_t interval = opt_.checkpoint_interval.count();
        cp = !last || last->time + interval <= now;
        next_checkpoint_check_ = cp || !last ? now + interval : last->time + interval;
      }
    }
    GS_TRY(trail_->finish(s, b, cp, anchor));
    signed_cp = cp;
    mark[5] = Clock::now();
    GS_TRY(tx.commit());
    handed_over = wal_.has_value() && !b.anchored;  // wal_: fsync_outside_lock and fsync_thread
    if (opt_.fsync_outside_lock && !handed_over) GS_TRY(db_.sync_wal());
    mark[6] = Clock::now();
    anchored = b.anchored;
    if (Status c = trail_->confirm(s, b); !c.ok()) {
      // The records are durable; the anchor stays pending (reported as lost_batch after a crash).
      log_failure("confirming the anchor failed: " + c.error().message());
    }
    return {};
  };
  // Other processes' writers hold the write lock in turn; SQLite's busy handler is not fair, so
  // a batch that timed out waiting for it is tried again (nothing of it was kept).
  constexpr int kBusyRetries = 5;
  Status st = attempt();
  for (int retry = 0; !st.ok() && st.error().code == Errc::busy && retry < kBusyRetries; ++retry) {
    st = attempt();
  }
  const auto took = std::chrono::steady_clock::now() - t0;
  m_commit_seconds_->observe(took);
  token_searches_.store(trail_->token_searches());
  if (st.ok() && took >= kSlowBatch) {
    auto ms = [&](int i) {
      return std::chrono::duration<double, std::milli>(mark[i + 1] - mark[i]).count();
    };
    char line[320];
    std::snprintf(line, sizeof line,
                  "slow batch: %zu records in %.1f ms (HSM session %.1f, write lock %.1f, chain "
                  "head%s %.1f, records %.1f, checkpoint/anchor %.1f, commit %.1f ms)",
                  batch.size(), std::chrono::duration<double, std::milli>(took).count(), ms(0),
                  ms(1), anchor_read ? " and HSM anchor" : "", ms(2), ms(3), ms(4), ms(5));
    log_failure(line);
  }
  if (!st.ok()) {
    failures_.fetch_add(1);
    m_failures_->inc();
    healthy_ = false;
    log_failure("a batch of " + std::to_string(batch.size()) +
                " records did not commit: " + st.error().message());
    run_around(opt_.around_done, [&] {
      for (auto& it : batch) {
        if (it.done) it.done(st);
      }
    });
    return;
  }
  healthy_ = true;
  dirty_ = true;
  last_commit_ = std::chrono::steady_clock::now();
  if (anchored) last_anchor_ = std::chrono::steady_clock::now();
  commits_.fetch_add(1);
  records_.fetch_add(kept);
  m_commits_->inc();
  m_records_->inc(kept);
  m_batch_->observe(static_cast<double>(kept));
  m_lock_wait_seconds_->observe(mark[2] - mark[1]);
  m_sql_commit_seconds_->observe(mark[6] - mark[5]);
  if (signed_cp) {
    checkpoints_.fetch_add(1);
    m_checkpoints_->inc();
  }
  if (handed_over) {
    {
      std::lock_guard<std::mutex> lock(sync_mu_);
      to_sync_.push_back(Committed{std::move(batch), std::move(outcome)});
    }
    sync_cv_.notify_one();
    return;
  }
  run_around(opt_.around_done, [&] {
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (batch[i].done) batch[i].done(outcome[i]);
    }
  });
}

void Writer::run_sync() {
  std::unique_lock<std::mutex> lock(sync_mu_);
  for (;;) {
    sync_cv_.wait(lock, [this] { return sync_stopping_ || !to_sync_.empty(); });
    if (to_sync_.empty()) return;  // stopping, nothing left
    std::vector<Committed> work;
    work.swap(to_sync_);
    lock.unlock();
    // Every batch in `work` committed before it was handed over, so before this fsync began.
    if (opt_.before_fsync) opt_.before_fsync();
    const auto t0 = std::chrono::steady_clock::now();
    const Status st = wal_->sync();
    m_fsync_seconds_->observe(std::chrono::steady_clock::now() - t0);
    sync_failing_ = !st.ok();
    if (!st.ok()) {
      // Committed but perhaps not durable: refused like a batch whose COMMIT failed.
      failures_.fetch_add(1);
      m_failures_->inc();
      log_failure("committed records were not made durable: " + st.error().message());
    }
    m_synced_batches_->inc(work.size());
    run_around(opt_.around_done, [&] {
      for (Committed& c : work) {
        for (std::size_t i = 0; i < c.items.size(); ++i) {
          if (!c.items[i].done) continue;
          try {
            c.items[i].done(st.ok() ? c.outcome[i] : st);
          } catch (const std::exception& e) {
            // One completion failing (out of memory) must not end the thread and the process.
            log_failure(std::string("a completion failed: ") + e.what());
          }
        }
      }
    });
    lock.lock();
  }
}

void Writer::seal(bool checkpoint) {
  Status st = [&]() -> Status {
    GS_ASSIGN(auto lease, hsm_.pool->acquire());
    GS_ASSIGN(auto tx, db::Transaction::begin(db_));
    GS_TRY(trail_->seal(lease.session(), checkpoint));
    GS_TRY(tx.commit());
    return opt_.fsync_outside_lock ? db_.sync_wal() : Status{};
  }();
  token_searches_.store(trail_->token_searches());
  if (st.ok()) {
    seals_.fetch_add(1);
    dirty_ = false;
    if (checkpoint && opt_.checkpoint_interval.count() > 0) {
      next_checkpoint_check_ = now_s() + opt_.checkpoint_interval.count();
    }
    return;
  }
  healthy_ = false;
  log_failure("sealing the anchor failed: " + st.error().message());
}

void Writer::log_failure(const std::string& what) {
  std::lock_guard<std::mutex> lock(log_mu_);
  const auto now = std::chrono::steady_clock::now();
  if (last_log_.time_since_epoch().count() != 0 && now - last_log_ < std::chrono::seconds(1)) {
    ++suppressed_;
    return;
  }
  if (suppressed_ > 0) {
    std::fprintf(stderr, "%s: audit: (%llu more failures or slow batches in the last second)\n",
                 opt_.program.c_str(), static_cast<unsigned long long>(suppressed_));
  }
  suppressed_ = 0;
  last_log_ = now;
  std::fprintf(stderr, "%s: audit: %s\n", opt_.program.c_str(), what.c_str());
}

// ---- verify -----------------------------------------------------------------------------------

namespace {

std::string range_text(std::int64_t a, std::int64_t b) {
  return a == b ? "record " + std::to_string(a)
                : "records " + std::to_string(a) + ".." + std::to_string(b);
}

// A record whose content does not match its hash: was it written for another position?
Result<Finding> classify_changed(Chain& chain, const Record& r) {
  constexpr std::int64_t kSearch = 16;
  for (std::int64_t d = 1; d <= kSearch; ++d) {
    for (std::int64_t other : {r.seq + d, r.seq - d}) {
      if (other < 1) continue;
      Record c = r;
      c.seq = other;
      if (record_hash(c) != r.hash) continue;
      const std::string now = std::to_string(r.seq);
      const std::string was = std::to_string(other);
      if (other > r.seq) {
        GS_ASSIGN(auto there, chain.record(other));
        if (there) {
          Record o = *there;
          o.seq = r.seq;
          if (record_hash(o) == o.hash) {
            return Finding{r.seq, "reordered",
                           "records " + now + " and " + was + " were swapped (reordered)"};
          }
        }
        return Finding{r.seq, "deleted",
                       range_text(r.seq, other - 1) +
                           " deleted and the later records renumbered: the record now numbered " +
                           now + " was written as record " + was};
      }
      return Finding{other, "inserted",
                     range_text(other, r.seq - 1) + " inserted: the record now numbered " + now +
                         " was written as record " + was};
    }
  }
  return Finding{r.seq, "changed",
                 "record " + std::to_string(r.seq) +
                     " was changed: its content does not match "
                     "its hash"};
}

}  // namespace

Result<VerifyReport> verify(db::Db& db, const VerifyOptions& opt) {
  VerifyReport rep;
  std::int64_t from = std::max<std::int64_t>(1, opt.from);
  std::optional<HostEcKey> key;
  if (!opt.public_key.empty()) {
    auto k = HostEcKey::from_public(opt.public_key);
    if (!k.ok())
      return Error(Errc::invalid_argument, "gs-audit public key: " + k.error().message());
    key.emplace(std::move(k).value());
  }
  GS_ASSIGN(Chain chain, Chain::over(db));
  GS_ASSIGN(auto recs, db.prepare(std::string(kRecordColumns) + "WHERE seq >= ?1 ORDER BY seq"));
  GS_ASSIGN(auto cps, db.prepare(std::string(kCheckpointColumns) + "WHERE seq >= ?1 ORDER BY seq"));
  db::ReadTransaction tx(db);
  std::optional<Anchors> anchors = opt.anchors;
  {
    std::optional<db::ReadTransaction> locked;
    if (opt.lock != nullptr) {
      locked.emplace(*opt.lock);
      GS_TRY(locked->begin("BEGIN IMMEDIATE"));
    }
    GS_TRY(tx.begin());
    GS_ASSIGN(const Head snapshot, chain.head());  // the read snapshot starts here
    (void)snapshot;
    if (opt.read_anchors) {
      GS_ASSIGN(Anchors a, opt.read_anchors());
      anchors = std::move(a);
    }
  }
  GS_ASSIGN(const Head table_head, chain.head());
  auto fail = [&](Finding f) { rep.failure = std::move(f); };

  // Records 1..base are in archive files; the table is checked from base + 1 on.
  GS_ASSIGN(const std::optional<Archive> arch, newest_archive(db));
  const std::int64_t base = arch ? arch->through : 0;
  if (arch) {
    rep.archived_through = base;
    rep.notes.push_back({base, "archived",
                         "records 1.." + std::to_string(base) +
                             " are archived (the newest archive: records " +
                             std::to_string(arch->first_seq) + ".." + std::to_string(base) +
                             " in " + arch->file + ", SHA-256 " + to_hex(arch->sha256) +
                             ", registered by record " + std::to_string(arch->record_seq) + ")"});
    from = std::max(from, base + 1);
  }

  Digest expected_prev{};
  bool have_prev = true;
  if (arch && from == base + 1) {
    // The signed checkpoint at the archive's end is the base the table links to.
    GS_ASSIGN(auto bcp, chain.checkpoint_at(base));
    if (!bcp) {
      fail({base + 1, "archive_base",
            "the signed checkpoint at record " + std::to_string(base) + ", where the archive " +
                arch->file + " ends, is gone: the start of the table cannot be checked"});
    } else if (key && !key->verify(checkpoint_digest(bcp->seq, bcp->head, bcp->time),
                                   bcp->signature)
                           .ok()) {
      fail({base, "bad_checkpoint",
            "the checkpoint at record " + std::to_string(base) +
                " (the end of the newest archive) does not verify with gs-audit's public key"});
    } else {
      expected_prev = bcp->head;
      rep.last_checkpoint_seq = base;
      ++rep.checkpoints;
    }
    if (Status st = check_registration(chain, *arch); !st.ok() && !rep.failure) {
      fail({arch->record_seq, "unregistered_archive", st.error().message()});
    }
    GS_ASSIGN(auto left, db.prepare("SELECT count(*) FROM audit WHERE seq <= ?1"));
    left.bind(1, base);
    GS_ASSIGN(db::Step ls, left.step());
    if (ls == db::Step::row && left.int64(0) > 0) {
      rep.notes.push_back({base, "archived_not_deleted",
                           std::to_string(left.int64(0)) +
                               " archived records are still in the table (an archive run "
                               "stopped before it deleted them all; the next run does)"});
    }
  } else if (from > 1) {
    GS_ASSIGN(auto before, chain.record(from - 1));
    if (before) {
      expected_prev = before->hash;
    } else {
      have_prev = false;
      rep.notes.push_back({from, "unchecked_link",
                           "record " + std::to_string(from - 1) +
                               " is not in the table: the link of record " + std::to_string(from) +
                               " is not checked"});
    }
  }

  recs.bind(1, from);
  cps.bind(1, from);
  GS_ASSIGN(db::Step cp_step, cps.step());
  std::optional<Checkpoint> cp;
  if (cp_step == db::Step::row) cp = read_checkpoint(cps);
  auto next_cp = [&]() -> Status {
    GS_ASSIGN(db::Step s, cps.step());
    cp.reset();
    if (s == db::Step::row) cp = read_checkpoint(cps);
    return {};
  };
  std::int64_t expected = from;
  std::int64_t covered = from - 1;  // the newest seq whose checkpoint matched

  while (!rep.failure) {
    GS_ASSIGN(db::Step step, recs.step());
    if (step != db::Step::row) break;
    GS_ASSIGN(Record r, read_record(recs));
    if (r.seq != expected) {
      fail({expected, "deleted",
            range_text(expected, r.seq - 1) + " missing (deleted): the table goes from record " +
                std::to_string(expected - 1) + " to " + std::to_string(r.seq)});
      break;
    }
    if (record_hash(r) != r.hash) {
      GS_ASSIGN(Finding f, classify_changed(chain, r));
      fail(std::move(f));
      break;
    }
    if (have_prev && r.prev_hash != expected_prev) {
      const std::int64_t bad = r.seq > from ? r.seq - 1 : r.seq;
      fail({bad, "changed",
            "record " + std::to_string(bad) + " was changed and its hash recomputed: record " +
                std::to_string(r.seq) + " does not link to it"});
      break;
    }
    while (cp && cp->seq <= r.seq && !rep.failure) {
      if (cp->seq == r.seq) {
        if (cp->head != r.hash) {
          fail({covered + 1, "rewritten",
                range_text(covered + 1, r.seq) + " no longer match the checkpoint signed at " +
                    "record " + std::to_string(r.seq) + ": the chain was rewritten"});
        } else if (key &&
                   !key->verify(checkpoint_digest(cp->seq, cp->head, cp->time), cp->signature)
                        .ok()) {
          fail({r.seq, "bad_checkpoint",
                "the checkpoint at record " + std::to_string(r.seq) +
                    " does not verify with gs-audit's public key (changed or forged)"});
        } else {
          covered = r.seq;
          rep.last_checkpoint_seq = r.seq;
          ++rep.checkpoints;
        }
      }
      GS_TRY(next_cp());
    }
    if (rep.failure) break;
    if (anchors) {
      for (const AnchorValue& v : anchors->values) {
        // A mismatching pending value is a transaction that died (check_anchor reports it).
        if (v.head.seq == r.seq && v.head.hash != r.hash && v.mark != AnchorMark::pending) {
          fail({covered + 1, "rewritten",
                range_text(covered + 1, r.seq) + " no longer match the HSM anchor at record " +
                    std::to_string(r.seq) + ": the chain was rewritten"});
        }
      }
    }
    if (rep.records == 0) rep.first_seq = r.seq;
    rep.last_seq = r.seq;
    ++rep.records;
    expected_prev = r.hash;
    have_prev = true;
    ++expected;
  }
  recs.reset();

  if (!rep.failure && cp) {
    fail({table_head.seq + 1, "truncated",
          "a checkpoint covers record " + std::to_string(cp->seq) + " but the table ends at " +
              std::to_string(table_head.seq) + ": " + range_text(table_head.seq + 1, cp->seq) +
              " removed"});
  }
  cps.reset();
  if (!rep.failure && anchors) {
    GS_ASSIGN(AnchorCheck c, check_anchor(chain, table_head, *anchors));
    rep.anchor = c;
    if (!c.ok()) {
      std::int64_t seq = table_head.seq + 1;
      if (c.state == AnchorState::beyond_anchor && c.newest) seq = c.newest->seq + 1;
      if (c.state == AnchorState::rewritten || c.state == AnchorState::missing) seq = covered + 1;
      fail({seq, anchor_state_name(c.state), c.message});
    } else if (c.state == AnchorState::lost_batch) {
      rep.notes.push_back({table_head.seq + 1, "lost_batch", c.message});
    } else if (c.unanchored > 0 || c.stale_pending) {
      rep.notes.push_back({c.committed ? c.committed->seq + 1 : 1,
                           c.stale_pending ? "stale_pending" : "unanchored", c.message});
    }
  }
  if (!rep.failure) {
    if (!anchors) {
      rep.notes.push_back({0, "anchor_unchecked",
                           "the HSM anchor was not checked: truncation of "
                           "the tail cannot be detected"});
    }
    if (!key) {
      rep.notes.push_back({0, "signatures_unchecked",
                           "checkpoint signatures were not checked (no gs-audit public key)"});
    }
    if (rep.records > 0 && rep.last_checkpoint_seq < table_head.seq) {
      const bool anchored = rep.anchor && rep.anchor->ok() && rep.anchor->unanchored == 0;
      rep.notes.push_back({rep.last_checkpoint_seq + 1, "unsigned_tail",
                           range_text(std::max(rep.last_checkpoint_seq + 1, from), table_head.seq) +
                               " not covered by a signed checkpoint yet" +
                               (anchored ? " (held by the HSM anchor)" : "")});
    }
  }
  rep.ok = !rep.failure;
  return rep;
}

// ---- export -----------------------------------------------------------------------------------

namespace {

Bytes der_signature(const Signature& sig) {
  ECDSA_SIG* s = ECDSA_SIG_new();
  BIGNUM* r = BN_bin2bn(sig.data(), 32, nullptr);
  BIGNUM* t = BN_bin2bn(sig.data() + 32, 32, nullptr);
  Bytes out;
  if (s != nullptr && r != nullptr && t != nullptr && ECDSA_SIG_set0(s, r, t) == 1) {
    r = t = nullptr;  // owned by s now
    const int n = i2d_ECDSA_SIG(s, nullptr);
    if (n > 0) {
      out.resize(static_cast<std::size_t>(n));
      unsigned char* p = out.data();
      if (i2d_ECDSA_SIG(s, &p) != n) out.clear();
    }
  }
  BN_free(r);
  BN_free(t);
  ECDSA_SIG_free(s);
  return out;
}

}  // namespace

std::string record_json(const Record& r) {
  return "{\"type\":\"record\",\"seq\":" + std::to_string(r.seq) +
         ",\"time\":" + std::to_string(r.e.time) + ",\"actor\":" + json_string(r.e.actor) +
         ",\"event\":" + json_string(r.e.event) + ",\"subject\":" + json_string(r.e.subject) +
         ",\"detail\":" + json_string(r.e.detail) + ",\"prev_hash\":\"" + to_hex(r.prev_hash) +
         "\",\"hash\":\"" + to_hex(r.hash) + "\"}\n";
}

std::string checkpoint_json(const Checkpoint& c) {
  return "{\"type\":\"checkpoint\",\"seq\":" + std::to_string(c.seq) + ",\"head\":\"" +
         to_hex(c.head) + "\",\"time\":" + std::to_string(c.time) + ",\"signature\":\"" +
         to_hex(c.signature) + "\",\"signature_der\":\"" + to_hex(der_signature(c.signature)) +
         "\",\"signed\":\"" + to_hex(checkpoint_encoding(c.seq, c.head, c.time)) + "\"}\n";
}

Result<ExportSummary> export_jsonl(db::Db& db, const ExportOptions& opt, std::FILE* out) {
  ExportSummary sum;
  GS_ASSIGN(Chain chain, Chain::over(db));
  GS_ASSIGN(auto recs, db.prepare(std::string(kRecordColumns) + "WHERE seq >= ?1 ORDER BY seq"));
  GS_ASSIGN(auto cps, db.prepare(std::string(kCheckpointColumns) + "WHERE seq >= ?1 ORDER BY seq"));
  db::ReadTransaction tx(db);
  GS_TRY(tx.begin());
  GS_ASSIGN(const Head head, chain.head());
  GS_ASSIGN(auto first, chain.first_seq_since(opt.since));
  sum.first_seq = first.value_or(head.seq + 1);
  sum.last_seq = head.seq;

  std::string line = "{\"type\":\"header\",\"format\":\"gridseal-audit-1\",\"exported_at\":" +
                     std::to_string(now_s()) + ",\"since\":" + std::to_string(opt.since) +
                     ",\"first_seq\":" + std::to_string(sum.first_seq) +
                     ",\"last_seq\":" + std::to_string(sum.last_seq);
  if (!opt.public_key.empty()) {
    line += ",\"public_key_sha256\":\"" + to_hex(sha256_of(opt.public_key)) + "\"";
  }
  line += "}\n";
  auto emit = [&](const std::string& l) -> Status {
    if (std::fwrite(l.data(), 1, l.size(), out) != l.size()) {
      return Error(Errc::storage_failure, "cannot write the export");
    }
    return {};
  };
  GS_TRY(emit(line));

  recs.bind(1, sum.first_seq);
  cps.bind(1, sum.first_seq);
  GS_ASSIGN(db::Step cs, cps.step());
  std::optional<Checkpoint> cp;
  if (cs == db::Step::row) cp = read_checkpoint(cps);
  for (;;) {
    GS_ASSIGN(db::Step step, recs.step());
    if (step != db::Step::row) break;
    GS_ASSIGN(Record r, read_record(recs));
    GS_TRY(emit(record_json(r)));
    ++sum.records;
    while (cp && cp->seq <= r.seq) {
      if (cp->seq == r.seq) {
        GS_TRY(emit(checkpoint_json(*cp)));
        ++sum.checkpoints;
      }
      GS_ASSIGN(db::Step n, cps.step());
      cp.reset();
      if (n == db::Step::row) cp = read_checkpoint(cps);
    }
  }
  recs.reset();
  cps.reset();
  if (std::fflush(out) != 0) return Error(Errc::storage_failure, "cannot write the export");
  return sum;
}

Status record_worker_start(Writer& w, std::string_view program, int worker) {
  Detail d;
  d.add("worker", worker).add("pid", static_cast<std::int64_t>(::getpid()));
  d.add("audit_anchor", anchor_state_name(w.start_check().state));
  return w.append({0, kSystemActor, "start", std::string(program), d.str()});
}

void record_worker_stop(Writer& w, std::string_view program, int worker) {
  Detail d;
  d.add("worker", worker).add("pid", static_cast<std::int64_t>(::getpid()));
  if (Status st = w.append({0, kSystemActor, "stop", std::string(program), d.str()}); !st.ok()) {
    std::fprintf(stderr, "%.*s: worker %d: audit stop record: %s\n",
                 static_cast<int>(program.size()), program.data(), worker,
                 st.error().message().c_str());
  }
  w.stop();
}

}  // namespace gs::audit
