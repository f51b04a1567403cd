// DKUS replay windows (store::ReplayMark, KeyStore::raise_replay_mark, dkus::ReplayMarks): exact
// once inside the reorder window, against the real store in a temp SQLite file, checked against
// a plain model (the set of accepted ids) and across connections racing the same ids.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "c1222/oid.h"
#include "dkus/replay.h"
#include "src/key_store.h"
#include "src/metrics.h"

namespace gs::store {
namespace {

using V = ReplayVerdict;

class ReplayWindowTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-replay-window-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/gridseal.db";
    auto ks = KeyStore::open(path_);
    ASSERT_TRUE(ks.ok()) << ks.error().message();
    std::vector<NewMeter> batch;
    for (int n = 1; n <= 4; ++n) {
      NewMeter m;
      m.meter_id = "M" + std::to_string(n);
      m.ap_title_text = "2.16.124.113620.1.22.0.7." + std::to_string(n);
      m.ap_title = c1222::oid_from_dotted(m.ap_title_text).value();
      m.slot = 0;
      m.wrapped_key = Bytes(24, 0x11);
      m.origin = "plain";
      batch.push_back(std::move(m));
    }
    ASSERT_TRUE(ks->import_meters(batch).ok());
    for (int n = 1; n <= 4; ++n) {
      rows_.push_back(ks->meter_by_id("M" + std::to_string(n)).value()->row);
    }
    ks_.emplace(std::move(ks).value());
  }
  void TearDown() override {
    ks_.reset();
    std::filesystem::remove_all(dir_);
  }

  // One id in its own transaction, as the group committer does (a batch of one).
  V raise(std::uint64_t id, unsigned window = 64, int meter = 0) {
    auto tx = db::Transaction::begin(ks_->db());
    EXPECT_TRUE(tx.ok());
    auto v = ks_->raise_replay_mark(rows_.at(static_cast<std::size_t>(meter)), id, 7, window);
    EXPECT_TRUE(v.ok()) << v.error().message();
    EXPECT_TRUE(tx->commit().ok());
    return v.ok() ? *v : V::accepted;
  }

  ReplayMark mark(int meter = 0) {
    auto m = ks_->replay_mark(rows_.at(static_cast<std::size_t>(meter)));
    EXPECT_TRUE(m.ok() && m->has_value());
    return m.ok() && m->has_value() ? **m : ReplayMark{};
  }

  std::string dir_;
  std::string path_;
  std::vector<std::int64_t> rows_;
  std::optional<KeyStore> ks_;
};

TEST_F(ReplayWindowTest, InOrderIdsAreAcceptedOnceEach) {
  for (std::uint64_t id = 1; id <= 200; ++id) ASSERT_EQ(raise(id), V::accepted) << id;
  for (std::uint64_t id = 200 - 63; id <= 200; ++id) EXPECT_EQ(raise(id), V::replayed) << id;
  for (std::uint64_t id = 1; id <= 200 - 64; ++id) EXPECT_EQ(raise(id), V::too_old) << id;
  const ReplayMark m = mark();
  EXPECT_EQ(m.invocation_id, 200u);
  EXPECT_EQ(m.below, (std::uint64_t{1} << 63) - 1);  // all 63 ids below the mark
  EXPECT_EQ(m.iv_time, 7);
}

TEST_F(ReplayWindowTest, ReorderedInsideTheWindowAcceptedOnceBelowItRefused) {
  EXPECT_EQ(raise(101), V::accepted);  // k+1 first (the rollover engine's answer)
  EXPECT_EQ(raise(100), V::accepted);  // then k (the read answered before it)
  EXPECT_EQ(raise(100), V::replayed);
  EXPECT_EQ(raise(101), V::replayed);
  EXPECT_EQ(raise(50), V::accepted);
  EXPECT_EQ(raise(38), V::accepted);   // 101 - 63: the lowest id the window holds
  EXPECT_EQ(raise(37), V::too_old);    // 101 - 64
  EXPECT_EQ(raise(1), V::too_old);
  EXPECT_EQ(raise(50), V::replayed);
  EXPECT_EQ(raise(38), V::replayed);
  EXPECT_EQ(raise(99), V::accepted);
  // A refused id leaves the row as it was.
  const ReplayMark before = mark();
  EXPECT_EQ(raise(99), V::replayed);
  EXPECT_EQ(raise(20), V::too_old);
  const ReplayMark after = mark();
  EXPECT_EQ(before.invocation_id, after.invocation_id);
  EXPECT_EQ(before.below, after.below);
  EXPECT_EQ(before.floor, after.floor);
  // Other meters are not affected.
  EXPECT_EQ(raise(20, 64, 1), V::accepted);
}

