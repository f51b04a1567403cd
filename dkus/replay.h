// DKUS replay defence (DESIGN §2, §5): per-meter invocation-id high-water marks kept in memory
// by each worker process, and persisted by a group-commit writer before any response leaves.
//
// Why this is safe with several worker processes and a kill -9 at any instant:
//  * The database row is the authority. GroupCommitter raises it with one conditional upsert
//    ("set to id only if id > stored", KeyStore::raise_replay_mark) inside a BEGIN IMMEDIATE
//    transaction. Such transactions are serialized across processes by SQLite's write lock and
//    each reads the latest committed state, so of two workers holding the same (meter, id) only
//    the first to commit sees the row change; the other sees changes() == 0 and refuses.
//  * A response accepting a message is released only from the commit callback, after COMMIT
//    returned (WAL, synchronous=FULL: the mark is on disk). A crash before that loses the mark
//    but also the answer, so nothing accepted is ever forgotten; after a restart the same
//    message is accepted at most once more, only if it was never answered.
//  * ReplayMarks (memory) is only a filter in front of the database: it refuses ids at or below
//    the highest id this worker already claimed for the meter, without a database round trip.
//    It never accepts anything by itself. A claim happens only after the MAC verified (so a
//    forger cannot raise it), and is released again when the update fails to commit.
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
#include <thread>
#include <unordered_map>
#include <vector>

#include "gridseal/result.h"
#include "src/key_store.h"
#include "src/metrics.h"

namespace gs::dkus {

// Per-meter highest claimed invocation id, sharded by meter row. Bounded: a shard that exceeds
// its share of `capacity` is emptied (the database still refuses what it forgot).
class ReplayMarks {
 public:
  explicit ReplayMarks(std::size_t capacity);

  // True when `id` is at or below the meter's mark (a replay or a reordering).
  bool refuses(std::int64_t meter, std::uint64_t id) const;
  // Raises the mark to `id` when id is above it: true (and the previous mark in *previous,
  // 0 when none), false when refused.
  bool claim(std::int64_t meter, std::uint64_t id, std::uint64_t* previous);
  // Undoes a claim whose update did not commit, unless a higher id was claimed since.
  void release(std::int64_t meter, std::uint64_t id, std::uint64_t previous);

  std::size_t size() const;

 private:
  static constexpr std::size_t kShards = 64;
  struct Shard {
    mutable std::mutex mu;
    std::unordered_map<std::int64_t, std::uint64_t> marks;
  };
  Shard& shard(std::int64_t meter) const {
    return shards_[static_cast<std::uint64_t>(meter) % kShards];
  }
  std::size_t per_shard_;
  mutable std::array<Shard, kShards> shards_;
};

// Consecutive MAC failures per meter (same sharding); reaching the threshold flags the meter.
class MacFailures {
 public:
  explicit MacFailures(std::size_t capacity) : per_shard_(capacity / kShards + 1) {}
  // Counts a failure; returns the new count of failures in a row.
  std::uint32_t fail(std::int64_t meter);
  void success(std::int64_t meter);

 private:
  static constexpr std::size_t kShards = 16;
  struct Shard {
    std::mutex mu;
    std::unordered_map<std::int64_t, std::uint32_t> counts;
  };
  std::size_t per_shard_;
  std::array<Shard, kShards> shards_;
};

enum class CommitOutcome : std::uint8_t {
  committed,  // the mark was raised and is durable (and the receipts stored with it)
  replay,     // the stored mark was already >= the id (another worker or an earlier message)
  failed,     // the transaction did not commit (database error): nothing was stored
};

struct MarkUpdate {
  std::int64_t meter = 0;
  std::uint64_t invocation_id = 0;
  std::int64_t iv_time = 0;
  std::vector<store::Receipt> receipts;  // stored in the same transaction when committed
  // Runs on the writer thread after the transaction ended. Must not block for long.
  std::function<void(CommitOutcome)> done;
};

struct CommitterOptions {
  std::chrono::microseconds max_delay{2000};  // wait this long after the first update for more
  std::size_t max_batch = 4096;               // updates per transaction
  std::size_t max_pending = 65536;            // queued updates; beyond, submit() says busy
};

// One writer thread with its own store connection: takes every queued update, applies them in
// one transaction, commits, then runs their callbacks. Under load a batch forms while the
// previous one commits (one fsync per batch, not per message).
class GroupCommitter {
 public:
  GroupCommitter(store::KeyStore store, const CommitterOptions& opt, metrics::Registry& registry);
  ~GroupCommitter();  // stop()
  GroupCommitter(const GroupCommitter&) = delete;
  GroupCommitter& operator=(const GroupCommitter&) = delete;

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
  CommitterOptions opt_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<MarkUpdate> queue_;
  bool stopping_ = false;
  bool started_ = false;
  std::thread thread_;
  std::atomic<bool> healthy_{true};
  metrics::Counter& commits_;
  metrics::Counter& rows_;
  metrics::Counter& failures_;
  metrics::Histogram& commit_seconds_;
  metrics::Histogram& batch_size_;
};

}  // namespace gs::dkus
