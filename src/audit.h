// The tamper-evident audit trail (issue 7): hash-chained records in SQLite written in the same
// transaction as the action they record, checkpoints signed by gs-audit in the HSM, an anchor of
// the chain head kept in the HSM, verification that names the first bad record, JSONL export.
//
// Record (table `audit`): seq (1, 2, 3 … without gaps; archived records leave from the front, see
// "archives" below), time (UTC seconds), actor (who: a TLS client subject, "operator:<name>",
// "system"), event (what: [a-z0-9_.-]{1,48}), subject (on what: meter id, key label,
// campaign…), detail (compact JSON object, at most kMaxDetail bytes), prev_hash, hash. Text
// fields are valid UTF-8 and bounded (validate(), clip()).
//   hash = SHA-256( "GSAR1" || u64(seq) || i64(time) || lp(actor) || lp(event) || lp(subject)
//                   || lp(detail) || prev_hash )
//   u64/i64: 8 bytes big-endian (two's complement); lp(x) = u32 big-endian byte length || bytes;
//   prev_hash of record 1 = 32 zero bytes.
// Checkpoint (table `audit_checkpoints`): (seq, head = hash of record seq, time, signature):
//   signature = ECDSA P-256 by gs-audit (r || s, 64 bytes) over
//               SHA-256( "GSAC1" || u64(seq) || head || i64(time) ).
// Written when checkpoint_interval has passed since the newest checkpoint (whichever process
// writes next), and at every clean stop.
//
// Anchor (outside the SQLite file): two token data objects of application "gs-audit-anchor" in
// the HSM (CKO_DATA, private: reading and writing need the user PIN), each holding the text
// "GSAA1 <seq> <head in hex> <S|C|P>" (in CKA_LABEL: SoftHSM2 does not let CKA_VALUE change).
// Deleting the newest records and their checkpoints leaves a shorter chain that still verifies,
// so the head must also live where an attacker with write access to the file cannot roll it
// back. At most once per anchor_interval per writer (and in the first transaction after a
// seal, which the audit_seal row tells without asking the HSM), an append transaction, holding
// SQLite's write lock (BEGIN IMMEDIATE), reads the two values, checks them against the table,
// and writes the new head as "P" (pending) into the object that does not hold the newest
// committed value, before COMMIT; after COMMIT it rewrites it as "C" (committed). Other
// transactions make no HSM call (a token-object access on SoftHSM2 takes the token's lock that
// the signing path needs). A clean stop and an idle writer "seal": both := head, "S".
// Hence, at the next start or `audit verify`:
//   * every anchored record must be in the table with the anchored hash (else rewritten);
//   * a sealed pair: the table must end exactly there (shorter: truncated or rolled back;
//     longer: records appended by something other than a gridseal writer);
//   * an S or C value beyond the end of the table: truncated (those records did commit);
//   * a P value beyond it: a transaction that died between its anchor write and COMMIT or its
//     confirmation (lost_batch, reported; the next anchor update overwrites it); a P value the
//     table went past with another hash: the same, seen after other writers went on (reported);
//   * records after the newest anchored one: written since the last anchor update (reported).
// So what an attacker with write access to the file can remove unnoticed is what was written in
// the last anchor_interval (plus the batch in flight) before a crash or while the daemon runs,
// and nothing once a clean stop or an idle moment sealed the pair. anchor_interval 0 anchors
// every transaction; on SoftHSM2 the token-object accesses that needs cost the SES about half
// its rate (README figure), hence the default of one second. Two objects also survive a torn
// write of one. Signing a checkpoint in every transaction would not replace the anchor:
// deleting the last records and their checkpoints leaves a shorter chain that still verifies.
//
// Guarantee the SES gives (README "Audit trail"): a secured command is handed to its connection
// only after the transaction holding its record committed and the WAL holding it was fsync'd
// (inside COMMIT with synchronous=FULL, or after it: WriterOptions::fsync_outside_lock). A kill -9
// between that COMMIT and the socket write leaves a record of a command that never left the
// process: "issued" (its invocation id is consumed, never reused; no meter can execute it).
//
// What the chain proves: that no record covered by a checkpoint or the anchor was changed,
// deleted, reordered or inserted since. It does not authenticate who wrote a record: keep the
// database writable only by the service user. Nothing here ever holds key material or PINs;
// callers put identities, meter ids, classes, invocation ids and reasons in records.
//
// Appending: Trail::append inside the caller's BEGIN IMMEDIATE transaction, so the action and its
// record commit together (one fsync). High-rate daemons use Writer: a thread with its own
// connection that takes every queued item and appends them in one transaction per batch, running
// each item's own database action in the same transaction, and reports each outcome only after
// COMMIT returned. The SES releases a secured command only from that callback (ses_service.cc).
// With WriterOptions::caller_commits the submitters commit on their own threads instead
// (commit_queued(); the SES's handler does once its queue of requests has run empty), and the
// writer thread only commits what was left waiting, seals and stops.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "hsm/session.h"
#include "hsm/types.h"
#include "src/sqlite.h"