TEST_F(ReplayWindowTest, JumpsSlideTheWindow) {
  EXPECT_EQ(raise(100), V::accepted);
  EXPECT_EQ(raise(98), V::accepted);
  EXPECT_EQ(raise(163), V::accepted);  // +63: 100 becomes the oldest bit (62)
  EXPECT_EQ(raise(100), V::replayed);
  EXPECT_EQ(raise(98), V::too_old);
  EXPECT_EQ(raise(101), V::accepted);
  EXPECT_EQ(raise(227), V::accepted);  // +64: nothing of the old window stays
  EXPECT_EQ(raise(163), V::too_old);
  EXPECT_EQ(raise(164), V::accepted);
  EXPECT_EQ(mark().below, std::uint64_t{1} << 62);
  EXPECT_EQ(raise(226), V::accepted);
  const std::uint64_t far = 227 + (std::uint64_t{1} << 40);
  EXPECT_EQ(raise(far), V::accepted);
  EXPECT_EQ(mark().below, 0u);
  EXPECT_EQ(raise(far - 1), V::accepted);
  EXPECT_EQ(raise(far - 1), V::replayed);
  EXPECT_EQ(raise(227), V::too_old);
}

TEST_F(ReplayWindowTest, IdsNearTheLimits) {
  // The 32-bit wrap point of the C12.22 stacks (DESIGN §2).
  EXPECT_EQ(raise(0x7FFFFFFF), V::accepted);
  EXPECT_EQ(raise(0x80000000), V::accepted);
  EXPECT_EQ(raise(0x7FFFFFFE), V::accepted);
  EXPECT_EQ(raise(0x7FFFFFFF), V::replayed);
  EXPECT_EQ(raise(0x80000000 - 64), V::too_old);
  EXPECT_EQ(raise(0x80000000 - 63), V::accepted);
  // 2^63-1, the largest id the store keeps.
  constexpr std::uint64_t kMax = static_cast<std::uint64_t>(INT64_MAX);
  EXPECT_EQ(raise(kMax - 1, 64, 1), V::accepted);
  EXPECT_EQ(raise(kMax - 65, 64, 1), V::too_old);  // a first mark holds the 63 ids below it
  EXPECT_EQ(raise(kMax - 64, 64, 1), V::accepted);
  EXPECT_EQ(raise(kMax, 64, 1), V::accepted);      // kMax - 64 leaves the window
  EXPECT_EQ(raise(kMax, 64, 1), V::replayed);
  EXPECT_EQ(raise(kMax - 1, 64, 1), V::replayed);
  EXPECT_EQ(raise(kMax - 64, 64, 1), V::too_old);
  EXPECT_EQ(raise(kMax - 63, 64, 1), V::accepted);  // the oldest bit (62)
  EXPECT_EQ(raise(kMax - 63, 64, 1), V::replayed);
  const ReplayMark m = mark(1);
  EXPECT_EQ(m.invocation_id, kMax);
  EXPECT_EQ(m.below, (std::uint64_t{1} << 0) | (std::uint64_t{1} << 62));
  // A jump from 0-ish to 2^63-1 (a shift count far above 63).
  EXPECT_EQ(raise(1, 64, 2), V::accepted);
  EXPECT_EQ(raise(kMax, 64, 2), V::accepted);
  EXPECT_EQ(mark(2).below, 0u);
  EXPECT_EQ(raise(kMax - 1, 64, 2), V::accepted);
  // Out of range: refused as an argument, nothing stored.
  auto bad = ks_->raise_replay_mark(rows_[3], kMax + 1, 7, 64);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, Errc::invalid_argument);
  auto wide = ks_->raise_replay_mark(rows_[3], 5, 7, 65);
  ASSERT_FALSE(wide.ok());
  EXPECT_EQ(wide.error().code, Errc::invalid_argument);
  EXPECT_FALSE(ks_->replay_mark(rows_[3]).value().has_value());
}

