// DKUS replay defence (DESIGN §2, §5): per-meter replay windows (store::ReplayMark: the highest
// accepted invocation id and which of the ids just below it were accepted, exact once as in
// RFC 4303 / DTLS) kept in memory by each worker process, and persisted by a group-commit
// writer before any response leaves.
//
// Why this is safe with several worker processes and a kill -9 at any instant:
//  * The database row is the authority. GroupCommitter records each id with one conditional
//    upsert (KeyStore::raise_replay_mark: "accept id only if the stored window accepts it")
//    inside a BEGIN IMMEDIATE transaction. Such transactions are serialized across processes by
//    SQLite's write lock and each reads the latest committed state, so of two workers holding
//    the same (meter, id) only the first to commit sees the row change; the other sees
//    changes() == 0 and refuses. The rollover engine records the meter answers it verifies in
//    the same window with the same statement.
//  * A response accepting a message is released only from the commit callback, after COMMIT
//    returned (WAL, synchronous=FULL: the id is on disk). A crash before that loses the id but
//    also the answer, so nothing accepted is ever forgotten; after a restart the same message
//    is accepted at most once more, only if it was never answered.
//  * ReplayMarks (memory) is only a filter in front of the database. It holds the ids this
//    worker claimed (each: committed, refused by the database, or awaiting its commit) in the
//    same window, and pre-refuses an id only when it is one of those or at or below
//    (highest claimed id) - W. A committed or refused claim makes the database refuse the same,
//    since the stored mark is then at least that id and stored bits are never cleared. Only
//    while a claim awaits a commit that then fails can it refuse more than the database would
//    (the collection engine reads again, as for `bsy`); release() then forgets it. It never
//    accepts anything by itself. A claim happens only after the MAC verified (so a forger cannot
//    move the window), and is released again when the update fails to commit.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>
#include <vector>

#include "gridseal/result.h"
#include "src/audit.h"
#include "src/hsm_context.h"
#include "src/key_store.h"
#include "src/metrics.h"

namespace gs::dkus {

// Per-meter window of the ids this worker claimed, sharded by meter row. Bounded: a shard that
// exceeds its share of `capacity` is emptied (the database still refuses what it forgot).
class ReplayMarks {
 public:
  // `window`: dkus.reorder_window, the same W the database is asked with.
  ReplayMarks(std::size_t capacity, unsigned window);

  // accepted: not refused here (the database decides); replayed / too_old: the database
  // refuses it too (see the header comment).
  store::ReplayVerdict check(std::int64_t meter, std::uint64_t id) const;
  // check(), and when accepted records `id` as claimed.
  store::ReplayVerdict claim(std::int64_t meter, std::uint64_t id);
  // Undoes a claim whose update did not commit: clears its bit, or forgets the meter when it was
  // the highest claim (the ids claimed below it are the database's to refuse).
  void release(std::int64_t meter, std::uint64_t id);

  std::size_t size() const;

 private:
  static constexpr std::size_t kShards = 64;
  struct Shard {
    mutable std::mutex mu;
    std::unordered_map<std::int64_t, store::ReplayMark> marks;
  };
  Shard& shard(std::int64_t meter) const {
    return shards_[static_cast<std::uint64_t>(meter) % kShards];
  }
  std::size_t per_shard_;
  unsigned window_;
  mutable std::array<Shard, kShards> shards_;
};

// Consecutive MAC failures per meter (same sharding); reaching the threshold flags the meter
// until a good MAC. Per worker process and in memory only: the flag itself is the audit record
// and the metric the service writes when fail() returns the threshold (once per run of failures).
class MacFailures {
 public:
  MacFailures(std::size_t capacity, std::uint32_t threshold)
      : per_shard_(capacity / kShards + 1), threshold_(threshold == 0 ? 1 : threshold) {}
  // Counts a failure; returns the new count of failures in a row (threshold exactly once).
  std::uint32_t fail(std::int64_t meter);
  // A good MAC: forgets the count and returns it (>= threshold: the meter was flagged).
  std::uint32_t success(std::int64_t meter);
  // Meters at or above the threshold now.
  std::size_t flagged() const noexcept { return flagged_.load(std::memory_order_relaxed); }