namespace gs {
struct HsmContext;
namespace metrics {
class Registry;
class Counter;
class Histogram;
}  // namespace metrics
}  // namespace gs

namespace gs::audit {

inline constexpr std::size_t kMaxActor = 512;
inline constexpr std::size_t kMaxEvent = 48;
inline constexpr std::size_t kMaxSubject = 256;
inline constexpr std::size_t kMaxDetail = 2048;
inline constexpr std::size_t kMaxDetailValue = 512;              // one string value inside Detail
inline constexpr char kAnchorApplication[] = "gs-audit-anchor";  // CKA_APPLICATION
inline constexpr const char* kSystemActor = "system";

using Digest = std::array<std::uint8_t, 32>;
using Signature = std::array<std::uint8_t, 64>;

// One thing that happened. time 0: stamped with the current UTC time when appended.
struct Event {
  std::int64_t time = 0;
  std::string actor;
  std::string event;
  std::string subject;
  std::string detail;
};

struct Record {
  std::int64_t seq = 0;
  Event e;
  Digest prev_hash{};
  Digest hash{};
};

// The end of the chain: the last record's seq and hash (seq 0 and zeros when empty).
struct Head {
  std::int64_t seq = 0;
  Digest hash{};
  bool operator==(const Head&) const = default;
};

struct Checkpoint {
  std::int64_t seq = 0;
  Digest head{};
  std::int64_t time = 0;
  Signature signature{};
};

// ---- canonical encodings (README "Audit trail") -------------------------------------------

Bytes record_encoding(const Record& r);
Digest record_hash(const Record& r);
Bytes checkpoint_encoding(std::int64_t seq, const Digest& head, std::int64_t time);
Digest checkpoint_digest(std::int64_t seq, const Digest& head, std::int64_t time);
// One anchor object's value: the head it holds and its state.
enum class AnchorMark : char { sealed = 'S', committed = 'C', pending = 'P' };
struct AnchorValue {
  Head head;
  AnchorMark mark = AnchorMark::pending;
  hsm::ObjectHandle object = hsm::kNoObject;
};
// "GSAA1 <seq> <hash hex> S|C|P": the text an anchor object holds.
std::string anchor_encoding(const Head& h, AnchorMark mark);
std::optional<AnchorValue> anchor_decode(std::string_view text);

// Refuses (Errc::invalid_argument, naming the field) an event whose fields are not valid UTF-8,
// are longer than the limits above, or whose name is not [a-z0-9_.-]{1,48}; the actor is
// required.
Status validate(const Event& e);
// `text` as valid UTF-8 of at most `max` bytes: invalid bytes become '?', control characters
// ' ', and a cut keeps whole characters and ends in "...".
std::string clip(std::string_view text, std::size_t max);

// A compact JSON object for Event::detail: keys in the order added, strings escaped (UTF-8 kept,
// control characters as \u00XX).
class Detail {
 public:
  Detail& add(std::string_view key, std::string_view value);
  Detail& add(std::string_view key, const char* value) { return add(key, std::string_view(value)); }
  Detail& add(std::string_view key, std::int64_t value);
  Detail& add(std::string_view key, std::uint64_t value);
  Detail& add(std::string_view key, int value) { return add(key, std::int64_t{value}); }
  Detail& add(std::string_view key, unsigned value) { return add(key, std::uint64_t{value}); }
  // The object text, clipped to kMaxDetail (a cut object is closed as {"truncated":true}).
  std::string str() const;

