// KEK rotation: the generations of the key-encryption key (gs-kek, gs-kek-2, ...), which one
// wraps each key slot, and the crash-safe re-wrap of every slot under a new generation inside
// the HSM (`gridseal hsm rotate-kek`, README "Key hierarchy").
//
// A generation's life, each step one committed state (table kek_generations):
//   creating  recorded before the HSM object is made; a crashed run adopts the object it finds
//             under that label after checking its attributes, or creates it.
//   current   exactly one: every new key is wrapped under it.
//   draining  an older generation that still wraps some slots; rotation re-wraps them in
//             batches, each batch one transaction.
//   retired   no slot references it; the HSM object is still there (old backups of the database
//             stay readable, daemons holding a cached pre-rotation row keep working). A slot
//             written under it again (a writer that read the generation before the switch)
//             brings it back to draining (a trigger), and a re-run re-wraps that slot.
//   destroyed the HSM object is gone (`gridseal hsm destroy-kek`, a separate step); a trigger
//             refuses any slot written under it.
// Slot rows carry the generation (key_slots.kek); readers unwrap with that generation's KEK, so
// a slot is readable before, during and after a rotation, and after a kill -9 at any point.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gridseal/result.h"
#include "hsm/ops.h"
#include "hsm/session.h"
#include "src/sqlite.h"

namespace gs::kek {

// Generations are numbered from 1; gs-kek-<n> labels stay well inside check_label's bound.
inline constexpr std::uint32_t kMaxGeneration = 1'000'000;
inline constexpr std::size_t kMaxBatch = 10'000;

enum class GenState : std::uint8_t { creating, current, draining, retired, destroyed };
const char* to_string(GenState s) noexcept;
std::optional<GenState> gen_state_from(std::string_view s) noexcept;

// 1 -> "gs-kek" (kLabelKek, the KEK of `hsm init`), n -> "gs-kek-<n>".
std::string label_for(std::uint32_t gen);

struct Generation {
  std::uint32_t gen = 0;
  std::string label;
  GenState state = GenState::current;
  std::string created_by;
  std::int64_t created_at = 0;
  std::int64_t changed_at = 0;
  std::int64_t slots = 0;  // key slots holding a key wrapped under it
};

// Every generation, oldest first, with its slot count.
Result<std::vector<Generation>> generations(db::Db& db);
// The generation new keys are wrapped under.
Result<std::uint32_t> current_generation(db::Db& db);

// ---- steps of a rotation (each inside the caller's transaction) -----------------------------

// Records generation max+1 as `creating` and returns it. Errc::conflict when one is being
// created already (resume it instead).
Result<std::uint32_t> record_new_generation(db::Db& db, std::string_view actor);
// The generation being created, if any.
Result<std::optional<std::uint32_t>> creating_generation(db::Db& db);
// creating -> current and the former current -> draining.
Status activate(db::Db& db, std::uint32_t gen);
// How many slots still hold a key wrapped under an older generation than the current one.
Result<std::int64_t> slots_to_rewrap(db::Db& db);
// When no slot holds a key under a generation below the current one: every draining generation
// becomes retired (returned; rows without a key move to the current generation too).
// Errc::busy when some slot still does (a writer raced the last batch: re-wrap again).
Result<std::vector<std::uint32_t>> retire_drained(db::Db& db);
// retired -> destroyed, re-checking that no slot references it. Errc::conflict otherwise
// (current, draining or creating), Errc::not_found for an unknown generation; true when it was
// destroyed already (only the HSM object may remain to be removed).
Result<bool> mark_destroyed(db::Db& db, std::uint32_t gen);

// ---- the HSM side ---------------------------------------------------------------------------

// The attributes a KEK made by hsm::create_trusted_kek has; checked before a resumed rotation
// adopts an object found under the new label (Errc::bad_value naming the first difference).
Status check_kek_attributes(const hsm::ObjectAttributes& a);

// Token handles of the KEK generations for one session, found by label on first use (a
// generation created by another process since is found then). Forget them when the session is
// lost or closed.
class KekHandles {
 public:
  Result<hsm::ObjectHandle> get(hsm::Session& s, std::uint32_t gen);
  void clear() noexcept { handles_.clear(); }

 private:
  std::vector<std::pair<std::uint32_t, hsm::ObjectHandle>> handles_;
};

struct RewrapProgress {
  std::uint32_t to = 0;            // the current generation
  std::size_t rewrapped = 0;       // slots re-wrapped by this call
  std::size_t batches = 0;
  std::int64_t remaining = 0;      // after the last batch
};

struct RewrapOptions {
  std::size_t batch = 256;  // slots per transaction, 1..kMaxBatch
  double rate = 0;          // slots per second at most (0: as fast as the HSM goes)
  std::function<void(const RewrapProgress&)> on_batch;
};

// Re-wraps every slot under an older generation with the current KEK, batch by batch. Each
// batch is one BEGIN IMMEDIATE transaction: it reads the slots, and for each one unwraps the key
// with its row's generation into a meter-key session object (the KEK's unwrap template), wraps it
// under the current KEK and destroys the session object, then updates the row (wrapped + kek,
// only if the row is unchanged; changed_at and the key state are left alone: the key is the
// same) and commits. No key is ever in clear outside the HSM. A kill -9 loses at most the
// uncommitted batch, whose rows are still wrapped under their old (live) generation.
Result<RewrapProgress> rewrap_all(hsm::Session& s, db::Db& db, KekHandles& keks,
                                  const RewrapOptions& opt);

}  // namespace gs::kek