TEST_F(ReplayWindowTest, WindowZeroOrOneIsStrictlyRising) {
  for (unsigned w : {0u, 1u}) {
    const int meter = static_cast<int>(w);
    EXPECT_EQ(raise(10, w, meter), V::accepted);
    EXPECT_EQ(raise(9, w, meter), V::too_old);
    EXPECT_EQ(raise(10, w, meter), V::replayed);
    EXPECT_EQ(raise(12, w, meter), V::accepted);
    EXPECT_EQ(raise(11, w, meter), V::too_old);
    EXPECT_EQ(mark(meter).below, 0u);
  }
}

TEST_F(ReplayWindowTest, AWindowMadeLargerNeverReopensForgottenIds) {
  EXPECT_EQ(raise(100, 4), V::accepted);
  EXPECT_EQ(raise(97, 4), V::accepted);
  EXPECT_EQ(raise(96, 4), V::too_old);
  EXPECT_EQ(raise(110, 4), V::accepted);  // 97 and 100 leave the 4-id window
  // Now with 64: ids at or below 110-4 were forgotten (maybe accepted), so stay refused.
  EXPECT_EQ(raise(100, 64), V::too_old);
  EXPECT_EQ(raise(97, 64), V::too_old);
  EXPECT_EQ(raise(106, 64), V::too_old);
  EXPECT_EQ(raise(107, 64), V::accepted);
  EXPECT_EQ(raise(107, 64), V::replayed);
  // Made smaller: what falls out is too old, and stays so when it grows back.
  EXPECT_EQ(raise(108, 2), V::too_old);
  EXPECT_EQ(raise(111, 2), V::accepted);   // 109 (never accepted) leaves the 2-id window
  EXPECT_EQ(raise(109, 64), V::too_old);
  EXPECT_EQ(raise(110, 64), V::replayed);
}

TEST_F(ReplayWindowTest, MarksFromBeforeTheWindowsRefuseEverythingBelowThem) {
  // A database of schema v6 (before the window columns) with one meter whose mark is 500.
  ks_.reset();
  for (const char* ext : {"", "-wal", "-shm"}) std::filesystem::remove(path_ + ext);
  {
    auto db = db::Db::open(path_).value();
    ASSERT_TRUE(create_schema_version(db, 6).ok());
    const std::string title = "2.16.124.113620.1.22.0.7.1";
    const Bytes oid = c1222::oid_from_dotted(title).value();
    auto ins = db.prepare("INSERT INTO meters (row, meter_id, ap_title, ap_title_text, "
                          "created_at) VALUES (?1, 'M1', ?2, ?3, 0)")
                   .value();
    ins.bind(1, rows_[0]).bind(2, ByteView(oid)).bind(3, title);
    ASSERT_TRUE(ins.run().ok());
    ASSERT_TRUE(db.exec("INSERT INTO replay_state VALUES (" + std::to_string(rows_[0]) +
                        ", 500, 9)")
                    .ok());
  }
  auto ks = KeyStore::open(path_);
  ASSERT_TRUE(ks.ok()) << ks.error().message();
  ks_.emplace(std::move(ks).value());
  const ReplayMark m = mark();
  EXPECT_EQ(m.invocation_id, 500u);
  EXPECT_EQ(m.iv_time, 9);
  EXPECT_EQ(m.floor, 500);
  EXPECT_EQ(raise(499), V::too_old);  // maybe accepted by the old rule: unknown
  EXPECT_EQ(raise(500), V::replayed);
  EXPECT_EQ(raise(502), V::accepted);
  EXPECT_EQ(raise(501), V::accepted);
  EXPECT_EQ(raise(500), V::replayed);
  EXPECT_EQ(raise(499), V::too_old);
}