 private:
  std::string body_;
};

// JSON string literal of UTF-8 text (quotes included), as Detail and the export write it.
std::string json_string(std::string_view s);

// ---- the tables, on one connection ----------------------------------------------------------

class Chain {
 public:
  // Prepares the statements; `db` (schema v4 or later) must outlive the Chain.
  static Result<Chain> over(db::Db& db);

  Result<Head> head();
  // Appends one record after `prev` (which must be the current head: call inside a
  // BEGIN IMMEDIATE transaction that read it). Stamps the time when e.time is 0.
  Result<Head> append_after(const Head& prev, const Event& e);
  Result<std::optional<Record>> record(std::int64_t seq);
  Result<std::optional<Checkpoint>> last_checkpoint();
  Status add_checkpoint(const Checkpoint& c);
  // The seq of the first record with time >= t (nullopt when none).
  Result<std::optional<std::int64_t>> first_seq_since(std::int64_t t);
  // The head the anchor was last sealed at (audit_seal; a hint: the first append after a seal
  // must write the anchor), and setting it (inside the sealing transaction).
  Result<std::optional<std::int64_t>> sealed_seq();
  Status set_sealed_seq(std::int64_t seq);
  // Records first..last and the checkpoints at seqs in that range, in order (call inside a read
  // transaction when they must belong to one snapshot; the caller bounds the range).
  Result<std::vector<Record>> records(std::int64_t first, std::int64_t last);
  Result<std::vector<Checkpoint>> checkpoints(std::int64_t first, std::int64_t last);
  Result<std::optional<Checkpoint>> checkpoint_at(std::int64_t seq);

  db::Db& db() noexcept { return *db_; }

 private:
  explicit Chain(db::Db& db) : db_(&db) {}
  db::Db* db_;
  std::optional<db::Stmt> head_, insert_, record_, last_cp_, insert_cp_, since_, sealed_,
      set_sealed_;
};

// ---- the HSM side: anchor and checkpoint signatures ------------------------------------------

struct Anchors {
  std::vector<AnchorValue> values;  // readable, well-formed objects, newest first
  std::vector<hsm::ObjectHandle> unreadable;
  bool exists() const noexcept { return !values.empty() || !unreadable.empty(); }
};

Result<Anchors> read_anchors(hsm::Session& s);

enum class AnchorState : std::uint8_t {
  fresh,          // no anchor objects and an empty table: nothing written yet
  sealed,         // a sealed pair equal to the table head (clean stop or idle)
  consistent,     // running: every anchored record is in the table with its hash
  lost_batch,     // a pending value beyond the table: a transaction that died between its
                  // anchor write and its COMMIT or confirmation
  missing,        // no anchor objects but records in the table
  truncated,      // anchored records are gone (tail removed, file rolled back)
  beyond_anchor,  // records after a sealed head (appended by something other than gridseal)
  rewritten,      // a record at an anchored seq has another hash
};
const char* anchor_state_name(AnchorState s) noexcept;

struct AnchorCheck {
  AnchorState state = AnchorState::fresh;
  Head table_head;
  std::optional<Head> newest;     // the newest anchor value, when any
  std::optional<Head> committed;  // the newest anchor value the table holds
  std::int64_t unanchored = 0;    // running: records after `committed`
  bool must_write = false;        // the next append must write the anchor (sealed, lost, fresh)
  bool stale_pending = false;     // a pending value the table went past (died transaction)
  std::string message;            // one line for logs and the CLI
  bool ok() const noexcept {
    return state == AnchorState::fresh || state == AnchorState::sealed ||
           state == AnchorState::consistent || state == AnchorState::lost_batch;
  }
};

// Compares the table (head, and the hash of every anchored seq it still has) with the anchors.
Result<AnchorCheck> check_anchor(Chain& chain, const Head& table_head, const Anchors& anchors);

// Signs checkpoints with gs-audit and keeps the anchor objects; caches the key and anchor
// handles (found again after any failure: another process may have replaced an object).
class Notary {
 public:
  // read_anchors() through the cached handles.
  Result<Anchors> anchors(hsm::Session& s);
  Result<Checkpoint> sign(hsm::Session& s, const Head& head, std::int64_t time);
  // Writes `next` as pending into the anchor object that does not hold `keep` (the newest value
  // the table holds, from check_anchor), creating objects when fewer than two readable ones
  // exist. Returns the object written.
  Result<hsm::ObjectHandle> advance(hsm::Session& s, const Anchors& current,
                                    const std::optional<Head>& keep, const Head& next);
  // After COMMIT: the object advance() wrote := `head`, committed.
  Status confirm(hsm::Session& s, hsm::ObjectHandle object, const Head& head);
  // Every anchor object := head, sealed (creating two when there are none).
  Status seal(hsm::Session& s, const Anchors& current, const Head& head);
  void forget() noexcept {
    key_ = hsm::kNoObject;
    anchor_objects_.clear();
  }
  // Times this notary searched the token (for gs-audit, or for the anchor objects instead of
  // reading the handles it holds): a C_FindObjects walks every object of the token and of every
  // session, 160-240 ms once the handlers hold 100,000 meter keys.
  std::uint64_t searches() const noexcept { return searches_; }
  // Finds gs-audit and the anchor objects now, while the sessions hold few objects. Not finding
  // them is no error here: sign() and anchors() report it when they need them.
  void prepare(hsm::Session& s);

