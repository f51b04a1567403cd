// Archiving old audit records (src/audit.h, "archives"): the file, its registration in the chain,
// and the prune of what it holds.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <memory>
#include <thread>

#include "gridseal/clock.h"
#include "src/audit.h"
#include "src/host_ecdsa.h"
#include "src/operators.h"

namespace gs::audit {

namespace {

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

// A file that appears whole or not at all: written under a temporary name, fsync'd, renamed to
// the final name (never over an existing file), the directory fsync'd.
class AtomicFile {
 public:
  AtomicFile(std::string dir, std::string name)
      : dir_(std::move(dir)), final_(dir_ + "/" + name), tmp_(dir_ + "/." + name + ".tmp") {}
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!done_) ::unlink(tmp_.c_str());
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  Status open() {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (fd_ < 0) return Error(Errc::storage_failure, errno_text("cannot create " + tmp_));
    return {};
  }
  Status write(const std::string& s) {
    buf_ += s;
    return buf_.size() >= (1U << 20) ? flush() : Status{};
  }
  Status commit() {
    GS_TRY(flush());
    if (::fsync(fd_) != 0) return Error(Errc::storage_failure, errno_text("fsync " + tmp_));
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) return Error(Errc::storage_failure, errno_text("close " + tmp_));
    // Never over an existing file: that may be another run's registered archive.
    if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, final_.c_str(), RENAME_NOREPLACE) != 0) {
      return Error(errno == EEXIST ? Errc::conflict : Errc::storage_failure,
                   errno_text("rename to " + final_));
    }
    done_ = true;
    const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return Error(Errc::storage_failure, errno_text("open " + dir_));
    const int rc = ::fsync(dfd);
    ::close(dfd);
    if (rc != 0) return Error(Errc::storage_failure, errno_text("fsync " + dir_));
    return {};
  }
  const std::string& path() const noexcept { return final_; }

 private:
  Status flush() {
    std::size_t off = 0;
    while (off < buf_.size()) {
      const ssize_t n = ::write(fd_, buf_.data() + off, buf_.size() - off);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Error(Errc::storage_failure, errno_text("write " + tmp_));
      off += static_cast<std::size_t>(n);
    }
    buf_.clear();
    // Flushed as it goes: a gigabyte of dirty pages left for the final fsync would stall the
    // daemons' own fsyncs on the same disk.
    unsynced_ += off;
    if (unsynced_ >= (64U << 20)) {
      if (::fdatasync(fd_) != 0) return Error(Errc::storage_failure, errno_text("fsync " + tmp_));
      unsynced_ = 0;
    }
    return {};
  }

  std::string dir_, final_, tmp_;
  std::size_t unsynced_ = 0;
  int fd_ = -1;
  bool done_ = false;
  std::string buf_;
};

// "audit-FIRST-LAST-YYYYMMDDTHHMMSSZ.jsonl": the run's time keeps two runs over the same range
// (one that died before registering its file, one racing it) from ever sharing a name.
std::string archive_file_name(std::int64_t first, std::int64_t last, std::int64_t time) {
  const std::time_t t = static_cast<std::time_t>(time);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
  return "audit-" + std::to_string(first) + "-" + std::to_string(last) + "-" + stamp + ".jsonl";
}