// Random ids around a rising point, with duplicates, reorderings and jumps: the store, the pure
// ReplayMark and the worker filter (one worker, nothing failing: the same verdicts) all agree
// with the plain definition: accepted iff never accepted and above (highest accepted) - W.
TEST_F(ReplayWindowTest, AgreesWithTheSetOfAcceptedIds) {
  // Logic, not durability, is under test here: no fsync per id.
  ASSERT_TRUE(ks_->db().exec("PRAGMA synchronous=OFF").ok());
  std::mt19937_64 rng(20261126);
  for (unsigned w : {0u, 2u, 5u, 63u, 64u}) {
    SCOPED_TRACE("window " + std::to_string(w));
    const int meter = static_cast<int>(w % 4);
    ASSERT_TRUE(ks_->db().exec("DELETE FROM replay_state").ok());
    dkus::ReplayMarks filter(4096, w);
    std::set<std::uint64_t> accepted;
    std::optional<ReplayMark> pure;
    std::uint64_t point = std::uint64_t{1} << 31;
    for (int i = 0; i < 1200; ++i) {
      const std::uint64_t r = rng() % 100;
      if (r < 3) point += 64 + rng() % 1000;   // a jump
      else if (r < 60) point += rng() % 3;     // mostly rising
      const std::uint64_t back = rng() % 80;   // sometimes below the window
      const std::uint64_t id = point > back ? point - back : 1;
      V want = V::accepted;
      if (!accepted.empty()) {
        const std::uint64_t top = *accepted.rbegin();
        if (accepted.count(id) != 0) {
          want = V::replayed;
        } else if (id < top && top - id >= std::max(w, 1u)) {
          want = V::too_old;
        }
      }
      // A replayed id below the window may be named either way; the refusal is what counts.
      const V got = raise(id, w, meter);
      const V pv = pure ? pure->judge(id, w) : V::accepted;
      const V fv = filter.claim(rows_[static_cast<std::size_t>(meter)], id);
      ASSERT_EQ(got == V::accepted, want == V::accepted) << "id " << id << " step " << i;
      if (want == V::accepted || (!accepted.empty() && id == *accepted.rbegin())) {
        ASSERT_EQ(got, want) << id;
      }
      ASSERT_EQ(pv, got) << "id " << id;
      ASSERT_EQ(fv, got) << "id " << id;
      if (got == V::accepted) {
        accepted.insert(id);
        if (pure) {
          pure->accept(id, 7, w);
        } else {
          pure = ReplayMark::first(id, 7, w);
        }
      }
    }
    const ReplayMark stored = mark(meter);
    EXPECT_EQ(stored.invocation_id, pure->invocation_id);
    EXPECT_EQ(stored.below, pure->below);
    EXPECT_EQ(stored.floor, pure->floor);
  }
}

// Connections (as worker processes and the rollover engine hold them) racing the same ids of
// one meter, each in its own order and in group-commit batches: every id accepted exactly once.
TEST_F(ReplayWindowTest, RacingConnectionsAcceptEachIdOnce) {
  constexpr int kConnections = 4;
  constexpr std::uint64_t kIds = 400;
  std::vector<std::atomic<int>> wins(kIds + 1);
  std::vector<std::thread> ts;
  std::atomic<int> errors{0};
  for (int c = 0; c < kConnections; ++c) {
    ts.emplace_back([&, c] {
      auto ks = KeyStore::open(path_);
      if (!ks.ok()) {
        ++errors;
        return;
      }
      // Rising overall, shuffled inside blocks of 32 (well inside the window).
      std::vector<std::uint64_t> order;
      for (std::uint64_t id = 1; id <= kIds; ++id) order.push_back(id);
      std::mt19937_64 rng(static_cast<std::uint64_t>(c) + 1);
      for (std::size_t b = 0; b < order.size(); b += 32) {
        std::shuffle(order.begin() + static_cast<std::ptrdiff_t>(b),
                     order.begin() + static_cast<std::ptrdiff_t>(std::min(b + 32, order.size())),
                     rng);
      }
      for (std::size_t b = 0; b < order.size(); b += 8) {
        std::vector<std::uint64_t> won;
        auto tx = db::Transaction::begin(ks->db());
        if (!tx.ok()) {
          ++errors;
          return;
        }
        for (std::size_t i = b; i < std::min(b + 8, order.size()); ++i) {
          auto v = ks->raise_replay_mark(rows_[0], order[i], 7, 64);
          if (!v.ok()) {
            ++errors;
            return;
          }
          if (*v == V::accepted) won.push_back(order[i]);
        }
        if (!tx->commit().ok()) {
          ++errors;
          return;
        }
        for (std::uint64_t id : won) ++wins[id];
      }
    });
  }
  for (auto& t : ts) t.join();
  ASSERT_EQ(errors.load(), 0);
  for (std::uint64_t id = 1; id <= kIds; ++id) EXPECT_EQ(wins[id].load(), 1) << "id " << id;
}