 private:
  // gs-audit's handle, searched for once (and again after a failed signature).
  Status find_key(hsm::Session& s);

  hsm::ObjectHandle key_ = hsm::kNoObject;
  std::vector<hsm::ObjectHandle> anchor_objects_;
  std::uint64_t searches_ = 0;
};

// One append transaction in progress (Trail::begin .. Trail::finish).
struct Batch {
  Head prev;  // the table head when the transaction started
  Head head;  // after the records added so far
  Anchors anchors;
  AnchorCheck check;
  bool anchored = false;  // finish() wrote the anchor (pending): confirm() after COMMIT
  hsm::ObjectHandle anchor_object = hsm::kNoObject;
};

// Appending inside the caller's transaction: the chain, the anchor check and advance, and the
// checkpoint when one is due.
//
//   GS_ASSIGN(auto tx, db::Transaction::begin(db));   // BEGIN IMMEDIATE
//   ... the action's own writes ...
//   GS_TRY(trail.append(session, events, /*checkpoint=*/false));
//   GS_TRY(tx.commit());
class Trail {
 public:
  static Result<Trail> over(db::Db& db);

  // Inside a BEGIN IMMEDIATE transaction: reads the head and checks it against the anchor
  // (Errc::conflict with the finding when the table was tampered with). With `with_anchor`
  // false only the head is read (no HSM call): finish() will then not write the anchor, unless
  // the table was sealed at that head, in which case the anchor is read anyway.
  Result<Batch> begin(hsm::Session& s, bool with_anchor = true);
  Result<Head> add(Batch& b, const Event& e);
  // Signs a checkpoint of the new head when `checkpoint` is true, and writes the anchor when
  // `anchor` is true or the check requires it. The caller commits; if it does not, nothing is
  // recorded and the anchor stays consistent (state lost_batch).
  Status finish(hsm::Session& s, Batch& b, bool checkpoint, bool anchor);
  // After the caller's COMMIT succeeded: marks the anchor written by finish() committed (without
  // it a crash leaves it pending, reported as lost_batch, which is weaker evidence).
  Status confirm(hsm::Session& s, const Batch& b);
  // begin + add each + finish (with the anchor written). Call confirm(s) after COMMIT.
  Result<Head> append(hsm::Session& s, std::span<const Event> events, bool checkpoint);
  Status confirm(hsm::Session& s);

