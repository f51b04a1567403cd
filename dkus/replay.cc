// DKUS replay defence: in-memory marks and the group-commit writer (see replay.h).
#include "dkus/replay.h"

#include <cstdio>
#include <ctime>

#include "src/sqlite.h"

namespace gs::dkus {

ReplayMarks::ReplayMarks(std::size_t capacity) : per_shard_(capacity / kShards + 1) {}

bool ReplayMarks::refuses(std::int64_t meter, std::uint64_t id) const {
  Shard& s = shard(meter);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.marks.find(meter);
  return it != s.marks.end() && id <= it->second;
}

bool ReplayMarks::claim(std::int64_t meter, std::uint64_t id, std::uint64_t* previous) {
  Shard& s = shard(meter);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.marks.find(meter);
  if (it != s.marks.end()) {
    if (id <= it->second) return false;
    *previous = it->second;
    it->second = id;
    return true;
  }
  if (s.marks.size() >= per_shard_) s.marks.clear();  // bounded; the database still decides
  *previous = 0;
  s.marks.emplace(meter, id);
  return true;
}

void ReplayMarks::release(std::int64_t meter, std::uint64_t id, std::uint64_t previous) {
  Shard& s = shard(meter);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.marks.find(meter);
  if (it == s.marks.end() || it->second != id) return;  // a higher id was claimed since
  if (previous == 0) {
    s.marks.erase(it);
  } else {
    it->second = previous;
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
    if (s.counts.size() >= per_shard_) s.counts.clear();
    it = s.counts.emplace(meter, 0).first;
  }
  if (it->second < UINT32_MAX) ++it->second;
  return it->second;
}

void MacFailures::success(std::int64_t meter) {
  Shard& s = shards_[static_cast<std::uint64_t>(meter) % kShards];
  std::lock_guard<std::mutex> lock(s.mu);
  s.counts.erase(meter);
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

void GroupCommitter::start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) return;
  started_ = true;
  thread_ = std::thread([this] { run(); });
}

Status GroupCommitter::submit(MarkUpdate u) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ || !started_) return Error(Errc::busy, "replay-state writer stopped");
    if (queue_.size() >= opt_.max_pending) {
      return Error(Errc::busy, "replay-state writer has " + std::to_string(queue_.size()) +
                                   " updates waiting");
    }
    queue_.push_back(std::move(u));
  }
  cv_.notify_one();
  return {};
}

void GroupCommitter::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
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
    // Group: give concurrent requests up to max_delay to join, unless the batch is full.
    if (opt_.max_delay.count() > 0 && queue_.size() < opt_.max_batch && !stopping_) {
      cv_.wait_for(lock, opt_.max_delay,
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
  Status st = [&]() -> Status {
    GS_ASSIGN(auto tx, db::Transaction::begin(store_.db()));
    for (std::size_t i = 0; i < batch.size(); ++i) {
      const MarkUpdate& u = batch[i];
      GS_ASSIGN(bool raised, store_.raise_replay_mark(u.meter, u.invocation_id, u.iv_time));
      if (!raised) {
        outcome[i] = CommitOutcome::replay;
        continue;
      }
      for (const store::Receipt& r : u.receipts) GS_TRY(store_.insert_receipt(r));
      outcome[i] = CommitOutcome::committed;
    }
    return tx.commit();
  }();
  commit_seconds_.observe(std::chrono::steady_clock::now() - t0);
  if (!st.ok()) {
    // Nothing of the batch is durable: no update may be reported as committed or as a replay.
    failures_.inc();
    healthy_ = false;
    std::fprintf(stderr, "gridseal-dkusd: replay-state commit of %zu updates failed: %s\n",
                 batch.size(), st.error().message().c_str());
    for (auto& u : batch) {
      if (u.done) u.done(CommitOutcome::failed);
    }
    return;
  }
  healthy_ = true;
  commits_.inc();
  rows_.inc(batch.size());
  batch_size_.observe(static_cast<double>(batch.size()));
  for (std::size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].done) batch[i].done(outcome[i]);
  }
}

}  // namespace gs::dkus
