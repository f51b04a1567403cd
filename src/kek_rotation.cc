// KEK generations and the batched re-wrap of key slots: see kek_rotation.h.
#include "src/kek_rotation.h"

#include <chrono>
#include <ctime>
#include <thread>

namespace gs::kek {

namespace {

std::int64_t now_seconds() { return static_cast<std::int64_t>(std::time(nullptr)); }

// The only statements that read a generation's state as text.
Result<std::optional<GenState>> state_of(db::Db& db, std::uint32_t gen) {
  GS_ASSIGN(auto st, db.prepare("SELECT state FROM kek_generations WHERE gen = ?1"));
  st.bind(1, std::int64_t{gen});
  GS_ASSIGN(db::Step s, st.step());
  if (s != db::Step::row) return std::optional<GenState>{};
  auto v = gen_state_from(st.text(0));
  if (!v) return Error(Errc::storage_failure, "KEK generation " + std::to_string(gen) +
                                                  " has an unknown state");
  return v;
}

Result<std::int64_t> slots_under(db::Db& db, std::uint32_t gen) {
  GS_ASSIGN(auto st, db.prepare("SELECT count(*) FROM key_slots WHERE kek = ?1 AND wrapped IS "
                                "NOT NULL"));
  st.bind(1, std::int64_t{gen});
  GS_ASSIGN(db::Step s, st.step());
  (void)s;
  return st.int64(0);
}

// Destroys a session object when it goes out of scope (the unwrapped meter key of one row).
struct SessionObject {
  hsm::Session& s;
  hsm::ObjectHandle h = hsm::kNoObject;
  SessionObject(hsm::Session& session, hsm::ObjectHandle handle) : s(session), h(handle) {}
  SessionObject(const SessionObject&) = delete;
  SessionObject& operator=(const SessionObject&) = delete;
  ~SessionObject() {
    if (h != hsm::kNoObject) hsm::destroy_object(s, h).ok();
  }
};

}  // namespace

const char* to_string(GenState s) noexcept {
  switch (s) {
    case GenState::creating: return "creating";
    case GenState::current: return "current";
    case GenState::draining: return "draining";
    case GenState::retired: return "retired";
    case GenState::destroyed: return "destroyed";
  }
  return "?";
}

std::optional<GenState> gen_state_from(std::string_view s) noexcept {
  for (auto v : {GenState::creating, GenState::current, GenState::draining, GenState::retired,
                 GenState::destroyed}) {
    if (s == to_string(v)) return v;
  }
  return std::nullopt;
}

std::string label_for(std::uint32_t gen) {
  return gen <= 1 ? std::string("gs-kek") : "gs-kek-" + std::to_string(gen);
}

Result<std::vector<Generation>> generations(db::Db& db) {
  GS_ASSIGN(auto st, db.prepare(
                         "SELECT g.gen, g.label, g.state, g.created_by, g.created_at, "
                         "g.changed_at, (SELECT count(*) FROM key_slots k WHERE k.kek = g.gen "
                         "AND k.wrapped IS NOT NULL) FROM kek_generations g ORDER BY g.gen"));
  std::vector<Generation> out;
  while (true) {
    GS_ASSIGN(db::Step s, st.step());
    if (s == db::Step::done) break;
    Generation g;
    g.gen = static_cast<std::uint32_t>(st.int64(0));
    g.label = st.text(1);
    auto state = gen_state_from(st.text(2));
    if (!state) {
      return Error(Errc::storage_failure,
                   "KEK generation " + std::to_string(g.gen) + " has an unknown state");
    }
    g.state = *state;
    g.created_by = st.text(3);
    g.created_at = st.int64(4);
    g.changed_at = st.int64(5);
    g.slots = st.int64(6);
    out.push_back(std::move(g));
  }
  return out;
}

Result<std::uint32_t> current_generation(db::Db& db) {
  GS_ASSIGN(auto st, db.prepare("SELECT gen FROM kek_generations WHERE state = 'current'"));
  GS_ASSIGN(db::Step s, st.step());
  if (s != db::Step::row) {
    return Error(Errc::storage_failure, "no current KEK generation in the store");
  }
  return static_cast<std::uint32_t>(st.int64(0));
}

Result<std::optional<std::uint32_t>> creating_generation(db::Db& db) {
  GS_ASSIGN(auto st, db.prepare("SELECT gen FROM kek_generations WHERE state = 'creating'"));
  GS_ASSIGN(db::Step s, st.step());
  if (s != db::Step::row) return std::optional<std::uint32_t>{};
  return std::optional<std::uint32_t>{static_cast<std::uint32_t>(st.int64(0))};
}

Result<std::uint32_t> record_new_generation(db::Db& db, std::string_view actor) {
  GS_ASSIGN(auto creating, creating_generation(db));
  if (creating) {
    return Error(Errc::conflict, "KEK generation " + std::to_string(*creating) +
                                     " is being created already");
  }
  GS_ASSIGN(auto mx, db.prepare("SELECT max(gen) FROM kek_generations"));
  GS_ASSIGN(db::Step s, mx.step());
  (void)s;
  const std::int64_t top = mx.is_null(0) ? 0 : mx.int64(0);
  if (top >= static_cast<std::int64_t>(kMaxGeneration)) {
    return Error(Errc::invalid_argument, "no KEK generation number left");
  }
  const auto gen = static_cast<std::uint32_t>(top + 1);
  GS_ASSIGN(auto ins, db.prepare("INSERT INTO kek_generations (gen, label, state, created_by, "
                                 "created_at, changed_at) VALUES (?1, ?2, 'creating', ?3, ?4, "
                                 "?4)"));
  ins.bind(1, std::int64_t{gen}).bind(2, label_for(gen)).bind(3, actor).bind(4, now_seconds());
  GS_TRY(ins.run());
  return gen;
}

Status activate(db::Db& db, std::uint32_t gen) {
  GS_ASSIGN(auto state, state_of(db, gen));
  if (state != GenState::creating) {
    return {Errc::conflict, "KEK generation " + std::to_string(gen) + " is not being created"};
  }
  const std::int64_t now = now_seconds();
  GS_ASSIGN(auto old, db.prepare("UPDATE kek_generations SET state = 'draining', changed_at = ?1 "
                                 "WHERE state = 'current'"));
  old.bind(1, now);
  GS_TRY(old.run());
  GS_ASSIGN(auto cur, db.prepare("UPDATE kek_generations SET state = 'current', changed_at = ?2 "
                                 "WHERE gen = ?1"));
  cur.bind(1, std::int64_t{gen}).bind(2, now);
  return cur.run();
}

Result<std::int64_t> slots_to_rewrap(db::Db& db) {
  GS_ASSIGN(const std::uint32_t cur, current_generation(db));
  GS_ASSIGN(auto st, db.prepare("SELECT count(*) FROM key_slots WHERE kek < ?1 AND wrapped IS "
                                "NOT NULL"));
  st.bind(1, std::int64_t{cur});
  GS_ASSIGN(db::Step s, st.step());
  (void)s;
  return st.int64(0);
}

Result<std::vector<std::uint32_t>> retire_drained(db::Db& db) {
  GS_ASSIGN(const std::int64_t left, slots_to_rewrap(db));
  if (left > 0) {
    return Error(Errc::busy, std::to_string(left) + " key slots still wrapped under an older KEK");
  }
  GS_ASSIGN(const std::uint32_t cur, current_generation(db));
  // Rows without a key (destroyed slots) say the current generation too, so that no row at all
  // names a generation that may be destroyed later.
  GS_ASSIGN(auto empty, db.prepare("UPDATE key_slots SET kek = ?1 WHERE kek < ?1 AND wrapped IS "
                                   "NULL"));
  empty.bind(1, std::int64_t{cur});
  GS_TRY(empty.run());
  GS_ASSIGN(auto sel, db.prepare("SELECT gen FROM kek_generations WHERE state = 'draining' "
                                 "ORDER BY gen"));
  std::vector<std::uint32_t> out;
  while (true) {
    GS_ASSIGN(db::Step s, sel.step());
    if (s == db::Step::done) break;
    out.push_back(static_cast<std::uint32_t>(sel.int64(0)));
  }
  GS_ASSIGN(auto up, db.prepare("UPDATE kek_generations SET state = 'retired', changed_at = ?1 "
                                "WHERE state = 'draining'"));
  up.bind(1, now_seconds());
  GS_TRY(up.run());
  return out;
}

Result<bool> mark_destroyed(db::Db& db, std::uint32_t gen) {
  GS_ASSIGN(auto state, state_of(db, gen));
  if (!state) return Error(Errc::not_found, "no KEK generation " + std::to_string(gen));
  if (*state == GenState::destroyed) return true;
  if (*state != GenState::retired) {
    return Error(Errc::conflict, "KEK generation " + std::to_string(gen) + " is " +
                                     to_string(*state) +
                                     "; only a retired generation (no key slot wrapped under it, "
                                     "after `gridseal hsm rotate-kek`) can be destroyed");
  }
  GS_ASSIGN(const std::int64_t n, slots_under(db, gen));
  if (n > 0) {  // the trigger keeps this from happening; checked all the same
    return Error(Errc::conflict, std::to_string(n) + " key slots are still wrapped under KEK "
                                                     "generation " + std::to_string(gen));
  }
  GS_ASSIGN(auto up, db.prepare("UPDATE kek_generations SET state = 'destroyed', changed_at = ?2 "
                                "WHERE gen = ?1"));
  up.bind(1, std::int64_t{gen}).bind(2, now_seconds());
  GS_TRY(up.run());
  return false;
}

Status check_kek_attributes(const hsm::ObjectAttributes& a) {
  struct Want {
    bool have;
    bool want;
    const char* name;
  };
  const Want wants[] = {
      {a.object_class == hsm::ObjectClass::secret_key, true, "secret key"},
      {a.token, true, "CKA_TOKEN"},
      {a.private_object, true, "CKA_PRIVATE"},
      {a.modifiable, false, "CKA_MODIFIABLE"},
      {a.sensitive, true, "CKA_SENSITIVE"},
      {a.extractable, false, "CKA_EXTRACTABLE"},
      {a.trusted, true, "CKA_TRUSTED"},
      {a.wrap, true, "CKA_WRAP"},
      {a.unwrap, true, "CKA_UNWRAP"},
      {a.encrypt, false, "CKA_ENCRYPT"},
      {a.decrypt, false, "CKA_DECRYPT"},
      {a.sign, false, "CKA_SIGN"},
      {a.verify, false, "CKA_VERIFY"},
      {a.derive, false, "CKA_DERIVE"},
      {a.value_len == 32, true, "AES-256 (CKA_VALUE_LEN 32)"},
  };
  for (const auto& w : wants) {
    if (w.have != w.want) {
      return {Errc::bad_value, std::string(w.name) + (w.want ? " is not set" : " is set") +
                                   " on '" + a.label + "', which is not a KEK gridseal made"};
    }
  }
  return {};
}

Result<hsm::ObjectHandle> KekHandles::get(hsm::Session& s, std::uint32_t gen) {
  for (const auto& [g, h] : handles_) {
    if (g == gen) return h;
  }
  const std::string label = label_for(gen);
  auto h = hsm::find_object(s, hsm::ObjectClass::secret_key, label);
  if (!h.ok()) {
    return Error(h.error().code, "KEK generation " + std::to_string(gen) + " (" + label +
                                     "): " + h.error().message());
  }
  handles_.emplace_back(gen, *h);
  return *h;
}

Result<RewrapProgress> rewrap_all(hsm::Session& s, db::Db& db, KekHandles& keks,
                                  const RewrapOptions& opt) {
  if (opt.batch == 0 || opt.batch > kMaxBatch) {
    return Error(Errc::invalid_argument, "batch must be 1.." + std::to_string(kMaxBatch));
  }
  if (opt.rate < 0) return Error(Errc::invalid_argument, "rate must not be negative");
  RewrapProgress prog;
  GS_ASSIGN(prog.to, current_generation(db));
  GS_ASSIGN(const hsm::ObjectHandle new_kek, keks.get(s, prog.to));
  GS_ASSIGN(auto sel, db.prepare("SELECT meter, slot, wrapped, kek FROM key_slots WHERE kek < ?1 "
                                 "AND wrapped IS NOT NULL ORDER BY kek, meter, slot LIMIT ?2"));
  // changed_at stays: the key and its state are the same (retire_standby ages standby keys by
  // changed_at); only its stored form changes.
  GS_ASSIGN(auto up, db.prepare("UPDATE key_slots SET wrapped = ?3, kek = ?4 WHERE meter = ?1 "
                                "AND slot = ?2 AND kek = ?5 AND wrapped = ?6"));
  using Clock = std::chrono::steady_clock;
  const auto started = Clock::now();
  while (true) {
    GS_ASSIGN(auto tx, db::Transaction::begin(db));
    // The generation may have moved on (another rotation finished in between): never write a
    // row under anything but the current one.
    GS_ASSIGN(const std::uint32_t cur, current_generation(db));
    if (cur != prog.to) {
      return Error(Errc::conflict, "the current KEK generation changed during the re-wrap");
    }
    struct Row {
      std::int64_t meter;
      std::int64_t slot;
      Bytes wrapped;
      std::uint32_t kek;
    };
    std::vector<Row> rows;
    sel.bind(1, std::int64_t{cur}).bind(2, static_cast<std::int64_t>(opt.batch));
    while (true) {
      auto step = sel.step();
      if (!step.ok()) {
        sel.reset();
        return std::move(step).error();
      }
      if (*step == db::Step::done) break;
      rows.push_back({sel.int64(0), sel.int64(1), sel.blob(2),
                      static_cast<std::uint32_t>(sel.int64(3))});
    }
    sel.reset();
    if (rows.empty()) break;  // rolled back: nothing written
    for (const Row& r : rows) {
      const std::string what = "meter row " + std::to_string(r.meter) + " slot " +
                               std::to_string(r.slot) + " (KEK generation " +
                               std::to_string(r.kek) + ")";
      GS_ASSIGN(const hsm::ObjectHandle old_kek, keks.get(s, r.kek));
      auto h = hsm::unwrap_meter_key(s, old_kek, r.wrapped);
      if (!h.ok()) return Error(h.error().code, what + ": " + h.error().message());
      SessionObject key{s, *h};
      auto w = hsm::wrap_key(s, new_kek, key.h);
      if (!w.ok()) return Error(w.error().code, what + ": " + w.error().message());
      up.bind(1, r.meter).bind(2, r.slot).bind(3, ByteView(*w)).bind(4, std::int64_t{cur});
      up.bind(5, std::int64_t{r.kek}).bind(6, ByteView(r.wrapped));
      GS_TRY(up.run());
      if (db.changes() == 1) ++prog.rewrapped;
    }
    GS_TRY(tx.commit());
    ++prog.batches;
    if (opt.on_batch) {
      auto left = slots_to_rewrap(db);
      prog.remaining = left.ok() ? *left : -1;
      opt.on_batch(prog);
    }
    if (opt.rate > 0) {
      // Paced so that live traffic keeps most of the HSM and the database's write lock.
      const auto due = started + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(
                                         static_cast<double>(prog.rewrapped) / opt.rate));
      std::this_thread::sleep_until(due);
    }
  }
  GS_ASSIGN(prog.remaining, slots_to_rewrap(db));
  return prog;
}

}  // namespace gs::kek