  // Inside a transaction: a checkpoint of the current head unless one covers it already (when
  // `checkpoint`), and every anchor object set to the head. At a clean stop and when idle.
  Status seal(hsm::Session& s, bool checkpoint);
  // The table against the anchors (no writes).
  Result<AnchorCheck> check(hsm::Session& s);
  // After an operator decided to accept the table as it is (restored backup, lost anchor):
  // inside a transaction, appends `event` with the finding added to its detail, a checkpoint,
  // and sets every anchor object to the new head.
  Result<Head> reset_anchor(hsm::Session& s, Event event);

  Chain& chain() noexcept { return chain_; }
  std::uint64_t token_searches() const noexcept { return notary_.searches(); }
  // Notary::prepare: at start, before the handlers fill the sessions with meter keys.
  void prepare(hsm::Session& s) { notary_.prepare(s); }

 private:
  explicit Trail(Chain c) : chain_(std::move(c)) {}
  Chain chain_;
  Notary notary_;
  std::optional<Batch> last_;  // of append(), for confirm(s)
};

// The table against the anchors, under the write lock (so that no writer is between its anchor
// update and its COMMIT), nothing written: what a daemon checks at start and `--check` reports.
Result<AnchorCheck> check_store(db::Db& db, HsmContext& hsm);

// ---- the batching writer for daemons ----------------------------------------------------------

// Runs a transaction's `done` callbacks: `run` calls them all, in order. A daemon wraps it in a
// scope that hands their responses to its event loop together (server::run_batched).
using AroundDone = std::function<void(const std::function<void()>& run)>;

// around(run), or run() when around is unset.
inline void run_around(const AroundDone& around, const std::function<void()>& run) {
  if (around) {
    around(run);
  } else {
    run();
  }
}

struct WriterOptions {
  std::chrono::microseconds max_delay{1000};        // wait this long after the first item for more
  std::size_t max_batch = 512;                      // items per transaction
  std::size_t max_pending = 65536;                  // queued items; beyond, submit() says busy
  std::chrono::seconds checkpoint_interval{60};     // 0: a checkpoint in every transaction
  std::chrono::milliseconds anchor_interval{1000};  // 0: the anchor in every transaction
  std::chrono::milliseconds seal_after_idle{200};   // seal the anchor when idle this long
  std::string program = "gridseal";                 // log prefix
  AroundDone around_done;  // unset: the callbacks run directly
  bool sched_batch = false;  // the writer thread under SCHED_BATCH (gs::use_batch_scheduling)
  // The submitters commit: each calls commit_queued() on its own thread once it has submitted
  // what it has at hand (the SES's handler, when its queue of requests runs empty), so a record
  // is durable without a hand-over to the writer thread and without max_delay. The writer
  // thread then looks every 5 ms (or max_delay, when longer) and only commits what has waited
  // that long (a submitter that did not commit), seals when idle, and stops.
  bool caller_commits = false;
  // Each batch's COMMIT writes the WAL without fsync (synchronous=NORMAL) and releases the write
  // lock; the batch then fsyncs the WAL itself (db::Db::sync_wal) before it confirms the anchor
  // and reports its items durable. The other workers' batches commit during that fsync instead
  // of waiting for it, and one fsync can cover several of them.
  bool fsync_outside_lock = false;
  // With fsync_outside_lock: the fsync and the `done` callbacks of a committed batch move to
  // the writer's sync thread (gs-audit-sync), so that the thread that committed (the SES's
  // handler) goes back to its requests instead of waiting for the disk. Each fsync there covers
  // every batch committed before it began, so one can release several. A batch that advanced
  // the HSM anchor still fsyncs where it committed: the anchor is confirmed only once durable.
  bool fsync_thread = false;
  // Tests: called on the sync thread before each of its fsyncs.
  std::function<void()> before_fsync;
};

struct Item {
  Event event;
  // The action's own state, written in the same transaction (inside a savepoint): when it fails,
  // neither it nor the record is kept and `done` gets its error; the other items go on.
  std::function<Status(db::Db&)> action;
  // After the transaction ended: ok = the record (and the action) is durable. Runs on the
  // writer thread; must not block for long or call back into the writer.
  std::function<void(const Status&)> done;
};

struct WriterStats {
  std::uint64_t records = 0;
  std::uint64_t commits = 0;
  std::uint64_t failures = 0;
  std::uint64_t checkpoints = 0;
  std::uint64_t seals = 0;            // idle and stop seals that committed
  std::uint64_t token_searches = 0;  // C_FindObjects for gs-audit or the anchors (see Notary)
};

class Writer {
 public:
  // Opens its own connection to the store at `db_path`, checks the table against the anchor
  // (Errc::conflict naming the finding when it was truncated, rewritten or extended: the
  // daemon must not start), and starts the writer thread. `hsm` must outlive the writer and
  // have a session to spare for it.
  static Result<std::unique_ptr<Writer>> open(const std::string& db_path, HsmContext& hsm,
                                              const WriterOptions& opt,
                                              metrics::Registry* registry);
  ~Writer();  // stop()
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Queues an item. Errc::busy when max_pending items wait or the writer stopped; `done` is
  // then not called. Invalid events are refused here (validate()).
  Status submit(Item item);
  // Commits everything queued so far on the calling thread, max_batch records per transaction,
  // in submission order; the items' `done` callbacks run on this thread before it returns, or
  // with fsync_thread on the sync thread once the batch is durable. Serialized with the writer
  // thread. A `done` callback must not call it.
  void commit_queued();
  // Appends and waits (at most `timeout`: Errc::busy after it) until it is durable (start/stop
  // records, rare operator events).
  Status append(Event e, std::chrono::milliseconds timeout = std::chrono::seconds(30));
  // Commits what is queued, writes a final checkpoint and seals the anchor, joins the thread.
  // Idempotent.
  void stop();

