// db::Db's busy handler: a connection waiting for another one's write lock retries in steps of
// 10 µs doubling to 500 µs (not SQLite's 1..100 ms sleeps), gets the lock once it is free, gives
// up with Errc::busy after busy_timeout_ms, and keeps working after the Db is moved.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <thread>

#include "src/sqlite.h"

namespace gs::db {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::microseconds;
using std::chrono::milliseconds;

TEST(SqliteBusyWait, StepsDoubleFromTenMicrosecondsToHalfAMillisecond) {
  EXPECT_EQ(busy_wait_step(-1), microseconds(10));
  EXPECT_EQ(busy_wait_step(0), microseconds(10));
  EXPECT_EQ(busy_wait_step(1), microseconds(20));
  EXPECT_EQ(busy_wait_step(4), microseconds(160));
  EXPECT_EQ(busy_wait_step(5), microseconds(320));
  EXPECT_EQ(busy_wait_step(6), microseconds(500));
  EXPECT_EQ(busy_wait_step(1000000), microseconds(500));
}

class SqliteBusyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/gs-sqlite-busy-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/t.db";
    auto db = Db::open(path_);
    ASSERT_TRUE(db.ok()) << db.error().message();
    ASSERT_TRUE(db->exec("CREATE TABLE t (v INTEGER NOT NULL)").ok());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  Db open(int busy_timeout_ms) {
    OpenOptions o;
    o.busy_timeout_ms = busy_timeout_ms;
    auto db = Db::open(path_, o);
    EXPECT_TRUE(db.ok()) << db.error().message();
    return std::move(db).value();
  }

  // Holds the write lock (BEGIN IMMEDIATE + one row) on its own connection for `hold`.
  std::thread hold_lock(milliseconds hold, std::promise<void>& held) {
    return std::thread([this, hold, &held] {
      Db db = open(1000);
      auto tx = Transaction::begin(db);
      ASSERT_TRUE(tx.ok()) << tx.error().message();
      ASSERT_TRUE(db.exec("INSERT INTO t (v) VALUES (1)").ok());
      held.set_value();
      std::this_thread::sleep_for(hold);
      ASSERT_TRUE(tx->commit().ok());
    });
  }

  // A writer on table `blobs` that never checkpoints by itself.
  Db blob_writer() {
    Db db = open(5000);
    EXPECT_TRUE(db.exec("CREATE TABLE blobs (b BLOB NOT NULL)").ok());
    EXPECT_TRUE(disable_autocheckpoint(db).ok());
    return db;
  }

  // One transaction of `rows` rows of 3,000 bytes (about a page each).
  static void commit_blobs(Db& db, int rows) {
    const Bytes page(3000, 0x5A);
    auto tx = Transaction::begin(db);
    ASSERT_TRUE(tx.ok()) << tx.error().message();
    auto ins = db.prepare("INSERT INTO blobs (b) VALUES (?1)");
    ASSERT_TRUE(ins.ok());
    for (int r = 0; r < rows; ++r) {
      ASSERT_TRUE(ins->bind(1, ByteView(page)).run().ok());
      ins->reset();
    }
    ASSERT_TRUE(tx->commit().ok());
  }

  std::string dir_;
  std::string path_;
};

TEST_F(SqliteBusyTest, WaiterGetsTheLockOnceTheHolderCommits) {
  std::promise<void> held;
  auto ready = held.get_future();
  std::thread holder = hold_lock(milliseconds(150), held);
  ready.wait();
  Db waiter = open(5000);
  auto tx = Transaction::begin(waiter);
  ASSERT_TRUE(tx.ok()) << tx.error().message();
  ASSERT_TRUE(waiter.exec("INSERT INTO t (v) VALUES (2)").ok());
  ASSERT_TRUE(tx->commit().ok());
  holder.join();
  auto st = waiter.prepare("SELECT COUNT(*), SUM(v) FROM t");
  ASSERT_TRUE(st.ok());
  ASSERT_EQ(st->step().value(), Step::row);
  EXPECT_EQ(st->int64(0), 2);
  EXPECT_EQ(st->int64(1), 3);
}

// synchronous=NORMAL and the WAL's fsync after COMMIT (the SES's audit.fsync_outside_lock): the
// committed rows are there for another connection before and after the fsync, and the fsync is
// of the write-ahead log (a database in rollback-journal mode has none: an error, not a no-op).
TEST_F(SqliteBusyTest, WalIsSyncedAfterACommitWithoutFsync) {
  Db w = open(5000);
  ASSERT_TRUE(w.exec("PRAGMA synchronous=NORMAL").ok());
  {
    auto tx = Transaction::begin(w);
    ASSERT_TRUE(tx.ok());
    ASSERT_TRUE(w.exec("INSERT INTO t (v) VALUES (7)").ok());
    ASSERT_TRUE(tx->commit().ok());
  }
  Db r = open(5000);
  auto count = [&] {
    auto st = r.prepare("SELECT COUNT(*) FROM t WHERE v = 7");
    EXPECT_TRUE(st.ok());
    EXPECT_EQ(st->step().value(), Step::row);
    return st->int64(0);
  };
  EXPECT_EQ(count(), 1);
  Status synced = w.sync_wal();
  EXPECT_TRUE(synced.ok()) << synced.error().message();
  EXPECT_EQ(count(), 1);

  auto rollback = Db::open(dir_ + "/journal.db");
  ASSERT_TRUE(rollback.ok());
  ASSERT_TRUE(rollback->exec("PRAGMA journal_mode=DELETE; CREATE TABLE x (v INTEGER)").ok());
  Status none = rollback->sync_wal();
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.error().message().find("no write-ahead log"), std::string::npos);
}