// The worker's in-memory filter: refuses only what the store certainly refuses, and a claim
// that did not commit is released.
// The group committer's batching: updates that arrive while it waits join one transaction, and
// a full batch (max_batch) ends the wait at once. max_delay is far longer than the test may
// take, so a writer that missed the full batch's wake-up would fail the wait below.
TEST_F(ReplayWindowTest, GroupCommitterJoinsUpdatesAndAFullBatchEndsTheWait) {
  auto store = KeyStore::open(path_);
  ASSERT_TRUE(store.ok()) << store.error().message();
  metrics::Registry registry;
  dkus::CommitterOptions opt;
  opt.max_delay = std::chrono::seconds(120);
  opt.max_batch = 8;
  dkus::GroupCommitter committer(std::move(store).value(), opt, registry);
  committer.start();
  std::mutex mu;
  std::condition_variable cv;
  std::vector<dkus::CommitOutcome> outcomes;
  for (std::uint64_t i = 1; i <= 8; ++i) {
    dkus::MarkUpdate u;
    u.meter = rows_.at(i % 2);
    u.invocation_id = 100 + i;
    u.iv_time = 7;
    u.done = [&](dkus::CommitOutcome o) {
      std::lock_guard<std::mutex> lock(mu);
      outcomes.push_back(o);
      cv.notify_all();
    };
    ASSERT_TRUE(committer.submit(std::move(u)).ok());
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return outcomes.size() == 8; }))
        << "a full batch did not end the committer's wait";
  }
  for (auto o : outcomes) EXPECT_EQ(o, dkus::CommitOutcome::committed);
  EXPECT_EQ(registry.counter("gridseal_dkus_group_commits_total", "").value(), 1u);
  EXPECT_EQ(registry.counter("gridseal_dkus_group_commit_updates_total", "").value(), 8u);
  EXPECT_EQ(mark(0).invocation_id, 108u);
  EXPECT_EQ(mark(1).invocation_id, 107u);
  // Fewer than a batch: stop() ends the wait and commits them; nothing is dropped.
  dkus::MarkUpdate u;
  u.meter = rows_.at(2);
  u.invocation_id = 5;
  u.iv_time = 7;
  u.done = [&](dkus::CommitOutcome o) { outcomes.push_back(o); };
  ASSERT_TRUE(committer.submit(std::move(u)).ok());
  committer.stop();
  ASSERT_EQ(outcomes.size(), 9u);
  EXPECT_EQ(outcomes.back(), dkus::CommitOutcome::committed);
  EXPECT_EQ(mark(2).invocation_id, 5u);
}

TEST(ReplayMarksFilter, ClaimReleaseAndBounds) {
  dkus::ReplayMarks f(1024, 64);
  EXPECT_EQ(f.check(1, 100), V::accepted);
  EXPECT_EQ(f.claim(1, 100), V::accepted);
  EXPECT_EQ(f.claim(1, 100), V::replayed);
  EXPECT_EQ(f.claim(1, 99), V::accepted);
  EXPECT_EQ(f.check(1, 99), V::replayed);
  EXPECT_EQ(f.check(1, 36), V::too_old);
  EXPECT_EQ(f.check(1, 37), V::accepted);
  EXPECT_EQ(f.check(2, 36), V::accepted);  // another meter
  // 99 did not commit: it may come again.
  f.release(1, 99);
  EXPECT_EQ(f.check(1, 99), V::accepted);
  EXPECT_EQ(f.claim(1, 99), V::accepted);
  // The highest claim did not commit: the meter is forgotten (the store decides alone).
  f.release(1, 100);
  EXPECT_EQ(f.check(1, 99), V::accepted);
  EXPECT_EQ(f.check(1, 20), V::accepted);
  EXPECT_EQ(f.size(), 0u);
  // Strictly rising with a window of 0.
  dkus::ReplayMarks s(1024, 0);
  EXPECT_EQ(s.claim(1, 10), V::accepted);
  EXPECT_EQ(s.check(1, 9), V::too_old);
  EXPECT_EQ(s.check(1, 10), V::replayed);
  EXPECT_EQ(s.check(1, 11), V::accepted);
  // Bounded: a full shard is emptied, never grows past its share.
  dkus::ReplayMarks b(1024, 64);
  for (std::int64_t m = 0; m < 100000; ++m) (void)b.claim(m, 5);
  EXPECT_LE(b.size(), 1024u + 64u);
}

}  // namespace
}  // namespace gs::store
