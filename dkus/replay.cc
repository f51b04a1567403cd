// DKUS replay defence: in-memory marks and the group-commit writer (see replay.h).
#include "dkus/replay.h"

#include <algorithm>
#include <cstdio>
#include <ctime>

#include "gridseal/thread_name.h"
#include "src/sqlite.h"

namespace gs::dkus {

ReplayMarks::ReplayMarks(std::size_t capacity, unsigned window)
    : per_shard_(capacity / kShards + 1), window_(std::min(window, store::kMaxReplayWindow)) {}

store::ReplayVerdict ReplayMarks::check(std::int64_t meter, std::uint64_t id) const {
  Shard& s = shard(meter);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.marks.find(meter);
  return it == s.marks.end() ? store::ReplayVerdict::accepted : it->second.judge(id, window_);
}

store::ReplayVerdict ReplayMarks::claim(std::int64_t meter, std::uint64_t id) {
  Shard& s = shard(meter);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.marks.find(meter);
  if (it != s.marks.end()) {
    const store::ReplayVerdict v = it->second.judge(id, window_);
    if (v == store::ReplayVerdict::accepted) it->second.accept(id, 0, window_);
    return v;
  }
  if (s.marks.size() >= per_shard_) s.marks.clear();  // bounded; the database still decides
  s.marks.emplace(meter, store::ReplayMark::first(id, 0, window_));
  return store::ReplayVerdict::accepted;
}

void ReplayMarks::release(std::int64_t meter, std::uint64_t id) {
  Shard& s = shard(meter);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.marks.find(meter);
  if (it == s.marks.end()) return;
  store::ReplayMark& m = it->second;
  if (id == m.invocation_id) {
    // The window cannot slide back (the ids it dropped are gone): forget the meter instead.
    s.marks.erase(it);
  } else if (id < m.invocation_id && m.invocation_id - id <= 63) {
    m.below &= ~(std::uint64_t{1} << (m.invocation_id - id - 1));
  }
}

std::size_t ReplayMarks::size() const {
  std::size_t n = 0;
  for (auto& s : shards_) {
    std::lock_guard<std::mutex> lock(s.mu);
    n += s.marks.size();
  }
  return n;
}

std::uint32_t MacFailures::fail(std::int64_t meter) {
  Shard& s = shards_[static_cast<std::uint64_t>(meter) % kShards];
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.counts.find(meter);
  if (it == s.counts.end()) {
    if (s.counts.size() >= per_shard_) {
      // Bounded: forget this shard's counts (and its flags: flagged() counts the others).
      std::size_t dropped = 0;
      for (const auto& [m, n] : s.counts) dropped += n >= threshold_ ? 1 : 0;
      flagged_.fetch_sub(dropped, std::memory_order_relaxed);
      s.counts.clear();
    }
    it = s.counts.emplace(meter, 0).first;
  }
  if (it->second < UINT32_MAX) ++it->second;
  if (it->second == threshold_) flagged_.fetch_add(1, std::memory_order_relaxed);
  return it->second;
}

std::uint32_t MacFailures::success(std::int64_t meter) {
  Shard& s = shards_[static_cast<std::uint64_t>(meter) % kShards];
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.counts.empty()) return 0;  // the usual case: no failures in this shard
  auto it = s.counts.find(meter);
  if (it == s.counts.end()) return 0;
  const std::uint32_t n = it->second;
  if (n >= threshold_) flagged_.fetch_sub(1, std::memory_order_relaxed);
  s.counts.erase(it);
  return n;
}