// The audit's sync thread (audit.fsync_thread) fsyncs the WAL through its own descriptor of the
// file SQLite writes the connection's WAL to, which survives checkpoints that rewind the log.
TEST_F(SqliteBusyTest, WalSyncerOpensTheConnectionsOwnLog) {
  Db w = open(5000);
  ASSERT_TRUE(w.exec("PRAGMA synchronous=NORMAL").ok());
  ASSERT_TRUE(w.exec("INSERT INTO t (v) VALUES (8)").ok());
  auto syncer = WalSyncer::open(w);
  ASSERT_TRUE(syncer.ok()) << syncer.error().message();
  struct stat by_fd {}, by_name {};
  ASSERT_EQ(fstat(syncer->fd(), &by_fd), 0);
  ASSERT_EQ(stat((path_ + "-wal").c_str(), &by_name), 0);
  EXPECT_EQ(by_fd.st_ino, by_name.st_ino);
  EXPECT_GT(by_fd.st_size, 0);
  Status synced = syncer->sync();
  EXPECT_TRUE(synced.ok()) << synced.error().message();
  // A TRUNCATE checkpoint empties the log in place: the same file, still synced.
  ASSERT_TRUE(w.exec("PRAGMA wal_checkpoint(TRUNCATE)").ok());
  ASSERT_TRUE(w.exec("INSERT INTO t (v) VALUES (9)").ok());
  ASSERT_EQ(stat((path_ + "-wal").c_str(), &by_name), 0);
  EXPECT_EQ(by_fd.st_ino, by_name.st_ino);
  EXPECT_TRUE(syncer->sync().ok());
  WalSyncer moved = std::move(syncer).value();
  EXPECT_TRUE(moved.sync().ok());

  auto rollback = Db::open(dir_ + "/journal2.db");
  ASSERT_TRUE(rollback.ok());
  ASSERT_TRUE(rollback->exec("PRAGMA journal_mode=DELETE; CREATE TABLE x (v INTEGER)").ok());
  auto none = WalSyncer::open(*rollback);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.error().message().find("no write-ahead log"), std::string::npos)
      << none.error().message();
}

TEST_F(SqliteBusyTest, InTransactionFollowsBeginAndEnd) {
  Db db = open(5000);
  EXPECT_FALSE(db.in_transaction());
  ASSERT_TRUE(db.exec("BEGIN").ok());
  EXPECT_TRUE(db.in_transaction());
  ASSERT_TRUE(db.exec("ROLLBACK").ok());
  EXPECT_FALSE(db.in_transaction());
  {
    auto tx = Transaction::begin(db);
    ASSERT_TRUE(tx.ok());
    EXPECT_TRUE(db.in_transaction());
  }
  EXPECT_FALSE(db.in_transaction());
}

TEST_F(SqliteBusyTest, WaiterGivesUpWithBusyAfterItsTimeout) {
  std::promise<void> held;
  auto ready = held.get_future();
  std::thread holder = hold_lock(milliseconds(1500), held);
  ready.wait();
  Db waiter = open(200);
  const auto t0 = Clock::now();
  auto tx = Transaction::begin(waiter);
  const auto waited = Clock::now() - t0;
  ASSERT_FALSE(tx.ok());
  EXPECT_EQ(tx.error().code, Errc::busy) << tx.error().message();
  EXPECT_GE(waited, milliseconds(200));
  EXPECT_LT(waited, milliseconds(1500)) << "gave up only when the holder let go";
  holder.join();
}

// Every connection reads through pread: in WAL mode a connection unmaps a mapped file whenever
// another one committed in between (src/sqlite.cc), which cost a munmap per audit commit.
TEST_F(SqliteBusyTest, ConnectionsDoNotMapTheDatabaseFile) {
  Db a = open(5000);
  Db b = open(5000);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(a.exec("INSERT INTO t (v) VALUES (1)").ok());
    // Into the database file: pages still in the WAL are read from the WAL, never mapped.
    ASSERT_TRUE(a.exec("PRAGMA wal_checkpoint(TRUNCATE)").ok());
    auto st = b.prepare("SELECT COUNT(*) FROM t");
    ASSERT_TRUE(st.ok());
    ASSERT_EQ(st->step().value(), Step::row);
    EXPECT_EQ(st->int64(0), i + 1);
  }
  std::ifstream maps("/proc/self/maps");
  ASSERT_TRUE(maps.good());
  const std::string file = std::filesystem::canonical(path_).string();
  std::string line;
  while (std::getline(maps, line)) {
    EXPECT_FALSE(line.size() >= file.size() &&
                 line.compare(line.size() - file.size(), file.size(), file) == 0)
        << line;
  }
}

