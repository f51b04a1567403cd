// SQLite wrapper implementation.
#include "src/sqlite.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "gridseal/thread_name.h"

namespace gs::db {

std::chrono::microseconds busy_wait_step(int attempt) noexcept {
  constexpr long kFirst = 10;
  constexpr long kMax = 500;
  const int shift = std::clamp(attempt, 0, 6);
  return std::chrono::microseconds(std::min(kMax, kFirst << shift));
}

struct Db::BusyWait {
  std::chrono::milliseconds timeout{0};
  std::chrono::steady_clock::time_point first;

  // sqlite3_busy_handler callback: nonzero to retry, zero to give up (the statement fails with
  // SQLITE_BUSY). `attempt` is 0 on the first call for a statement.
  static int retry(void* self, int attempt) {
    auto* w = static_cast<BusyWait*>(self);
    const auto now = std::chrono::steady_clock::now();
    if (attempt == 0) w->first = now;
    if (now - w->first >= w->timeout) return 0;
    std::this_thread::sleep_for(busy_wait_step(attempt));
    return 1;
  }
};

Db::Db(sqlite3* db) : db_(db), busy_(std::make_unique<BusyWait>()) {}

Db::Db(Db&& o) noexcept : db_(o.db_), busy_(std::move(o.busy_)) { o.db_ = nullptr; }

namespace {
Error sql_error(sqlite3* db, const char* what) {
  std::string d = what;
  d += ": ";
  d += db != nullptr ? sqlite3_errmsg(db) : "out of memory";
  return Error(Errc::storage_failure, std::move(d));
}
}  // namespace

Result<Db> Db::open(const std::string& path, const OpenOptions& opt) {
  int flags = SQLITE_OPEN_NOMUTEX;
  flags |= opt.read_only ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE;
  if (opt.create && !opt.read_only) flags |= SQLITE_OPEN_CREATE;
  sqlite3* raw = nullptr;
  int rc = sqlite3_open_v2(path.c_str(), &raw, flags, nullptr);
  Db db(raw);
  if (rc != SQLITE_OK) {
    return Error(Errc::not_found, "cannot open database " + path + ": " +
                                      (raw ? sqlite3_errmsg(raw) : "out of memory"));
  }
  db.busy_->timeout = std::chrono::milliseconds(std::max(0, opt.busy_timeout_ms));
  sqlite3_busy_handler(raw, &BusyWait::retry, db.busy_.get());
  sqlite3_extended_result_codes(raw, 1);
  if (!opt.read_only) {
    GS_TRY(db.exec("PRAGMA journal_mode=WAL"));
  }
  GS_TRY(db.exec(opt.synchronous_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL"));
  GS_TRY(db.exec("PRAGMA foreign_keys=ON"));
  // A 64 MiB page cache per connection; reads through pread, not a memory map. In WAL mode a
  // connection that starts a transaction after any other connection committed resets its cache
  // and, with mmap_size > 0, unmaps the whole file (to map it again on the next read). Every
  // daemon here has several writers (audit writers of two workers, id reservations, replay
  // marks), so that happened before almost every audit commit: a munmap of the mapped database
  // with a TLB shootdown on every core, then page faults. mmap_size=0 (also SQLite's default)
  // measured slightly less CPU on the SES and no loss on the DKUS (README "Performance").
  GS_TRY(db.exec("PRAGMA mmap_size=0"));
  GS_TRY(db.exec("PRAGMA cache_size=-65536"));
  return db;
}

Db& Db::operator=(Db&& o) noexcept {
  if (this != &o) {
    if (db_ != nullptr) {
      sqlite3_busy_handler(db_, nullptr, nullptr);
      sqlite3_close_v2(db_);
    }
    db_ = o.db_;
    busy_ = std::move(o.busy_);
    o.db_ = nullptr;
  }
  return *this;
}

Db::~Db() {
  if (db_ != nullptr) {
    // A statement left open keeps the connection alive (close_v2) past busy_'s lifetime.
    sqlite3_busy_handler(db_, nullptr, nullptr);
    sqlite3_close_v2(db_);
  }
}

Status Db::exec(std::string_view sql) {
  std::string s(sql);
  char* err = nullptr;
  int rc = sqlite3_exec(db_, s.c_str(), nullptr, nullptr, &err);
  if (rc != SQLITE_OK) {
    std::string d = err != nullptr ? err : sqlite3_errstr(rc);
    sqlite3_free(err);
    return Error((rc & 0xFF) == SQLITE_BUSY ? Errc::busy : Errc::storage_failure, "SQL: " + d);
  }
  return {};
}

Result<Stmt> Db::prepare(std::string_view sql) {
  sqlite3_stmt* st = nullptr;
  int rc = sqlite3_prepare_v3(db_, sql.data(), static_cast<int>(sql.size()),
                              SQLITE_PREPARE_PERSISTENT, &st, nullptr);
  if (rc != SQLITE_OK) return sql_error(db_, "prepare");
  return Stmt(db_, st);
}

std::int64_t Db::last_insert_rowid() const { return sqlite3_last_insert_rowid(db_); }
int Db::changes() const { return sqlite3_changes(db_); }

bool Db::in_transaction() const { return sqlite3_get_autocommit(db_) == 0; }

Status Db::sync_wal() {
  sqlite3_file* f = nullptr;
  if (sqlite3_file_control(db_, "main", SQLITE_FCNTL_JOURNAL_POINTER, &f) != SQLITE_OK ||
      f == nullptr || f->pMethods == nullptr) {
    return {Errc::storage_failure, "no write-ahead log to fsync"};
  }
  if (const int rc = f->pMethods->xSync(f, SQLITE_SYNC_NORMAL); rc != SQLITE_OK) {
    return {Errc::storage_failure, std::string("fsync of the write-ahead log failed: ") +
                                       sqlite3_errstr(rc)};
  }
  return {};
}
std::string Db::last_error() const { return sqlite3_errmsg(db_); }

Result<WalSyncer> WalSyncer::open(Db& db) {
  const char* main = sqlite3_db_filename(db.raw(), "main");
  std::string mode;
  if (auto st = db.prepare("PRAGMA journal_mode"); st.ok()) {
    if (auto row = st->step(); row.ok() && *row == Step::row) mode = st->text(0);
  }
  if (main == nullptr || *main == '\0' || mode != "wal") {
    return Error(Errc::storage_failure, "no write-ahead log to fsync (journal mode " +
                                            (mode.empty() ? std::string("unknown") : mode) + ")");
  }
  const char* wal = sqlite3_filename_wal(main);
  const int fd = ::open(wal, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return Error(Errc::storage_failure,
                 std::string(wal) + ": cannot open the write-ahead log: " + std::strerror(errno));
  }
  return WalSyncer(fd);
}

WalSyncer& WalSyncer::operator=(WalSyncer&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

WalSyncer::~WalSyncer() {
  if (fd_ >= 0) ::close(fd_);
}

Status WalSyncer::sync() {
  if (::fdatasync(fd_) != 0) {
    return {Errc::storage_failure,
            std::string("fsync of the write-ahead log failed: ") + std::strerror(errno)};
  }
  return {};
}

Stmt& Stmt::operator=(Stmt&& o) noexcept {
  if (this != &o) {
    sqlite3_finalize(st_);
    db_ = o.db_;
    st_ = o.st_;
    o.st_ = nullptr;
  }
  return *this;
}

Stmt::~Stmt() { sqlite3_finalize(st_); }

Stmt& Stmt::bind(int i, std::int64_t v) {
  sqlite3_bind_int64(st_, i, v);
  return *this;
}
Stmt& Stmt::bind(int i, std::string_view v) {
  sqlite3_bind_text(st_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  return *this;
}
Stmt& Stmt::bind(int i, ByteView v) {
  sqlite3_bind_blob(st_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  return *this;
}
Stmt& Stmt::bind_null(int i) {
  sqlite3_bind_null(st_, i);
  return *this;
}

Result<Step> Stmt::step() {
  int rc = sqlite3_step(st_);
  if (rc == SQLITE_ROW) return Step::row;
  if (rc == SQLITE_DONE) return Step::done;
  Error e((rc & 0xFF) == SQLITE_CONSTRAINT ? Errc::conflict
          : (rc & 0xFF) == SQLITE_BUSY     ? Errc::busy
                                           : Errc::storage_failure,
          std::string("SQL step: ") + sqlite3_errmsg(db_));
  sqlite3_reset(st_);
  return e;
}

Status Stmt::run() {
  GS_ASSIGN(Step s, step());
  (void)s;
  reset();
  return {};
}

void Stmt::reset() noexcept {
  sqlite3_reset(st_);
  sqlite3_clear_bindings(st_);
}

bool Stmt::is_null(int col) const { return sqlite3_column_type(st_, col) == SQLITE_NULL; }
std::int64_t Stmt::int64(int col) const { return sqlite3_column_int64(st_, col); }
std::string Stmt::text(int col) const {
  const auto* p = sqlite3_column_text(st_, col);
  int n = sqlite3_column_bytes(st_, col);
  return p != nullptr ? std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n))
                      : std::string();
}
Bytes Stmt::blob(int col) const {
  ByteView v = blob_view(col);
  return Bytes(v.begin(), v.end());
}
ByteView Stmt::blob_view(int col) const {
  const void* p = sqlite3_column_blob(st_, col);
  int n = sqlite3_column_bytes(st_, col);
  if (p == nullptr || n <= 0) return {};
  return {static_cast<const std::uint8_t*>(p), static_cast<std::size_t>(n)};
}

ReadTransaction::~ReadTransaction() {
  if (open_) (void)db_->exec("ROLLBACK");
}

Status ReadTransaction::begin(std::string_view sql) {
  if (open_ || db_->in_transaction()) return {};
  GS_TRY(db_->exec(sql));
  open_ = true;
  return {};
}

Result<Transaction> Transaction::begin(Db& db) {
  GS_TRY(db.exec("BEGIN IMMEDIATE"));
  return Transaction(&db);
}

Transaction::~Transaction() {
  if (db_ != nullptr) (void)db_->exec("ROLLBACK");
}

Status Transaction::commit() {
  if (db_ == nullptr) return {Errc::invalid_argument, "transaction already finished"};
  Status s = db_->exec("COMMIT");
  if (s.ok()) db_ = nullptr;
  return s;
}

}  // namespace gs::db

namespace gs::db {

struct Checkpointer::State {
  Db db;
  std::chrono::milliseconds interval;
  std::int64_t restart_frames;
  std::mutex mu;
  std::condition_variable cv;
  bool stopping = false;
  std::atomic<std::uint64_t> runs{0};
  std::atomic<std::uint64_t> restarts{0};
  std::thread thread;

  State(Db d, std::chrono::milliseconds i, std::int64_t r)
      : db(std::move(d)), interval(i), restart_frames(r) {}

  // Failures (e.g. the file went read-only) leave the WAL to the next run, or to a connection
  // with autocheckpoint on; the writers' own commits report a failing store.
  void checkpoint() {
    runs.fetch_add(1, std::memory_order_relaxed);
    auto st = db.prepare("PRAGMA wal_checkpoint(PASSIVE)");
    if (!st.ok()) return;
    auto row = st->step();
    if (!row.ok() || *row != Step::row) return;
    const std::int64_t frames = st->int64(1);  // (busy, frames in the WAL, frames copied)
    st->reset();
    if (frames < restart_frames) return;
    auto rs = db.prepare("PRAGMA wal_checkpoint(RESTART)");
    if (!rs.ok()) return;
    auto rrow = rs->step();
    if (rrow.ok() && *rrow == Step::row && rs->int64(0) == 0) {
      restarts.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void run() {
    std::unique_lock<std::mutex> lock(mu);
    while (!stopping) {
      cv.wait_for(lock, interval, [this] { return stopping; });
      if (stopping) break;
      lock.unlock();
      checkpoint();
      lock.lock();
    }
    lock.unlock();
    checkpoint();
  }
};

Result<std::unique_ptr<Checkpointer>> Checkpointer::start(const std::string& path,
                                                           std::chrono::milliseconds interval,
                                                           std::int64_t restart_frames) {
  if (interval.count() <= 0) return Error(Errc::invalid_argument, "checkpoint interval must be > 0");
  if (restart_frames <= 0) return Error(Errc::invalid_argument, "restart_frames must be > 0");
  OpenOptions o;
  o.create = false;
  // RESTART holds the write lock while it waits for readers of the old WAL: a long reader (an
  // audit export, say) must not stall every writer for the default 5 s. PASSIVE never waits.
  o.busy_timeout_ms = static_cast<int>(kRestartWaitMs);
  GS_ASSIGN(Db db, Db::open(path, o));
  auto st = std::make_unique<State>(std::move(db), interval, restart_frames);
  State* raw = st.get();
  st->thread = std::thread([raw] {
    name_this_thread("gs-checkpoint");
    raw->run();
  });
  return std::unique_ptr<Checkpointer>(new Checkpointer(std::move(st)));
}

Result<std::unique_ptr<Checkpointer>> Checkpointer::take_over(Db& writer, const std::string& path) {
  GS_TRY(disable_autocheckpoint(writer));
  return start(path, kInterval);
}

Checkpointer::Checkpointer(std::unique_ptr<State> s) : state_(std::move(s)) {}

Checkpointer::~Checkpointer() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stopping = true;
  }
  state_->cv.notify_all();
  if (state_->thread.joinable()) state_->thread.join();
}

std::uint64_t Checkpointer::runs() const noexcept {
  return state_->runs.load(std::memory_order_relaxed);
}

std::uint64_t Checkpointer::restarts() const noexcept {
  return state_->restarts.load(std::memory_order_relaxed);
}

Status disable_autocheckpoint(Db& db) { return db.exec("PRAGMA wal_autocheckpoint=0"); }

}  // namespace gs::db
