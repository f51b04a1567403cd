// M-of-N approval requests in SQLite: the queries behind src/approvals.h.
#include "src/approvals.h"

#include <algorithm>

#include "src/operators.h"

namespace gs::approvals {

namespace {

constexpr const char* kColumns =
    "SELECT r.id, r.command, r.argv, r.description, r.digest, r.rule, r.role, r.required, "
    "r.requested_by, r.created_at, r.expires_at, r.state, r.executed_by, r.started_at, "
    "r.finished_at, r.exit_code, (SELECT count(*) FROM approval_signatures s WHERE s.request = "
    "r.id) FROM approval_requests r ";

Result<Request> read_request(const db::Stmt& st) {
  Request r;
  r.id = st.int64(0);
  r.command = st.text(1);
  GS_ASSIGN(r.argv, decode_argv(st.blob_view(2)));
  r.description = st.text(3);
  r.digest = st.blob(4);
  r.rule = st.text(5);
  r.role = st.text(6);
  r.required = static_cast<std::uint32_t>(std::clamp<std::int64_t>(st.int64(7), 0, 1 << 16));
  r.requested_by = st.text(8);
  r.created_at = st.int64(9);
  r.expires_at = st.int64(10);
  auto state = state_from(st.text(11));
  if (!state) return Error(Errc::storage_failure, "approval request with an unknown state");
  r.state = *state;
  r.executed_by = st.text(12);
  if (!st.is_null(13)) r.started_at = st.int64(13);
  if (!st.is_null(14)) r.finished_at = st.int64(14);
  if (!st.is_null(15)) r.exit_code = st.int64(15);
  r.signatures = static_cast<std::uint32_t>(std::clamp<std::int64_t>(st.int64(16), 0, 1 << 16));
  return r;
}

Status insert_signature(db::Db& db, std::int64_t id, const Signature& s) {
  GS_ASSIGN(auto st, db.prepare("INSERT INTO approval_signatures (request, operator, role, "
                                "signed_at, nonce, time, signature) VALUES (?1, ?2, ?3, ?4, "
                                "?5, ?6, ?7) ON CONFLICT DO NOTHING"));
  st.bind(1, id).bind(2, s.operator_name).bind(3, s.role).bind(4, s.signed_at);
  st.bind(5, ByteView(s.nonce)).bind(6, s.time).bind(7, ByteView(s.signature));
  GS_TRY(st.run());
  if (db.changes() != 1) {
    return Error(Errc::conflict, s.operator_name + " already signed approval request " +
                                     std::to_string(id) + " (approvals need distinct operators)");
  }
  return {};
}

}  // namespace

const char* to_string(State s) noexcept {
  switch (s) {
    case State::pending:
      return "pending";
    case State::running:
      return "running";
    case State::done:
      return "done";
    case State::failed:
      return "failed";
    case State::cancelled:
      return "cancelled";
  }
  return "?";
}

std::optional<State> state_from(std::string_view s) noexcept {
  for (State v : {State::pending, State::running, State::done, State::failed, State::cancelled}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

std::string Request::status_text(std::int64_t now) const {
  return expired(now) ? "expired" : to_string(state);
}

Result<Bytes> command_digest(std::string_view path,
                             std::vector<std::pair<std::string, std::string>> args) {
  // The operator field is fixed: the digest names what is approved, not who asks.
  operators::Request r{"quorum", std::string(path), std::move(args), {}, 0};
  GS_TRY(operators::canonicalize(r));
  GS_ASSIGN(auto d, operators::request_digest(r));
  return Bytes(d.begin(), d.end());
}

Bytes encode_argv(const std::vector<std::string>& argv) {
  Bytes b;
  for (const auto& a : argv) append_length_prefixed(b, as_bytes(a));
  return b;
}

Result<std::vector<std::string>> decode_argv(ByteView b) {
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < b.size()) {
    if (b.size() - i < 4 || out.size() >= kMaxArgv) {
      return Error(Errc::storage_failure, "approval request with a malformed command line");
    }
    std::size_t n = (std::size_t{b[i]} << 24) | (std::size_t{b[i + 1]} << 16) |
                    (std::size_t{b[i + 2]} << 8) | b[i + 3];
    i += 4;
    if (n > b.size() - i) {
      return Error(Errc::storage_failure, "approval request with a malformed command line");
    }
    out.emplace_back(reinterpret_cast<const char*>(b.data() + i), n);
    i += n;
  }
  return out;
}

Result<std::int64_t> Store::create(const Request& r, const Signature& first) {
  if (r.argv.empty() || r.argv.size() > kMaxArgv) {
    return Error(Errc::invalid_argument,
                 "the command to approve must have 1.." + std::to_string(kMaxArgv) + " arguments");
  }
  const Bytes argv = encode_argv(r.argv);
  if (argv.size() > kMaxArgvBytes) {
    return Error(Errc::too_large, "the command to approve is longer than " +
                                      std::to_string(kMaxArgvBytes) + " bytes");
  }
  {
    GS_ASSIGN(auto st, db_->prepare("SELECT count(*) FROM approval_requests WHERE state = "
                                    "'pending' AND expires_at > ?1"));
    st.bind(1, r.created_at);
    GS_ASSIGN(auto step, st.step());
    if (step == db::Step::row && st.int64(0) >= kMaxPending) {
      return Error(Errc::busy, std::to_string(kMaxPending) +
                                   " approval requests are open: approve, cancel or let some "
                                   "expire first");
    }
  }
  GS_ASSIGN(auto st, db_->prepare("INSERT INTO approval_requests (command, argv, description, "
                                  "digest, rule, role, required, requested_by, created_at, "
                                  "expires_at, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, "
                                  "?10, 'pending')"));
  st.bind(1, r.command).bind(2, ByteView(argv)).bind(3, r.description);
  st.bind(4, ByteView(r.digest)).bind(5, r.rule).bind(6, r.role);
  st.bind(7, std::int64_t{r.required}).bind(8, r.requested_by).bind(9, r.created_at);
  st.bind(10, r.expires_at);
  GS_TRY(st.run());
  const std::int64_t id = db_->last_insert_rowid();
  GS_TRY(insert_signature(*db_, id, first));
  return id;
}

Result<std::optional<Request>> Store::find(std::int64_t id) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kColumns) + "WHERE r.id = ?1"));
  st.bind(1, id);
  GS_ASSIGN(auto step, st.step());
  if (step != db::Step::row) return std::optional<Request>{};
  GS_ASSIGN(auto r, read_request(st));
  return std::optional<Request>(std::move(r));
}

