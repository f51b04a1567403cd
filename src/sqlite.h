// Thin RAII wrapper over SQLite: connection with gridseal's pragmas, prepared statements and
// BEGIN IMMEDIATE transactions, all reporting through gs::Result.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

struct sqlite3;
struct sqlite3_stmt;

namespace gs::db {

class Stmt;

struct OpenOptions {
  bool create = true;
  bool read_only = false;
  int busy_timeout_ms = 5000;
  // FULL for key state, invocation-id reservations and audit (DESIGN §5).
  bool synchronous_full = true;
};

// One connection. Not shared between threads; every process and worker opens its own.
class Db {
 public:
  static Result<Db> open(const std::string& path, const OpenOptions& opt = {});
  Db(Db&& o) noexcept : db_(o.db_) { o.db_ = nullptr; }
  Db& operator=(Db&& o) noexcept;
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db();

  // Runs one or more statements without results.
  Status exec(std::string_view sql);
  Result<Stmt> prepare(std::string_view sql);
  std::int64_t last_insert_rowid() const;
  int changes() const;
  sqlite3* raw() const noexcept { return db_; }
  // The error of the last call on this connection, for messages.
  std::string last_error() const;

 private:
  explicit Db(sqlite3* db) : db_(db) {}
  sqlite3* db_ = nullptr;
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
