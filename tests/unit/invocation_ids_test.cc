// Invocation ids: interoperable values, counter mapping and wrap, blocks, two allocators on one
// database, and no reuse after a kill -9 of a worker.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>
#include <set>
#include <vector>

#include "c1222/oid.h"
#include "c1222/profile.h"
#include "src/invocation_ids.h"
#include "src/key_store.h"

namespace gs::ids {
namespace {

TEST(InvocationIds, InteroperableRanges) {
  EXPECT_FALSE(is_interoperable(0));
  EXPECT_TRUE(is_interoperable(1));
  EXPECT_TRUE(is_interoperable(0x7F));
  for (std::uint64_t v : {0x80ULL, 0xFFULL, 0x8000ULL, 0xFFFFULL, 0x800000ULL, 0xFFFFFFULL,
                          0x80000000ULL, 0xFFFFFFFFULL, 0x100000000ULL}) {
    EXPECT_FALSE(is_interoperable(v)) << std::hex << v;
  }
  for (std::uint64_t v : {0x100ULL, 0x7FFFULL, 0x10000ULL, 0x7FFFFFULL, 0x1000000ULL,
                          0x7FFFFFFFULL, 0x0F4241ULL}) {
    EXPECT_TRUE(is_interoperable(v)) << std::hex << v;
  }
}

TEST(InvocationIds, CounterMappingSkipsAndWraps) {
  EXPECT_EQ(id_for_counter(0), 1u);
  EXPECT_EQ(id_for_counter(126), 0x7Fu);
  EXPECT_EQ(id_for_counter(127), 0x100u);                       // skips 0x80..0xFF
  EXPECT_EQ(id_for_counter(127 + 0x7F00 - 1), 0x7FFFu);
  EXPECT_EQ(id_for_counter(127 + 0x7F00), 0x10000u);            // skips 0x8000..0xFFFF
  EXPECT_EQ(id_for_counter(127 + 0x7F00 + 0x7F0000 - 1), 0x7FFFFFu);
  EXPECT_EQ(id_for_counter(127 + 0x7F00 + 0x7F0000), 0x1000000u);  // skips 0x800000..
  EXPECT_EQ(id_for_counter(kIdCycle - 1), 0x7FFFFFFFu);
  EXPECT_EQ(id_for_counter(kIdCycle), 1u);                      // wraps after 0x7FFFFFFF
  EXPECT_EQ(id_for_counter(2 * kIdCycle + 127), 0x100u);
  EXPECT_EQ(kIdCycle, 2139062143u);
  // Inverse and consecutive ids around every boundary.
  for (std::uint64_t base : {std::uint64_t{0}, std::uint64_t{120}, std::uint64_t{32630},
                            std::uint64_t{32639}, std::uint64_t{8355700}, kIdCycle - 5}) {
    std::uint32_t prev = 0;
    for (std::uint64_t c = base; c < base + 20; ++c) {
      const std::uint32_t id = id_for_counter(c);
      EXPECT_TRUE(is_interoperable(id)) << c;
      EXPECT_EQ(counter_for_id(id).value(), c % kIdCycle);
      if (prev != 0 && id != 1) {
        EXPECT_GT(id, prev);
      }
      prev = id;
    }
  }
  EXPECT_FALSE(counter_for_id(0x80).has_value());
}

TEST(InvocationIds, EncodingIsMinimalWithoutLeadingZero) {
  EXPECT_EQ(encode_id(1), Bytes({0x01}));
  EXPECT_EQ(encode_id(0x7F), Bytes({0x7F}));
  EXPECT_EQ(encode_id(0x100), Bytes({0x01, 0x00}));
  EXPECT_EQ(encode_id(0x0F4241), Bytes({0x0F, 0x42, 0x41}));
  EXPECT_EQ(encode_id(0x7FFFFFFF), Bytes({0x7F, 0xFF, 0xFF, 0xFF}));
  for (std::uint64_t c = 0; c < kIdCycle; c += 9973 * 31) {
    const std::uint32_t id = id_for_counter(c);
    Bytes e = encode_id(id);
    ASSERT_FALSE(e.empty());
    EXPECT_NE(e[0], 0x00) << id;
    EXPECT_EQ(e[0] & 0x80, 0) << id;
    EXPECT_EQ(c1222::invocation_id_value(e).value(), id);
  }
}

TEST(InvocationIds, WindowAgainstWrapHorizon) {
  EXPECT_NEAR(wrap_horizon_seconds(20000), 106953.1, 1.0);
  EXPECT_TRUE(check_window(300, 50000, 60).ok());
  EXPECT_TRUE(check_window(86400, 20000, 60).ok());
  // 2139062143 / 50000 = 42781 s: a 12-hour window does not fit.
  auto r = check_window(43200, 50000, 60);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().detail.find("wrap horizon"), std::string::npos);
  // The horizon is 42781.24 s: 42721 + 60 fits, 42722 + 60 does not.
  EXPECT_TRUE(check_window(42721, 50000, 60).ok());
  EXPECT_FALSE(check_window(42722, 50000, 60).ok());
  EXPECT_FALSE(check_window(300, 0, 60).ok());
  EXPECT_FALSE(check_window(300, -1, 60).ok());
}

// A counter in memory standing in for the database.
struct FakeCounter {
  std::uint64_t next = 0;
  int calls = 0;
  ReserveFn fn() {
    return [this](ByteView, std::uint64_t n) -> Result<std::uint64_t> {
      ++calls;
      const std::uint64_t first = next;
      next += n;
      return first;
    };
  }
};

TEST(InvocationIds, AllocatorUsesBlocksAndAbandonsOldOnes) {
  FakeCounter fc;
  auto a = InvocationIdAllocator::make(fc.fn(), {.block_size = 10, .max_block_age_s = 5});
  ASSERT_TRUE(a.ok());
  const Bytes title = {0x2A, 0x03};
  for (std::uint32_t i = 1; i <= 10; ++i) EXPECT_EQ(a->next(title, 100).value(), i);
  EXPECT_EQ(fc.calls, 1);
  EXPECT_EQ(a->next(title, 100).value(), 11u);  // second block 10..19
  EXPECT_EQ(fc.calls, 2);
  // Older than max_block_age: the rest (12..20) is skipped.
  EXPECT_EQ(a->next(title, 106).value(), 21u);
  EXPECT_EQ(fc.calls, 3);
  EXPECT_EQ(a->stats().values_abandoned, 9u);
  // A clock that goes back abandons the block too.
  EXPECT_EQ(a->next(title, 50).value(), 31u);
  // Another title has its own counter and block.
  EXPECT_EQ(a->next(Bytes{0x2A, 0x04}, 50).value(), 41u);  // same fake counter, new block
  EXPECT_EQ(a->stats().blocks_reserved, 5u);
  EXPECT_EQ(a->stats().ids_issued, 14u);
}

TEST(InvocationIds, AllocatorWrapsAfterMaximum) {
  FakeCounter fc;
  fc.next = kIdCycle - 3;
  auto a = InvocationIdAllocator::make(fc.fn(), {.block_size = 8});
  ASSERT_TRUE(a.ok());
  const Bytes t = {0x01};
  EXPECT_EQ(a->next(t, 0).value(), 0x7FFFFFFDu);
  EXPECT_EQ(a->next(t, 0).value(), 0x7FFFFFFEu);
  EXPECT_EQ(a->next(t, 0).value(), 0x7FFFFFFFu);
  EXPECT_EQ(a->next(t, 0).value(), 1u);
  EXPECT_EQ(a->next(t, 0).value(), 2u);
}

TEST(InvocationIds, AllocatorRefusesBadInput) {
  FakeCounter fc;
  EXPECT_FALSE(InvocationIdAllocator::make(fc.fn(), {.block_size = 0}).ok());
  EXPECT_FALSE(InvocationIdAllocator::make(fc.fn(), {.max_block_age_s = 0}).ok());
  EXPECT_FALSE(InvocationIdAllocator::make(nullptr).ok());
  auto a = InvocationIdAllocator::make(fc.fn());
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(a->next({}, 0).ok());
  EXPECT_FALSE(a->next(Bytes(256, 1), 0).ok());
  // A failing store is reported, not papered over.
  auto bad = InvocationIdAllocator::make(
      [](ByteView, std::uint64_t) -> Result<std::uint64_t> { return Errc::storage_failure; });
  ASSERT_TRUE(bad.ok());
  auto r = bad->next(Bytes{1}, 0);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::storage_failure);
}