// Writes records first..through with their checkpoints, checking each hash and link again (the
// file is the evidence once the records are gone). Fills the counts of `a`.
Status write_records(Chain& chain, const ArchiveOptions& opt, Archive& a, AtomicFile& f) {
  const std::int64_t chunk = std::max<std::int64_t>(1, opt.read_chunk);
  std::optional<Digest> prev;
  if (a.first_seq > 1) {
    GS_ASSIGN(auto base, chain.checkpoint_at(a.first_seq - 1));
    if (base) prev = base->head;  // the previous archive's end
  } else {
    prev = Digest{};
  }
  std::int64_t expected = a.first_seq;
  for (std::int64_t lo = a.first_seq; lo <= a.through; lo += chunk) {
    const std::int64_t hi = std::min(a.through, lo + chunk - 1);
    // Each chunk in its own read transaction: records up to `through` never change, so the file
    // needs no single snapshot, and a long reader would keep the WAL from starting over.
    db::ReadTransaction rs(chain.db());
    GS_TRY(rs.begin());
    GS_ASSIGN(auto recs, chain.records(lo, hi));
    GS_ASSIGN(auto cps, chain.checkpoints(lo, hi));
    std::size_t c = 0;
    for (const Record& r : recs) {
      if (r.seq != expected) {
        return Error(Errc::conflict, "record " + std::to_string(expected) +
                                         " is not in the table: run `gridseal audit verify`");
      }
      if (record_hash(r) != r.hash || (prev && r.prev_hash != *prev)) {
        return Error(Errc::conflict, "record " + std::to_string(r.seq) +
                                         " does not verify: run `gridseal audit verify`");
      }
      GS_TRY(f.write(record_json(r)));
      ++a.records;
      while (c < cps.size() && cps[c].seq <= r.seq) {
        if (cps[c].seq == r.seq) {
          if (cps[c].head != r.hash) {
            return Error(Errc::conflict, "the checkpoint at record " + std::to_string(r.seq) +
                                             " does not match it: run `gridseal audit verify`");
          }
          GS_TRY(f.write(checkpoint_json(cps[c])));
          ++a.checkpoints;
        }
        ++c;
      }
      prev = r.hash;
      ++expected;
    }
  }
  if (expected != a.through + 1) {
    return Error(Errc::conflict, "record " + std::to_string(expected) +
                                     " is not in the table: run `gridseal audit verify`");
  }
  return {};
}

}  // namespace

Status prune_archived(db::Db& db, const ArchiveOptions& opt, ArchiveResult& out) {
  GS_ASSIGN(auto arch, newest_archive(db));
  if (!arch) return {};
  const std::int64_t chunk = std::max<std::int64_t>(1, opt.delete_chunk);
  GS_ASSIGN(auto lowest, db.prepare("SELECT min(seq) FROM audit"));
  GS_ASSIGN(auto del, db.prepare("DELETE FROM audit WHERE seq < ?1"));
  GS_ASSIGN(auto del_cp, db.prepare("DELETE FROM audit_checkpoints WHERE seq < ?1"));
  std::chrono::steady_clock::duration wait{};
  for (bool first = true;; first = false) {
    GS_ASSIGN(db::Step step, lowest.step());
    const std::int64_t lo = step == db::Step::row && !lowest.is_null(0) ? lowest.int64(0) : 0;
    lowest.reset();
    // The last pass also deletes checkpoints whose records an earlier run already deleted.
    const bool records_left = lo >= 1 && lo <= arch->through;
    if (!records_left && !first) break;
    const std::int64_t hi = records_left ? std::min(lo + chunk, arch->through + 1) : 0;
    if (!first) std::this_thread::sleep_for(wait);
    const auto t0 = std::chrono::steady_clock::now();
    {
      GS_ASSIGN(auto tx, db::Transaction::begin(db));
      if (records_left) {
        del.bind(1, hi);
        GS_TRY(del.run());
        out.deleted += db.changes();
      }
      del_cp.bind(1, records_left ? std::min(hi, arch->through) : arch->through);
      GS_TRY(del_cp.run());
      out.deleted_checkpoints += db.changes();
      GS_TRY(tx.commit());
    }
    const auto took = std::chrono::steady_clock::now() - t0;
    ++out.delete_transactions;
    out.longest_delete = std::max(
        out.longest_delete, std::chrono::duration_cast<std::chrono::microseconds>(took));
    wait = std::max<std::chrono::steady_clock::duration>(opt.pause, 4 * took);
    if (!records_left) break;
  }
  return {};
}