TEST_F(SqliteBusyTest, ZeroTimeoutFailsAtOnce) {
  std::promise<void> held;
  auto ready = held.get_future();
  std::thread holder = hold_lock(milliseconds(300), held);
  ready.wait();
  Db waiter = open(0);
  const auto t0 = Clock::now();
  auto tx = Transaction::begin(waiter);
  const auto waited = Clock::now() - t0;
  ASSERT_FALSE(tx.ok());
  EXPECT_EQ(tx.error().code, Errc::busy);
  EXPECT_LT(waited, milliseconds(300));
  holder.join();
}

// The handler's state lives on the heap: a moved-from Db must not leave the connection pointing
// at freed state (ASan would flag it here).
TEST_F(SqliteBusyTest, MovedConnectionStillWaits) {
  Db first = open(5000);
  Db moved(std::move(first));
  Db assigned = open(5000);
  assigned = std::move(moved);
  std::promise<void> held;
  auto ready = held.get_future();
  std::thread holder = hold_lock(milliseconds(100), held);
  ready.wait();
  auto tx = Transaction::begin(assigned);
  ASSERT_TRUE(tx.ok()) << tx.error().message();
  ASSERT_TRUE(tx->commit().ok());
  holder.join();
}

// A writer with wal_autocheckpoint off never copies its WAL back itself; the Checkpointer does,
// and once the WAL holds restart_frames it makes the writer start it over (RESTART), so the file
// stays bounded though the writer never pauses at a moment when the WAL is fully copied.
TEST_F(SqliteBusyTest, CheckpointerKeepsTheWalOfAWriterWithoutAutocheckpointBounded) {
  const std::string wal = path_ + "-wal";
  auto write = [](Db& db, int commits) {
    for (int c = 0; c < commits; ++c) {
      commit_blobs(db, 20);
      std::this_thread::sleep_for(milliseconds(3));
    }
  };
  Db db = blob_writer();

  // Control: nobody checkpoints, so 300 commits of 20 pages leave over 5,000 frames in the WAL.
  // (Enough that a checkpointer thread starved for a second on a loaded machine still passes.)
  write(db, 300);
  const auto unchecked = std::filesystem::file_size(wal);
  EXPECT_GE(unchecked, 5000u * 4096u);
  ASSERT_TRUE(db.exec("PRAGMA wal_checkpoint(TRUNCATE)").ok());
  ASSERT_EQ(std::filesystem::file_size(wal), 0u);

  {
    auto cp = Checkpointer::start(path_, milliseconds(20), 256);
    ASSERT_TRUE(cp.ok()) << cp.error().message();
    write(db, 300);
    EXPECT_GT((*cp)->runs(), 0u);
    EXPECT_GT((*cp)->restarts(), 0u);
  }  // stops and joins
  EXPECT_LT(std::filesystem::file_size(wal), unchecked / 2);

  EXPECT_FALSE(Checkpointer::start(path_, milliseconds(0)).ok());
  EXPECT_FALSE(Checkpointer::start(path_, milliseconds(10), 0).ok());
  EXPECT_FALSE(Checkpointer::start(dir_ + "/absent.db", milliseconds(10)).ok());
}

// RESTART waits for readers of the old WAL while it holds the write lock. A reader that keeps its
// snapshot open (an audit export, say) must not stall the writers for their whole busy timeout:
// the Checkpointer gives up after kRestartWaitMs and tries again at its next run.
TEST_F(SqliteBusyTest, LongReaderDoesNotStallWritersThroughTheCheckpointer) {
  Db writer = blob_writer();
  commit_blobs(writer, 100);

  Db reader = open(5000);
  ASSERT_TRUE(reader.exec("BEGIN").ok());
  {
    auto st = reader.prepare("SELECT COUNT(*) FROM blobs");
    ASSERT_TRUE(st.ok());
    ASSERT_EQ(st->step().value(), Step::row);  // the read transaction now holds a snapshot
    EXPECT_EQ(st->int64(0), 100);
  }
  auto cp = Checkpointer::start(path_, milliseconds(10), 32);
  ASSERT_TRUE(cp.ok()) << cp.error().message();
  Clock::duration worst{};
  const auto until = Clock::now() + milliseconds(800);
  while (Clock::now() < until) {
    const auto t0 = Clock::now();
    commit_blobs(writer, 5);
    worst = std::max(worst, Clock::now() - t0);
    std::this_thread::sleep_for(milliseconds(2));
  }
  EXPECT_GT((*cp)->runs(), 5u);
  EXPECT_LT(worst, milliseconds(1000)) << "a commit waited for the reader through RESTART";
  ASSERT_TRUE(reader.exec("COMMIT").ok());
}

}  // namespace
}  // namespace gs::db
