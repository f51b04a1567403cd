// Reading the audit table in tests (issue 7 records of the rollover engine and challenges).
#pragma once

#include <string>
#include <vector>

#include "src/sqlite.h"

namespace gs::test {

struct AuditRecordRow {
  std::int64_t seq = 0;
  std::string actor, event, subject, detail;
};

// The records of `event` (all when empty), oldest first, through the caller's connection.
inline std::vector<AuditRecordRow> audit_records(db::Db& db, const std::string& event = "") {
  std::vector<AuditRecordRow> out;
  auto st = db.prepare("SELECT seq, actor, event, subject, detail FROM audit ORDER BY seq");
  if (!st.ok()) return out;
  while (true) {
    auto s = st->step();
    if (!s.ok() || *s != db::Step::row) break;
    AuditRecordRow r{st->int64(0), st->text(1), st->text(2), st->text(3), st->text(4)};
    if (event.empty() || r.event == event) out.push_back(std::move(r));
  }
  st->reset();
  return out;
}

inline std::size_t count_for(const std::vector<AuditRecordRow>& rows, const std::string& subject) {
  std::size_t n = 0;
  for (const auto& r : rows) n += r.subject == subject ? 1 : 0;
  return n;
}

}  // namespace gs::test