Result<std::optional<Archive>> write_archive(db::Db& db, const ArchiveOptions& opt,
                                             std::string& path) {
  if (opt.dir.empty()) return Error(Errc::invalid_argument, "no archive directory");
  GS_ASSIGN(Chain chain, Chain::over(db));
  GS_ASSIGN(auto prev, newest_archive(db));
  Archive a;
  a.first_seq = prev ? prev->through + 1 : 1;
  {
    GS_ASSIGN(auto pick, db.prepare("SELECT max(seq) FROM audit_checkpoints "
                                    "WHERE seq >= ?1 AND time < ?2"));
    pick.bind(1, a.first_seq).bind(2, opt.before);
    GS_ASSIGN(db::Step step, pick.step());
    if (step != db::Step::row || pick.is_null(0)) return std::optional<Archive>{};
    a.through = pick.int64(0);
  }
  a.time = static_cast<std::int64_t>(utc_now());
  a.file = archive_file_name(a.first_seq, a.through, a.time);
  AtomicFile f(opt.dir, a.file);
  GS_TRY(f.open());
  std::string header = "{\"type\":\"header\",\"format\":\"gridseal-audit-1\",\"archive\":true,"
                       "\"exported_at\":" +
                       std::to_string(a.time) + ",\"first_seq\":" + std::to_string(a.first_seq) +
                       ",\"last_seq\":" + std::to_string(a.through);
  if (!opt.public_key.empty()) {
    GS_ASSIGN(const Digest fp, gs::sha256(opt.public_key));
    header += ",\"public_key_sha256\":\"" + to_hex(fp) + "\"";
  }
  header += "}\n";
  GS_TRY(f.write(header));
  GS_TRY(write_records(chain, opt, a, f));
  GS_TRY(f.commit());
  // What the registration attests: the file as it reads back.
  GS_ASSIGN(const std::string hex, operators::file_sha256_hex(f.path()));
  const auto bytes = from_hex(hex);
  if (!bytes || bytes->size() != a.sha256.size()) {
    return Error(Errc::crypto_failure, "SHA-256 of " + f.path() + " failed");
  }
  std::copy(bytes->begin(), bytes->end(), a.sha256.begin());
  path = f.path();
  return std::optional<Archive>{std::move(a)};
}

Status register_archive(db::Db& db, hsm::Session& s, Archive a, const ArchiveOptions& opt,
                        ArchiveResult& out) {
  if (opt.actor.empty()) return Error(Errc::invalid_argument, "no actor");
  GS_ASSIGN(Trail trail, Trail::over(db));
  Batch b;
  {
    GS_ASSIGN(auto tx, db::Transaction::begin(db));
    GS_ASSIGN(b, trail.begin(s, /*with_anchor=*/true));
    if (!b.check.ok()) return Error(Errc::conflict, "audit trail: " + b.check.message);
    GS_ASSIGN(auto now, newest_archive(db));
    if ((now ? now->through : 0) != a.first_seq - 1) {
      return Error(Errc::conflict, "another archive run registered first: nothing archived");
    }
    GS_ASSIGN(const Head h, trail.add(b, {a.time, opt.actor, kArchiveEvent,
                                          clip(a.file, kMaxSubject), archive_detail(a)}));
    a.record_seq = h.seq;
    GS_ASSIGN(auto ins, db.prepare("INSERT INTO audit_archives (through, first_seq, records, "
                                   "checkpoints, file, sha256, time, record_seq) "
                                   "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
    ins.bind(1, a.through).bind(2, a.first_seq).bind(3, a.records).bind(4, a.checkpoints);
    ins.bind(5, a.file).bind(6, ByteView(a.sha256)).bind(7, a.time).bind(8, a.record_seq);
    GS_TRY(ins.run());
    GS_TRY(trail.finish(s, b, /*checkpoint=*/true, /*anchor=*/true));
    GS_TRY(tx.commit());
  }
  GS_TRY(trail.confirm(s, b));
  out.archive = std::move(a);
  return prune_archived(db, opt, out);
}

Result<ArchiveResult> archive(db::Db& db, hsm::Session& s, const ArchiveOptions& opt) {
  ArchiveResult res;
  GS_TRY(prune_archived(db, opt, res));
  res.left_by_earlier_run = res.deleted;
  GS_ASSIGN(auto a, write_archive(db, opt, res.path));
  if (a) GS_TRY(register_archive(db, s, std::move(*a), opt, res));
  return res;
}

}  // namespace gs::audit