GroupCommitter::GroupCommitter(store::KeyStore store, const CommitterOptions& opt,
                               metrics::Registry& registry)
    : store_(std::move(store)),
      opt_(opt),
      commits_(registry.counter("gridseal_dkus_group_commits_total",
                                "Replay-state transactions committed")),
      rows_(registry.counter("gridseal_dkus_group_commit_updates_total",
                             "Replay-mark updates applied in committed transactions")),
      failures_(registry.counter("gridseal_dkus_group_commit_failures_total",
                                 "Replay-state transactions that did not commit")),
      commit_seconds_(registry.histogram("gridseal_dkus_group_commit_seconds",
                                         "Time to apply and commit one batch",
                                         metrics::latency_buckets())),
      batch_size_(registry.histogram("gridseal_dkus_group_commit_batch",
                                     "Replay-mark updates per transaction",
                                     {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096})) {
  if (opt_.max_batch == 0) opt_.max_batch = 1;
}

GroupCommitter::~GroupCommitter() { stop(); }

Status GroupCommitter::enable_audit(HsmContext& hsm, std::chrono::milliseconds anchor_interval) {
  GS_ASSIGN(auto trail, audit::Trail::over(store_.db()));
  trail_.emplace(std::move(trail));
  hsm_ = &hsm;
  anchor_interval_ = anchor_interval;
  // The anchor objects found now, before the handlers fill the sessions with meter keys.
  if (auto lease = hsm.pool->acquire(); lease.ok()) trail_->prepare(lease->session());
  return {};
}

Status GroupCommitter::checkpoint_off_the_commit_path(const std::string& db_path) {
  GS_ASSIGN(checkpointer_, db::Checkpointer::take_over(store_.db(), db_path));
  return {};
}

void GroupCommitter::start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) return;
  started_ = true;
  thread_ = std::thread([this] {
    name_this_thread("gs-replay");
    run();
  });
}

Status GroupCommitter::submit(MarkUpdate u) {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || !started_) return Error(Errc::busy, "replay-state writer stopped");
    if (queue_.size() >= opt_.max_pending) {
      return Error(Errc::busy, "replay-state writer has " + std::to_string(queue_.size()) +
                                   " updates waiting");
    }
    if (queue_.empty()) first_queued_ = std::chrono::steady_clock::now();
    queue_.push_back(std::move(u));
    // Only the first update of a batch and a full batch can end the writer's wait (run()); a
    // wake for every update cost the daemon a futex wake and a context switch per message, and
    // on 2 cores the writer then preempted the event loop it was waiting for (as audit::Writer).
    wake = queue_.size() == 1 || queue_.size() == opt_.max_batch;
  }
  if (wake) cv_.notify_one();
  return {};
}

void GroupCommitter::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  checkpointer_.reset();
  // Anything still queued (writer never started) is refused, never silently dropped.
  std::deque<MarkUpdate> rest;
  {
    std::lock_guard<std::mutex> lock(mu_);
    rest.swap(queue_);
  }
  for (auto& u : rest) {
    if (u.done) u.done(CommitOutcome::failed);
  }
}

std::size_t GroupCommitter::pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queue_.size();
}

void GroupCommitter::run() {
  std::vector<MarkUpdate> batch;
  batch.reserve(opt_.max_batch);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) break;  // stopping and drained
    // Group: give concurrent requests until max_delay after the oldest one came to join, unless
    // the batch is full. Updates that came during the last commit have waited already.
    if (opt_.max_delay.count() > 0 && queue_.size() < opt_.max_batch && !stopping_) {
      cv_.wait_until(lock, first_queued_ + opt_.max_delay,
                     [this] { return stopping_ || queue_.size() >= opt_.max_batch; });
    }
    const std::size_t n = std::min(queue_.size(), opt_.max_batch);
    for (std::size_t i = 0; i < n; ++i) {
      batch.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    lock.unlock();
    apply(batch);
    batch.clear();
    lock.lock();
  }
}