TEST(InvocationIds, MaxTitlesEvictsOldestBlock) {
  FakeCounter fc;
  auto a = InvocationIdAllocator::make(fc.fn(), {.block_size = 100, .max_titles = 2});
  ASSERT_TRUE(a.ok());
  auto counter = [&](std::uint8_t t, std::int64_t now) {
    return counter_for_id(a->next(Bytes{t}, now).value()).value();
  };
  EXPECT_EQ(counter(1, 1), 0u);
  EXPECT_EQ(counter(2, 2), 100u);
  EXPECT_EQ(counter(3, 3), 200u);  // evicts title 1's block
  EXPECT_EQ(counter(1, 4), 300u);
  EXPECT_EQ(a->stats().values_abandoned, 99u + 99u);  // title 1, then title 2
}

// A counter in memory that notices overlapping calls and can fail on demand or take its time.
struct SharedCounter {
  std::mutex mu;
  std::uint64_t next = 0;
  int calls = 0;
  std::atomic<bool> inside{false};
  std::atomic<int> overlaps{0};
  std::atomic<bool> fail{false};
  std::chrono::microseconds delay{0};
  ReserveFn fn() {
    return [this](ByteView, std::uint64_t n) -> Result<std::uint64_t> {
      if (inside.exchange(true)) ++overlaps;
      std::this_thread::sleep_for(delay);
      Result<std::uint64_t> r = Errc::storage_failure;
      if (!fail) {
        std::lock_guard lock(mu);
        ++calls;
        r = next;
        next += n;
      }
      inside = false;
      return r;
    };
  }
};

