// Thin RAII wrapper over SQLite: connection with gridseal's pragmas, prepared statements and
// BEGIN IMMEDIATE transactions, all reporting through gs::Result.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

struct sqlite3;
struct sqlite3_stmt;

namespace gs::db {

class Stmt;

struct OpenOptions {
  bool create = true;
  bool read_only = false;
  // How long a statement waits for another connection's lock before it fails with `busy`.
  // The wait polls every 10 µs at first, doubling up to every 500 µs (db::busy_wait_step): SQLite's
  // own busy_timeout sleeps 1, 2, 5, 10 ... 100 ms, which added tens of milliseconds to commits
  // whenever two workers' writers met.
  int busy_timeout_ms = 5000;
  // FULL for key state, invocation-id reservations and audit (DESIGN §5).
  bool synchronous_full = true;
};

// The pause before retry number `attempt` (0-based) of a statement waiting for a lock.
std::chrono::microseconds busy_wait_step(int attempt) noexcept;

// One connection. Not shared between threads; every process and worker opens its own.
class Db {
 public:
  static Result<Db> open(const std::string& path, const OpenOptions& opt = {});
  Db(Db&& o) noexcept;
  Db& operator=(Db&& o) noexcept;
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db();

  // Runs one or more statements without results.
  Status exec(std::string_view sql);
  Result<Stmt> prepare(std::string_view sql);
  std::int64_t last_insert_rowid() const;
  int changes() const;
  // True inside a transaction (BEGIN ... COMMIT/ROLLBACK) on this connection.
  bool in_transaction() const;
  // fsyncs this connection's write-ahead log. With synchronous=NORMAL a COMMIT writes its frames
  // to the WAL (so a killed process loses nothing) without fsync; this makes them durable
  // against a power failure too, after the write lock was released.
  Status sync_wal();
  sqlite3* raw() const noexcept { return db_; }
  // The error of the last call on this connection, for messages.
  std::string last_error() const;

 private:
  struct BusyWait;
  explicit Db(sqlite3* db);
  sqlite3* db_ = nullptr;
  std::unique_ptr<BusyWait> busy_;  // the busy handler's state: a stable address across moves
};

enum class Step : std::uint8_t { row, done };

// A prepared statement; reset() before re-use. Column indexes start at 0, bind at 1.
class Stmt {
 public:
  Stmt(Stmt&& o) noexcept : db_(o.db_), st_(o.st_) { o.st_ = nullptr; }
  Stmt& operator=(Stmt&& o) noexcept;
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt();

  Stmt& bind(int i, std::int64_t v);
  Stmt& bind(int i, std::string_view v);
  Stmt& bind(int i, ByteView v);
  Stmt& bind_null(int i);
  Result<Step> step();
  // Runs to completion, expecting no rows.
  Status run();
  void reset() noexcept;

  bool is_null(int col) const;
  std::int64_t int64(int col) const;
  std::string text(int col) const;
  Bytes blob(int col) const;
  ByteView blob_view(int col) const;  // valid until the next step/reset

 private:
  friend class Db;
  Stmt(sqlite3* db, sqlite3_stmt* st) : db_(db), st_(st) {}
  sqlite3* db_;
  sqlite3_stmt* st_;
};

// WAL checkpoints off a writer's commit path, on their own connection and thread. A connection
// that commits with wal_autocheckpoint on runs a checkpoint inside the COMMIT that crosses the
// threshold, copying up to a thousand pages into the database file and fsyncing it while every
// response waiting for that commit waits too; a latency-bound writer turns it off
// (disable_autocheckpoint; take_over does both) and lets one of these do the copying:
// - every `interval` (and once more when stopped), PRAGMA wal_checkpoint(PASSIVE): copies what is
//   committed without blocking anyone;
// - when the WAL then holds `restart_frames` frames or more, PRAGMA wal_checkpoint(RESTART).
//   Writers that commit without pause rarely leave the WAL fully copied at the instant one of
//   them begins, which is when SQLite starts the WAL over; without this the file grows with
//   every commit. RESTART waits for the current writer, copies the few frames PASSIVE left and
//   makes the next writer start over (a pause of one fsync of the database file). It holds the
//   write lock while it waits for readers of the old WAL, so it waits at most kRestartWaitMs
//   and otherwise ends as a PASSIVE one (tried again next time).
class Checkpointer {
 public:
  static constexpr std::int64_t kRestartWaitMs = 50;
  static constexpr std::chrono::milliseconds kInterval{500};
  static Result<std::unique_ptr<Checkpointer>> start(const std::string& path,
                                                      std::chrono::milliseconds interval,
                                                      std::int64_t restart_frames = 8192);
  // For a latency-bound writer on `path`: turns its autocheckpoint off, then start(path, kInterval).
  static Result<std::unique_ptr<Checkpointer>> take_over(Db& writer, const std::string& path);
  ~Checkpointer();  // stops and joins
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  std::uint64_t runs() const noexcept;      // PASSIVE checkpoints attempted so far
  std::uint64_t restarts() const noexcept;  // RESTART checkpoints that completed

 private:
  struct State;
  explicit Checkpointer(std::unique_ptr<State> s);
  std::unique_ptr<State> state_;
};

// An fsync of a connection's write-ahead log from another thread: its own read-only
// descriptor of the file SQLite names as that connection's WAL (sqlite3_filename_wal), so that
// the thread never touches the connection. fsync makes durable every write to the file that
// returned before it began, whichever descriptor made it. The file keeps its inode while the
// connection stays open (SQLite removes it only when the last connection closes; checkpoints
// rewind or truncate it in place), so the connection must outlive the syncer.
class WalSyncer {
 public:
  // Errc::storage_failure when `db` is not in WAL mode or the file cannot be opened.
  static Result<WalSyncer> open(Db& db);
  WalSyncer(WalSyncer&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  WalSyncer& operator=(WalSyncer&& o) noexcept;
  WalSyncer(const WalSyncer&) = delete;
  WalSyncer& operator=(const WalSyncer&) = delete;
  ~WalSyncer();
  Status sync();  // fdatasync
  int fd() const noexcept { return fd_; }

 private:
  explicit WalSyncer(int fd) : fd_(fd) {}
  int fd_ = -1;
};

// PRAGMA wal_autocheckpoint=0 on `db`: its commits never checkpoint (see Checkpointer).
Status disable_autocheckpoint(Db& db);

// A transaction that is only read in (or held to keep writers out): begin() starts it, and it
// ends with ROLLBACK when the guard goes out of scope. Nothing is begun while the connection is
// already inside a transaction: the caller's snapshot is then the one read.
class ReadTransaction {
 public:
  explicit ReadTransaction(Db& db) noexcept : db_(&db) {}
  ReadTransaction(const ReadTransaction&) = delete;
  ReadTransaction& operator=(const ReadTransaction&) = delete;
  ~ReadTransaction();
  // "BEGIN" (a snapshot from the first read on) or "BEGIN IMMEDIATE" (the write lock too).
  Status begin(std::string_view sql = "BEGIN");

 private:
  Db* db_;
  bool open_ = false;
};

// BEGIN IMMEDIATE on construction (takes the write lock up front, so two writers never
// deadlock on lock upgrade); ROLLBACK on destruction unless commit() succeeded.
class Transaction {
 public:
  static Result<Transaction> begin(Db& db);
  Transaction(Transaction&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  Transaction& operator=(Transaction&&) = delete;
  Transaction(const Transaction&) = delete;
  ~Transaction();
  Status commit();

 private:
  explicit Transaction(Db* db) : db_(db) {}
  Db* db_;
};

}  // namespace gs::db