void GroupCommitter::apply(std::vector<MarkUpdate>& batch) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<CommitOutcome> outcome(batch.size(), CommitOutcome::failed);
  std::vector<bool> skip(batch.size(), false);  // left out (failed) on the second attempt
  auto attempt = [&]() -> Status {
    std::fill(outcome.begin(), outcome.end(), CommitOutcome::failed);
    bool audited = false;
    for (std::size_t i = 0; i < batch.size() && trail_; ++i) {
      audited = audited || (!skip[i] && !batch[i].receipt_records.empty());
    }
    // The HSM session before the write lock, in the order audit::Writer takes them.
    std::optional<hsm::SessionPool::Lease> lease;
    if (audited) {
      GS_ASSIGN(auto l, hsm_->pool->acquire());
      lease.emplace(std::move(l));
    }
    GS_ASSIGN(auto tx, db::Transaction::begin(store_.db()));
    std::optional<audit::Batch> records;  // begun at the first record
    bool anchor = false;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (skip[i]) continue;
      MarkUpdate& u = batch[i];
      GS_ASSIGN(store::ReplayVerdict v, store_.raise_replay_mark(u.meter, u.invocation_id,
                                                                  u.iv_time, opt_.reorder_window));
      if (v != store::ReplayVerdict::accepted) {
        outcome[i] = v == store::ReplayVerdict::replayed ? CommitOutcome::replayed
                                                         : CommitOutcome::too_old;
        continue;
      }
      for (std::size_t j = 0; j < u.receipts.size(); ++j) {
        GS_ASSIGN(bool inserted, store_.insert_receipt(u.receipts[j]));
        if (!inserted || !lease || j >= u.receipt_records.size()) continue;
        if (!records) {
          anchor = anchor_interval_.count() == 0 ||
                   std::chrono::steady_clock::now() - last_anchor_ >= anchor_interval_;
          GS_ASSIGN(auto b, trail_->begin(lease->session(), anchor));
          records.emplace(std::move(b));
        }
        if (auto h = trail_->add(*records, u.receipt_records[j]); !h.ok()) {
          return std::move(h).error();
        }
      }
      outcome[i] = CommitOutcome::committed;
    }
    if (records) GS_TRY(trail_->finish(lease->session(), *records, false, anchor));
    GS_TRY(tx.commit());
    if (records) {
      if (records->anchored) last_anchor_ = std::chrono::steady_clock::now();
      if (Status c = trail_->confirm(lease->session(), *records); !c.ok()) {
        // The records are durable; the anchor stays pending (lost_batch after a crash).
        std::fprintf(stderr, "gridseal-dkusd: audit: confirming the anchor failed: %s\n",
                     c.error().message().c_str());
      }
    }
    return {};
  };
  Status st = attempt();
  if (!st.ok() && trail_) {
    bool any = false;
    for (std::size_t i = 0; i < batch.size(); ++i) {
      skip[i] = !batch[i].receipt_records.empty();
      any = any || skip[i];
    }
    if (any) {
      // Maybe the trail refused: the receipts cannot be stored without their records, the
      // other updates need none.
      std::fprintf(stderr,
                   "gridseal-dkusd: replay-state commit with receipt records failed (%s); "
                   "committing the updates without receipts alone\n",
                   st.error().message().c_str());
      st = attempt();
    }
  }
  commit_seconds_.observe(std::chrono::steady_clock::now() - t0);
  if (!st.ok()) {
    // Nothing of the batch is durable: no update may be reported as committed or as a replay.
    failures_.inc();
    healthy_ = false;
    std::fprintf(stderr, "gridseal-dkusd: replay-state commit of %zu updates failed: %s\n",
                 batch.size(), st.error().message().c_str());
    audit::run_around(opt_.around_done, [&] {
      for (auto& u : batch) {
        if (u.done) u.done(CommitOutcome::failed);
      }
    });
    return;
  }
  healthy_ = true;
  commits_.inc();
  rows_.inc(static_cast<std::uint64_t>(std::count(skip.begin(), skip.end(), false)));
  batch_size_.observe(static_cast<double>(batch.size()));
  audit::run_around(opt_.around_done, [&] {
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (batch[i].done) batch[i].done(outcome[i]);
    }
  });
}

}  // namespace gs::dkus