// Polls `done` for up to 10 s.
bool eventually(const std::function<bool()>& done) {
  for (int i = 0; i < 10000; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return done();
}

TEST(InvocationIds, PrefetchReservesTheNextBlockAhead) {
  SharedCounter c;
  auto a = InvocationIdAllocator::make(c.fn(), {.block_size = 10, .prefetch = true});
  ASSERT_TRUE(a.ok());
  const Bytes t = {0x2A, 0x03};
  std::uint32_t expect = 1;
  for (std::uint64_t blk = 0; blk < 5; ++blk) {
    for (int i = 0; i < 10; ++i) {
      EXPECT_EQ(a->next(t, 100).value(), expect++);
      // The 5th id of a block leaves half of it: the next one is asked for then.
      if (i == 5) {
        ASSERT_TRUE(eventually([&] { return a->stats().blocks_reserved == blk + 2; }));
      }
    }
  }
  const AllocatorStats st = a->stats();
  EXPECT_EQ(st.waited, 1u);  // the first block only
  EXPECT_EQ(st.blocks_reserved, 6u);
  EXPECT_EQ(st.ids_issued, 50u);
  EXPECT_EQ(st.values_abandoned, 0u);
}

TEST(InvocationIds, PrefetchNeverCallsTheStoreTwiceAtOnce) {
  SharedCounter c;
  c.delay = std::chrono::microseconds(300);
  auto a = InvocationIdAllocator::make(c.fn(), {.block_size = 16, .prefetch = true});
  ASSERT_TRUE(a.ok());
  std::vector<std::uint32_t> got[4];
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int i = 0; i < 2000; ++i) {
        auto x = a->next(Bytes{0x01}, 7);
        got[k].push_back(x.ok() ? *x : 0);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::set<std::uint32_t> seen;
  for (const auto& g : got) {
    for (std::uint32_t x : g) {
      EXPECT_NE(x, 0u);
      EXPECT_TRUE(seen.insert(x).second) << "id " << x << " issued twice";
    }
  }
  EXPECT_EQ(seen.size(), 8000u);
  EXPECT_EQ(c.overlaps.load(), 0);
  EXPECT_EQ(a->stats().ids_issued, 8000u);
}

TEST(InvocationIds, FailedPrefetchFallsBackToWaiting) {
  SharedCounter c;
  auto a = InvocationIdAllocator::make(c.fn(), {.block_size = 10, .prefetch = true});
  ASSERT_TRUE(a.ok());
  const Bytes t = {0x05};
  EXPECT_EQ(a->next(t, 100).value(), 1u);
  c.fail = true;
  for (std::uint32_t i = 2; i <= 5; ++i) EXPECT_EQ(a->next(t, 100).value(), i);
  ASSERT_TRUE(eventually([&] { return a->stats().prefetch_failures == 1; }));
  c.fail = false;
  // Not asked again within the same second; the block's rest is still there.
  for (std::uint32_t i = 6; i <= 10; ++i) EXPECT_EQ(a->next(t, 100).value(), i);
  EXPECT_EQ(a->next(t, 100).value(), 11u);  // reserved in next()
  const AllocatorStats st = a->stats();
  EXPECT_EQ(st.waited, 2u);
  EXPECT_EQ(st.prefetch_failures, 1u);
  // The store failing for the caller too is reported.
  c.fail = true;
  auto b = InvocationIdAllocator::make(c.fn(), {.block_size = 10, .prefetch = true});
  auto r = b->next(t, 100);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Errc::storage_failure);
}