  // What the start check found (lost_batch is reported but not refused).
  const AnchorCheck& start_check() const noexcept { return start_; }
  bool healthy() const noexcept { return healthy_.load() && !sync_failing_.load(); }
  WriterStats stats() const;

 private:
  Writer(db::Db db, HsmContext& hsm, const WriterOptions& opt, metrics::Registry* registry);
  void run();
  void run_caller_commits();
  // Under apply_mu_: takes up to `limit` queued items in order (all when limit is 0) and applies
  // them, max_batch per transaction.
  void take_and_apply(std::size_t limit);
  void apply(std::vector<Item>& batch);
  void seal(bool checkpoint);
  // WriterOptions::fsync_thread: fsyncs the WAL for the committed batches handed over, then
  // runs their callbacks; drains and ends at stop().
  void run_sync();
  bool checkpoint_due(std::int64_t now);
  // One stderr line per second at most (a tampered table fails every batch).
  void log_failure(const std::string& what);

  db::Db db_;
  std::optional<Trail> trail_;
  HsmContext& hsm_;
  WriterOptions opt_;
  AnchorCheck start_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  // Held while a batch is taken from queue_ and applied, and while sealing: the database
  // connection, trail_ and the fields below belong to its holder (the writer thread, or a
  // submitter in commit_queued()). Taken before mu_, never while mu_ is held.
  std::mutex apply_mu_;
  std::chrono::steady_clock::time_point oldest_{};      // when the queue last became non-empty
  std::chrono::steady_clock::time_point last_commit_{};
  bool stopping_ = false;
  bool stopped_ = false;
  std::thread thread_;
  // WAL checkpoints on their own connection and thread, so that no commit pays for one (the
  // writer's connection has wal_autocheckpoint off).
  std::unique_ptr<db::Checkpointer> checkpointer_;
  // WriterOptions::fsync_thread: committed batches waiting for an fsync, and the thread.
  struct Committed {
    std::vector<Item> items;
    std::vector<Status> outcome;
  };
  std::optional<db::WalSyncer> wal_;
  std::mutex sync_mu_;
  std::condition_variable sync_cv_;
  std::vector<Committed> to_sync_;
  bool sync_stopping_ = false;
  std::thread sync_thread_;
  std::atomic<bool> healthy_{true};
  std::atomic<bool> sync_failing_{false};  // the sync thread's last fsync failed
  std::atomic<std::uint64_t> records_{0}, commits_{0}, failures_{0}, checkpoints_{0}, seals_{0};
  std::atomic<std::uint64_t> token_searches_{0};  // trail_->token_searches(), for stats()
  std::int64_t next_checkpoint_check_ = 0;
  std::chrono::steady_clock::time_point last_anchor_{};
  std::atomic<bool> dirty_{false};  // records committed since the last seal
  std::mutex log_mu_;  // log_failure: the writer and the sync thread
  std::chrono::steady_clock::time_point last_log_{};
  std::uint64_t suppressed_ = 0;
  std::unique_ptr<metrics::Registry> own_registry_;
  metrics::Counter* m_records_ = nullptr;
  metrics::Counter* m_commits_ = nullptr;
  metrics::Counter* m_failures_ = nullptr;
  metrics::Counter* m_checkpoints_ = nullptr;
  metrics::Histogram* m_commit_seconds_ = nullptr;
  metrics::Histogram* m_batch_ = nullptr;
  metrics::Histogram* m_lock_wait_seconds_ = nullptr;
  metrics::Histogram* m_sql_commit_seconds_ = nullptr;
  metrics::Histogram* m_fsync_seconds_ = nullptr;
  metrics::Counter* m_synced_batches_ = nullptr;
};

// A daemon worker's `start` record (worker, pid, the anchor state the writer found at open),
// durable before the worker serves.
Status record_worker_start(Writer& w, std::string_view program, int worker);
// Its `stop` record (a failure is logged on stderr), then w.stop(): final checkpoint, anchor
// sealed.
void record_worker_stop(Writer& w, std::string_view program, int worker);

// ---- verification and export ---------------------------------------------------------------

struct Finding {
  std::int64_t seq = 0;  // the first bad record (for checkpoints: the record they cover)
  std::string kind;      // changed, deleted, inserted, reordered, rewritten, truncated,
                         // beyond_anchor, bad_checkpoint, lost_batch, unchecked_tail, ...
  std::string message;
};

struct VerifyOptions {
  std::int64_t from = 1;
  // gs-audit's public point (65 bytes); empty: checkpoint signatures are not checked (reported).
  Bytes public_key;
  // The HSM anchors; nullopt and no read_anchors: not checked (reported).
  std::optional<Anchors> anchors;
  // On a live system: called once verify's read snapshot is taken while `lock` (a second
  // connection to the same file) holds the write lock, so that the anchors and the snapshot
  // belong to the same instant (a writer advances the anchor before its COMMIT).
  std::function<Result<Anchors>()> read_anchors;
  db::Db* lock = nullptr;
};

struct VerifyReport {
  bool ok = false;
  std::int64_t first_seq = 0, last_seq = 0, records = 0;
  std::int64_t checkpoints = 0;          // checked (signature and head)
  std::int64_t last_checkpoint_seq = 0;  // newest good checkpoint
  std::int64_t archived_through = 0;     // records up to here are in archive files
  std::optional<Finding> failure;        // the first bad thing; names the record
  std::vector<Finding> notes;            // not failures: lost batch, unchecked parts
  std::optional<AnchorCheck> anchor;
};

// Streams the whole table (from opt.from) in one read transaction: every record's hash and
// link, seq continuity, every checkpoint's head and signature, and the anchor. Stops at the
// first failure and names the first bad record.
Result<VerifyReport> verify(db::Db& db, const VerifyOptions& opt);

struct ExportOptions {
  std::int64_t since = 0;  // UTC seconds: from the first record with time >= since
  Bytes public_key;        // written into the header as its SHA-256 fingerprint when given
};
struct ExportSummary {
  std::int64_t first_seq = 0, last_seq = 0, records = 0, checkpoints = 0;
};

// JSON Lines: a header object, then each record, each checkpoint right after the record it
// covers ("type": "header" | "record" | "checkpoint"); one read transaction.
Result<ExportSummary> export_jsonl(db::Db& db, const ExportOptions& opt, std::FILE* out);
// One line of that format (with its newline).
std::string record_json(const Record& r);
std::string checkpoint_json(const Checkpoint& c);

// ---- archives (`gridseal audit archive`) -------------------------------------------------------
//
// The table only grows (about 400 bytes a record with its index: 20,000 secured commands/s is
// some 700 GB a day), so old records move out to archive files. An archive holds records
// first_seq..through, where `through` is a checkpoint's seq (the whole file is signed), in the
// export's JSON Lines format (header "archive": true). Once the file is on disk (written under a
// temporary name, fsync, renamed, directory fsync, read back and hashed), one transaction appends
// an `audit_archive` record naming it (archive_detail: range, counts, file name, SHA-256), a
// signed checkpoint and the anchor, and the `audit_archives` row (schema v14); then the records up
// to `through` and the checkpoints before it are deleted, one chunk per transaction (the triggers
// refuse any other DELETE). The checkpoint at `through` stays as the signed base the table links
// to: verify() checks the table from through + 1 against that checkpoint's head and signature, and
// requires the newest archive's registration record in the chain with exactly its detail; so
// deleting old records without an archive, or with a forged row, is `deleted` or
// `unregistered_archive`. A run that dies leaves a file without a row (the next run writes a
// new one, named with its own time) or archived records not yet deleted (verify notes them;
// the next run deletes them first).
// The file is the evidence from then on: copy it to write-once storage; its SHA-256 stays in the
// chain, and README's Python verifier checks it alone.
struct Archive {
  std::int64_t first_seq = 0, through = 0;
  std::int64_t records = 0, checkpoints = 0;
  std::string file;  // name inside the archive directory
  Digest sha256{};   // of the file's bytes
  std::int64_t time = 0;
  std::int64_t record_seq = 0;  // the audit_archive record that registered it
};
inline constexpr const char* kArchiveEvent = "audit_archive";

// The newest registered archive (nullopt: none; also on a store older than schema v14).
Result<std::optional<Archive>> newest_archive(db::Db& db);
// The detail of the record that registers `a`.
std::string archive_detail(const Archive& a);
// Errc::conflict, naming what is wrong, unless the record at a.record_seq registers `a`.
Status check_registration(Chain& chain, const Archive& a);

struct ArchiveOptions {
  std::int64_t before = 0;  // archive up to the newest checkpoint signed before this UTC time
  std::string dir;          // the archive file goes here
  std::string actor;        // who archives (the registration record's actor)
  Bytes public_key;         // gs-audit's: its fingerprint goes in the file's header
  // Pruning next to running daemons: each delete transaction holds the write lock their audit
  // commits need, so it is kept short, and the next one waits at least `pause` and at least
  // four times as long as this one took (the lock is held at most a fifth of the time).
  std::int64_t delete_chunk = 1000;      // records deleted per transaction
  std::chrono::milliseconds pause{10};
  std::int64_t read_chunk = 20000;       // records read per read transaction for the file
};
struct ArchiveResult {
  std::optional<Archive> archive;  // written and registered by this run (nullopt: nothing due)
  std::string path;
  std::int64_t deleted = 0;        // records deleted (with those a died run left)
  std::int64_t deleted_checkpoints = 0;
  std::int64_t left_by_earlier_run = 0;  // of `deleted`: records a died run had archived
  std::int64_t delete_transactions = 0;
  std::chrono::microseconds longest_delete{0};  // the longest of them, COMMIT included
};
// All of it: prune_archived, write_archive, register_archive (which prunes).
Result<ArchiveResult> archive(db::Db& db, hsm::Session& s, const ArchiveOptions& opt);
// Read-only (no lock held; any thread, its own connection): picks the range after the newest
// archive up to the newest checkpoint signed before opt.before and writes the file, checking
// each record's hash and link and each checkpoint's head as it goes. Nullopt: nothing is due.
Result<std::optional<Archive>> write_archive(db::Db& db, const ArchiveOptions& opt,
                                             std::string& path);
// Registers a written archive (its record, a signed checkpoint, the anchor, the row: one
// transaction), then prunes. Errc::conflict when another run registered an archive since.
Status register_archive(db::Db& db, hsm::Session& s, Archive a, const ArchiveOptions& opt,
                        ArchiveResult& out);
// Deletes the records (and checkpoints) the newest archive covers that are still in the table.
Status prune_archived(db::Db& db, const ArchiveOptions& opt, ArchiveResult& out);

}  // namespace gs::audit
