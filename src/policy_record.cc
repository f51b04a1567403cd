// Applied SES policies (policy_record.h): reading a policy file once (hash and
// parse the same bytes), the append-only record of applied policies and
// gridseal-sesd's approval check.
#include "src/policy_record.h"

#include <algorithm>
#include <fstream>

namespace gs::policy {

namespace {

ByteView bytes_of(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t *>(s.data()), s.size()};
}

std::string short_hex(const Sha256Digest &d) {
  return to_hex(ByteView(d.data(), d.size()));
}

} // namespace

Result<PolicyFile> read_policy_file(const std::string &path,
                                    ByteView base_oid) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    return Error(Errc::not_found, path + ": cannot be read");
  PolicyFile f;
  f.text.resize(kMaxPolicyFile + 1);
  in.read(f.text.data(), static_cast<std::streamsize>(f.text.size()));
  if (in.bad())
    return Error(Errc::not_found, path + ": cannot be read");
  f.text.resize(static_cast<std::size_t>(in.gcount()));
  if (f.text.size() > kMaxPolicyFile)
    return Error(Errc::too_large, path + ": larger than 16 MiB");
  f.text.shrink_to_fit();
  GS_ASSIGN(f.sha256, sha256(bytes_of(f.text)));
  GS_ASSIGN(f.policy, parse_policy(f.text, path, base_oid));
  return f;
}

Result<AppliedPolicy> record_applied(db::Db &db, std::string_view text,
                                     const Sha256Digest &sha,
                                     std::string_view applied_by,
                                     std::int64_t now) {
  if (text.size() > kMaxPolicyFile)
    return Error(Errc::too_large, "policy larger than 16 MiB");
  GS_ASSIGN(
      auto ins,
      db.prepare(
          "INSERT INTO policy_applied (sha256, size, content, applied_by, "
          "applied_at) VALUES (?1, ?2, ?3, ?4, ?5)"));
  ins.bind(1, ByteView(sha.data(), sha.size()))
      .bind(2, static_cast<std::int64_t>(text.size()))
      .bind(3, bytes_of(text))
      .bind(4, applied_by)
      .bind(5, now);
  GS_TRY(ins.run());
  AppliedPolicy a;
  a.seq = db.last_insert_rowid();
  a.sha256 = sha;
  a.size = static_cast<std::int64_t>(text.size());
  a.applied_by = std::string(applied_by);
  a.applied_at = now;
  return a;
}

Result<std::optional<AppliedPolicy>> newest_applied(db::Db &db,
                                                    bool with_content) {
  GS_ASSIGN(
      auto st,
      db.prepare(
          with_content
              ? "SELECT seq, sha256, size, applied_by, applied_at, content "
                "FROM policy_applied ORDER BY seq DESC LIMIT 1"
              : "SELECT seq, sha256, size, applied_by, applied_at "
                "FROM policy_applied ORDER BY seq DESC LIMIT 1"));
  GS_ASSIGN(db::Step s, st.step());
  if (s == db::Step::done)
    return std::optional<AppliedPolicy>();
  AppliedPolicy a;
  a.seq = st.int64(0);
  const ByteView h = st.blob_view(1);
  if (h.size() != a.sha256.size()) {
    return Error(Errc::storage_failure,
                 "policy_applied: a SHA-256 that is not 32 bytes");
  }
  std::copy(h.begin(), h.end(), a.sha256.begin());
  a.size = st.int64(2);
  a.applied_by = st.text(3);
  a.applied_at = st.int64(4);
  if (with_content) {
    const ByteView c = st.blob_view(5);
    a.content.assign(c.begin(), c.end());
  }
  return std::optional<AppliedPolicy>(std::move(a));
}

Result<Approval> check_approved(db::Db &db, const std::string &path,
                                const Sha256Digest &sha) {
  GS_ASSIGN(auto newest, newest_applied(db));
  if (!newest)
    return Approval::bootstrap;
  if (newest->sha256 == sha)
    return Approval::approved;
  return Error(Errc::conflict,
               path + " (sha256 " + short_hex(sha) +
                   ") is not the applied policy: the newest applied one (#" +
                   std::to_string(newest->seq) + ", sha256 " +
                   short_hex(newest->sha256) + ", by " + newest->applied_by +
                   ") differs; approve this file with `gridseal "
                   "policy apply " +
                   path +
                   "` or restore the applied one (`gridseal policy "
                   "show`)");
}

} // namespace gs::policy