TEST(InvocationIds, SpareBlockAgesFromWhenItWasAskedFor) {
  SharedCounter c;
  auto a = InvocationIdAllocator::make(
      c.fn(), {.block_size = 10, .max_block_age_s = 5, .prefetch = true});
  ASSERT_TRUE(a.ok());
  const Bytes t = {0x06};
  for (std::uint32_t i = 1; i <= 6; ++i) EXPECT_EQ(a->next(t, 100).value(), i);
  ASSERT_TRUE(eventually([&] { return a->stats().blocks_reserved == 2; }));
  // Asked for at 100: at 106 the spare (counter 10..19) is too old, like the current block.
  EXPECT_EQ(a->next(t, 106).value(), 21u);
  EXPECT_EQ(a->stats().values_abandoned, 4u + 10u);
}

class InvocationIdsDb : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-ids-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/gridseal.db";
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
  std::string path_;
  const Bytes title_ = c1222::oid_from_dotted("2.16.124.113620.1.22.0.1.9").value();
};

TEST_F(InvocationIdsDb, TwoAllocatorsNeverOverlap) {
  auto ks1 = store::KeyStore::open(path_);
  auto ks2 = store::KeyStore::open(path_);
  ASSERT_TRUE(ks1.ok() && ks2.ok());
  auto a1 = InvocationIdAllocator::over(*ks1, {.block_size = 7});
  auto a2 = InvocationIdAllocator::over(*ks2, {.block_size = 13});
  ASSERT_TRUE(a1.ok() && a2.ok());
  std::set<std::uint32_t> seen;
  for (int i = 0; i < 3000; ++i) {
    auto x = (i % 3 == 0 ? a2 : a1)->next(title_, 1000);
    ASSERT_TRUE(x.ok()) << x.error().message();
    EXPECT_TRUE(is_interoperable(*x));
    EXPECT_TRUE(seen.insert(*x).second) << "id " << *x << " issued twice";
  }
  // A third allocator opened later continues after both.
  auto ks3 = store::KeyStore::open(path_);
  auto a3 = InvocationIdAllocator::over(*ks3, {.block_size = 5});
  const std::uint32_t later = a3->next(title_, 1000).value();
  EXPECT_GT(later, *seen.rbegin());
}

class InvocationIdsKill : public InvocationIdsDb, public ::testing::WithParamInterface<bool> {};