Result<std::vector<Request>> Store::list(bool all, std::int64_t now, std::int64_t limit) {
  GS_ASSIGN(auto st, db_->prepare(std::string(kColumns) +
                                  (all ? "ORDER BY r.id DESC LIMIT ?2"
                                       : "WHERE r.state = 'running' OR (r.state = 'pending' AND "
                                         "r.expires_at > ?1) ORDER BY r.id DESC LIMIT ?2")));
  if (!all) st.bind(1, now);
  st.bind(2, limit);
  std::vector<Request> out;
  while (true) {
    GS_ASSIGN(auto step, st.step());
    if (step != db::Step::row) break;
    GS_ASSIGN(auto r, read_request(st));
    out.push_back(std::move(r));
  }
  return out;
}

Result<std::vector<Signature>> Store::signatures(std::int64_t id) {
  GS_ASSIGN(auto st, db_->prepare("SELECT operator, role, signed_at, nonce, time, signature FROM "
                                  "approval_signatures WHERE request = ?1 ORDER BY signed_at, "
                                  "operator"));
  st.bind(1, id);
  std::vector<Signature> out;
  while (true) {
    GS_ASSIGN(auto step, st.step());
    if (step != db::Step::row) break;
    out.push_back({st.text(0), st.text(1), st.int64(2), st.blob(3), st.int64(4), st.blob(5)});
  }
  return out;
}

Result<std::uint32_t> Store::add_signature(std::int64_t id, const Signature& s, std::int64_t now) {
  GS_ASSIGN(auto r, find(id));
  if (!r) return Error(Errc::not_found, "no approval request " + std::to_string(id));
  if (r->state != State::pending) {
    return Error(Errc::conflict, "approval request " + std::to_string(id) + " is " +
                                     to_string(r->state) + ", no longer open");
  }
  if (r->expired(now)) {
    return Error(Errc::conflict, "approval request " + std::to_string(id) + " expired");
  }
  if (s.role != r->role) {
    return Error(Errc::invalid_argument, "approval request " + std::to_string(id) +
                                             " needs signatures of " + r->role + "s; " +
                                             s.operator_name + " is " + s.role);
  }
  GS_TRY(insert_signature(*db_, id, s));
  return r->signatures + 1;
}

Status Store::claim(std::int64_t id, std::string_view executed_by, std::int64_t now) {
  GS_ASSIGN(auto st, db_->prepare("UPDATE approval_requests SET state = 'running', executed_by "
                                  "= ?2, started_at = ?3 WHERE id = ?1 AND state = 'pending' AND "
                                  "expires_at > ?3 AND (SELECT count(*) FROM approval_signatures "
                                  "s WHERE s.request = ?1) >= required"));
  st.bind(1, id).bind(2, executed_by).bind(3, now);
  GS_TRY(st.run());
  if (db_->changes() != 1) {
    return Error(Errc::conflict, "approval request " + std::to_string(id) +
                                     " is not ready to run (already run, expired or short of "
                                     "signatures)");
  }
  return {};
}

Status Store::finish(std::int64_t id, int exit_code, std::int64_t now) {
  GS_ASSIGN(auto st, db_->prepare("UPDATE approval_requests SET state = ?2, finished_at = ?3, "
                                  "exit_code = ?4 WHERE id = ?1 AND state = 'running'"));
  st.bind(1, id).bind(2, exit_code == 0 ? "done" : "failed").bind(3, now);
  st.bind(4, std::int64_t{exit_code});
  GS_TRY(st.run());
  if (db_->changes() != 1) {
    return Error(Errc::conflict, "approval request " + std::to_string(id) + " is not running");
  }
  return {};
}

Status Store::cancel(std::int64_t id, std::string_view by, std::int64_t now) {
  GS_ASSIGN(auto st, db_->prepare("UPDATE approval_requests SET state = 'cancelled', "
                                  "executed_by = ?2, finished_at = ?3 WHERE id = ?1 AND state = "
                                  "'pending'"));
  st.bind(1, id).bind(2, by).bind(3, now);
  GS_TRY(st.run());
  if (db_->changes() != 1) {
    return Error(Errc::conflict,
                 "approval request " + std::to_string(id) + " is not pending (nothing to cancel)");
  }
  return {};
}

}  // namespace gs::approvals