 private:
  static constexpr std::size_t kShards = 16;
  struct Shard {
    std::mutex mu;
    std::unordered_map<std::int64_t, std::uint32_t> counts;
  };
  std::size_t per_shard_;
  std::uint32_t threshold_;
  std::array<Shard, kShards> shards_;
  std::atomic<std::size_t> flagged_{0};
};

enum class CommitOutcome : std::uint8_t {
  committed,  // the id is in the stored window and durable (and the receipts stored with it)
  replayed,   // the stored window already holds the id (another worker or an earlier message)
  too_old,    // the id is below the stored window (store::ReplayVerdict::too_old)
  failed,     // the transaction did not commit (database error): nothing was stored
};

struct MarkUpdate {
  std::int64_t meter = 0;
  std::uint64_t invocation_id = 0;
  std::int64_t iv_time = 0;
  std::vector<store::Receipt> receipts;  // stored in the same transaction when committed
  // With the audit on: one record per receipt (same order), appended to the audit trail in the
  // same transaction as the receipt it records, when that receipt was inserted (a receipt
  // already stored is neither stored nor recorded again). Empty: no records.
  std::vector<audit::Event> receipt_records;
  // Runs on the writer thread after the transaction ended. Must not block for long.
  std::function<void(CommitOutcome)> done;
};

struct CommitterOptions {
  std::chrono::microseconds max_delay{2000};  // wait this long after the first update for more
  std::size_t max_batch = 4096;               // updates per transaction
  std::size_t max_pending = 65536;            // queued updates; beyond, submit() says busy
  unsigned reorder_window = 64;               // W of the stored replay windows (0..64)
  audit::AroundDone around_done;  // as audit::WriterOptions::around_done
};

// One writer thread with its own store connection: takes every queued update, applies them in
// one transaction, commits, then runs their callbacks. Under load a batch forms while the
// previous one commits (one fsync per batch, not per message).
//
// With the audit on (enable_audit), the records of the receipts a batch stores are appended to
// the audit chain inside that same transaction (issue 7: no receipt without its record, no
// record without its receipt), and not through the audit Writer: a second writer would commit
// a meter's marks in another order than its messages came (a later id committed first makes the
// earlier one a replay), and would split a receipt from its record. Such a batch takes an HSM
// session first (as audit::Writer does, before the write lock), reads the chain head, writes no
// checkpoint (the Writer of the process signs them and seals the anchor at stop) and updates the
// HSM anchor at most once per anchor_interval. When the trail refuses (tampered table, HSM
// failing) the batch is applied once more without the updates that carry receipts: those fail
// (bsy, their marks released), the others commit.
class GroupCommitter {
 public:
  GroupCommitter(store::KeyStore store, const CommitterOptions& opt, metrics::Registry& registry);
  ~GroupCommitter();  // stop()
  GroupCommitter(const GroupCommitter&) = delete;
  GroupCommitter& operator=(const GroupCommitter&) = delete;

  // Before start(): records receipts in the audit trail (see above). `hsm` must outlive this.
  Status enable_audit(HsmContext& hsm, std::chrono::milliseconds anchor_interval);
  // Before start(): the committer's connection stops checkpointing inside its COMMITs
  // (wal_autocheckpoint off); a db::Checkpointer on `db_path` copies the WAL back every 500 ms.
  Status checkpoint_off_the_commit_path(const std::string& db_path);
  void start();
  // Queues an update. Errc::busy when max_pending updates wait or the writer stopped; the
  // callback is then not called.
  Status submit(MarkUpdate u);
  // Commits what is queued, then joins the writer. Idempotent.
  void stop();

  std::size_t pending() const;
  bool healthy() const noexcept { return healthy_.load(); }

 private:
  void run();
  void apply(std::vector<MarkUpdate>& batch);

  store::KeyStore store_;
  std::optional<audit::Trail> trail_;  // on store_'s connection, with the audit on
  HsmContext* hsm_ = nullptr;
  std::chrono::milliseconds anchor_interval_{1000};
  std::chrono::steady_clock::time_point last_anchor_{};
  CommitterOptions opt_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<MarkUpdate> queue_;
  // When the oldest update in queue_ came: a batch starts by max_delay after it. (The SES's
  // audit::Writer counts from when it looks instead: on the CPU-bound SES the longer wait
  // gathers twice the records per commit; the DKUS at 16 x 16 is bound by latency.)
  std::chrono::steady_clock::time_point first_queued_{};
  bool stopping_ = false;
  bool started_ = false;
  std::thread thread_;
  std::unique_ptr<db::Checkpointer> checkpointer_;
  std::atomic<bool> healthy_{true};
  metrics::Counter& commits_;
  metrics::Counter& rows_;
  metrics::Counter& failures_;
  metrics::Histogram& commit_seconds_;
  metrics::Histogram& batch_size_;
};

}  // namespace gs::dkus