// The child reserves its blocks in next() (false) or ahead on the allocator's thread (true).
TEST_P(InvocationIdsKill, KillNineNeverReusesIds) {
  const bool prefetch = GetParam();
  {
    auto ks = store::KeyStore::open(path_);  // schema before the child starts
    ASSERT_TRUE(ks.ok());
  }
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(fds[0]);
    auto ks = store::KeyStore::open(path_);
    if (!ks.ok()) _exit(2);
    auto a = InvocationIdAllocator::over(*ks, {.block_size = 50, .prefetch = prefetch});
    if (!a.ok()) _exit(3);
    for (int i = 0; i < 10'000'000; ++i) {
      auto id = a->next(title_, 1);
      if (!id.ok()) _exit(4);
      const std::uint32_t v = *id;
      if (write(fds[1], &v, sizeof v) != static_cast<ssize_t>(sizeof v)) _exit(5);
    }
    _exit(0);
  }
  close(fds[1]);
  std::vector<std::uint32_t> child_ids;
  std::uint32_t v = 0;
  while (child_ids.size() < 1234) {
    const ssize_t n = read(fds[0], &v, sizeof v);
    ASSERT_EQ(n, static_cast<ssize_t>(sizeof v));
    child_ids.push_back(v);
  }
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status));
  // Whatever the child wrote before it died counts as handed out.
  for (;;) {
    const ssize_t n = read(fds[0], &v, sizeof v);
    if (n != static_cast<ssize_t>(sizeof v)) break;
    child_ids.push_back(v);
  }
  close(fds[0]);
  const std::uint32_t child_max = *std::max_element(child_ids.begin(), child_ids.end());
  // The child could have handed out anything in the blocks it reserved: a fresh allocator
  // must start beyond all of them.
  auto ks = store::KeyStore::open(path_);
  ASSERT_TRUE(ks.ok());
  auto a = InvocationIdAllocator::over(*ks, {.block_size = 50});
  ASSERT_TRUE(a.ok());
  std::set<std::uint32_t> child_set(child_ids.begin(), child_ids.end());
  EXPECT_EQ(child_set.size(), child_ids.size()) << "the child repeated an id";
  const std::uint32_t first = a->next(title_, 2).value();
  EXPECT_GT(first, child_max);
  // And its first id starts a block boundary (the child's partial block was skipped).
  EXPECT_EQ(counter_for_id(first).value() % 50, 0u);
  for (int i = 0; i < 500; ++i) {
    const std::uint32_t x = a->next(title_, 2).value();
    EXPECT_FALSE(child_set.contains(x));
    EXPECT_GT(x, child_max);
  }
}

INSTANTIATE_TEST_SUITE_P(Prefetch, InvocationIdsKill, ::testing::Bool());

TEST_F(InvocationIdsDb, PrefetchingAllocatorsOnOneDatabaseNeverOverlap) {
  auto ks1 = store::KeyStore::open(path_);
  auto ks2 = store::KeyStore::open(path_);
  ASSERT_TRUE(ks1.ok() && ks2.ok());
  auto a1 = InvocationIdAllocator::over(*ks1, {.block_size = 16, .prefetch = true});
  auto a2 = InvocationIdAllocator::over(*ks2, {.block_size = 16, .prefetch = true});
  ASSERT_TRUE(a1.ok() && a2.ok());
  std::vector<std::uint32_t> got[4];
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      InvocationIdAllocator& a = k % 2 == 0 ? *a1 : *a2;
      for (int i = 0; i < 500; ++i) {
        auto x = a.next(title_, 1000);
        if (!x.ok()) return;
        got[k].push_back(*x);
      }
    });
  }
  for (auto& t : threads) t.join();
  std::set<std::uint32_t> seen;
  for (const auto& g : got) {
    ASSERT_EQ(g.size(), 500u);
    for (std::uint32_t x : g) EXPECT_TRUE(seen.insert(x).second) << "id " << x << " issued twice";
  }
  // Most blocks were reserved ahead: the callers waited for a few only.
  EXPECT_LT(a1->stats().waited + a2->stats().waited, a1->stats().blocks_reserved +
                                                         a2->stats().blocks_reserved);
}

}  // namespace
}  // namespace gs::ids
