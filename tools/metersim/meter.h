// One simulated meter: compact state and the meter side of DESIGN §3 (verify MT-2040, open
// EAX' mode 2, C12.19 reads, ST-7 connect/disconnect, MT-2041..2044), without any I/O.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "c1222/message.h"
#include "c1222/profile.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"
#include "src/host_ecdsa.h"

namespace gs::metersim {

inline constexpr std::size_t kMaxTitle = 64;        // absolute OID content (c1222::kMaxOidLength)
inline constexpr std::size_t kSerialSize = 16;      // ST-1 MFG_SERIAL_NUMBER, also the meter id
inline constexpr std::size_t kKeySlots = 4;         // key ids 0..3 (store::kSlotsPerMeter)
inline constexpr std::size_t kTrustSlots = 2;       // command keys a meter trusts (DESIGN §4)
inline constexpr std::size_t kReplayEntries = 16;   // accepted ids remembered per meter
// Distinct command keys in one fleet: the provisioned ones plus those MT-2044 statements install
// at run time (identical points share an entry; a replacement beyond this is refused `onp`).
inline constexpr std::size_t kMaxTrustedKeys = 64;
static_assert(kTrustSlots == c1222::kTrustSlotCount, "MT-2044 trust slots are the meter's");
// Longest validity window a meter accepts (the policy's maximum, 30 days).
inline constexpr std::uint32_t kMaxWindow = 2592000;

// Tables and procedures the simulated meter implements.
inline constexpr std::uint16_t kTableIdentity = 1;       // ST-1
inline constexpr std::uint16_t kTableProcResponse = 8;   // ST-8
inline constexpr std::uint16_t kTableCurrentRegs = 23;   // ST-23
inline constexpr std::uint16_t kTableLoadProfile = 64;   // ST-64
inline constexpr std::uint16_t kProcRemoteConnect = 26;  // SP-26 (conf/policy.toml)
// SP-26 parameters: action(1) [reserved(1)]; action 1 = connect, 2 = disconnect (the
// PROFILE-VECTORS example 1 sends `02 00`).
inline constexpr std::uint8_t kActionConnect = 1;
inline constexpr std::uint8_t kActionDisconnect = 2;
// ED class the meter puts in its responses (PROFILE-VECTORS example 2).
inline constexpr c1222::EdClass kEdClass = {'G', 'S', 'I', 'M'};

// Table sizes (layouts in meter.cc, integers little-endian as C12.19's default data order).
inline constexpr std::size_t kIdentitySize = 32;
inline constexpr std::size_t kProcResponseSize = 5;
inline constexpr std::size_t kCurrentRegsSize = 26;
inline constexpr std::size_t kLoadProfileIntervals = 96;  // 24 h of 15-minute intervals
inline constexpr std::size_t kLoadProfileSize = 6 + 2 * kLoadProfileIntervals;

struct KeySlotState {
  std::array<std::uint8_t, 16> key{};  // AES-128, in clear: holding it is the meter's job
  std::uint32_t version = 0;
  std::uint8_t installed = 0;  // 0 or 1
  friend bool operator==(const KeySlotState&, const KeySlotState&) = default;
};

// A command key a meter trusts: MT-2040 signer key id -> index into the fleet's key table.
struct TrustEntry {
  std::uint8_t present = 0;  // 0 or 1
  std::uint8_t key_id = 0;
  std::uint16_t key_index = 0;
  friend bool operator==(const TrustEntry&, const TrustEntry&) = default;
};

// An invocation id accepted while its command's window [.., not_after] is open.
// not_after == 0 marks a free entry.
struct ReplayEntry {
  std::uint64_t id = 0;
  std::uint32_t not_after = 0;
  friend bool operator==(const ReplayEntry&, const ReplayEntry&) = default;
};

// Everything a meter keeps (about 430 bytes; the state file stores exactly these fields).
struct MeterRecord {
  std::uint8_t title_len = 0;
  std::array<std::uint8_t, kMaxTitle> title{};               // absolute OID content, zero padded
  std::array<char, kSerialSize> serial{};                    // printable ASCII, zero padded
  std::array<std::uint8_t, kEcScalarSize> private_scalar{};  // own P-256 key
  std::array<KeySlotState, kKeySlots> slots{};
  std::uint8_t active_slot = 0;
  std::array<TrustEntry, kTrustSlots> trust{};
  // Sequence of the last MT-2044 statement accepted (0: none): a statement is accepted only
  // above it, so a replayed or older one cannot bring a displaced key back.
  std::uint32_t replacement_seq = 0;
  std::array<ReplayEntry, kReplayEntries> replay{};
  // Every evicted (still open) replay entry had not_after <= floor: a command whose not_after
  // is <= floor and whose id is not remembered is refused `bsy` (it might be an evicted one;
  // re-signed later, its window ends later and it is accepted).
  std::uint32_t replay_floor = 0;
  std::uint32_t out_counter = 0;  // the meter's own invocation-id counter (ids::id_for_counter)
  std::uint8_t connected = 1;     // service relay: 1 connected, 0 disconnected
  // Load model: mean power and phase of a daily sine; energy (mWh) at energy_since.
  std::uint16_t base_power_w = 0;
  std::uint16_t phase_s = 0;  // 0..43199, doubled: seconds into the day of the peak / 2
  std::uint64_t energy_mwh = 0;
  std::uint32_t energy_since = 0;
  // Last procedure (ST-8): number, sequence, result code.
  std::uint16_t last_proc = 0;
  std::uint8_t last_seq = 0;
  std::uint8_t last_result = 0;

  ByteView title_view() const { return ByteView(title.data(), title_len); }
  std::string serial_text() const;
  friend bool operator==(const MeterRecord&, const MeterRecord&) = default;
};

// The command public keys of a fleet (gs-cmd-1, gs-cmd-2, and those MT-2044 installs while
// serving), parsed once and shared by every meter and relay thread. An entry never changes or
// moves once published, so readers take no lock: size() is an acquire load, and key(i) for
// i < size() stays valid for the table's life. add() serializes the writers.
class TrustTable {
 public:
  TrustTable() = default;
  TrustTable(const TrustTable&) = delete;
  TrustTable& operator=(const TrustTable&) = delete;

  // Adds a 65-byte uncompressed point (refused unless on the curve); returns its index.
  // The same point twice returns the first index; a new point beyond kMaxTrustedKeys is
  // refused (Errc::too_large).
  Result<std::uint16_t> add(ByteView point65);
  Result<std::uint16_t> add(HostEcKey key);
  std::size_t size() const noexcept { return size_.load(std::memory_order_acquire); }
  const HostEcKey& key(std::size_t i) const {
    GS_CHECK(i < size());
    return *keys_[i];
  }

 private:
  std::mutex add_mutex_;
  std::array<std::unique_ptr<const HostEcKey>, kMaxTrustedKeys> keys_;
  std::atomic<std::size_t> size_{0};
};

// What the meter did with a message, for logs and tests.
enum class Outcome : std::uint8_t {
  executed,  // verified and executed (some services may have answered errors)
  refused,   // refused before anything executed (one error code answered)
};

struct MeterReply {
  Bytes wire;  // the response message (always present)
  Outcome outcome = Outcome::refused;
  std::uint8_t code = 0;  // 0 when executed, else the C12.22 error code answered
  std::string reason;     // why it was refused (never key material)
};

// Driving one meter. Not thread-safe: the caller serializes access to a record.
class Meter {
 public:
  // `revocation`: the fleet's gs-revocation public key (MT-2044), or null when not provisioned.
  Meter(MeterRecord& record, TrustTable& trust, const HostEcKey* revocation = nullptr)
      : rec_(record), trust_(trust), revocation_(revocation) {}

  // Handles one decoded command addressed to this meter (`wire` holds the bytes `request`
  // views into) at UTC time `now`. Always produces a response: secured (mode 2) under the
  // active key when the request can be answered so, else a mode-0 error.
  MeterReply handle(const c1222::Message& request, std::uint32_t now);

 private:
  MeterRecord& rec_;
  TrustTable& trust_;
  const HostEcKey* revocation_;
};

// Table data of the simulated meter at time `now` (exposed for tests).
Bytes identity_table(const MeterRecord& r);
Bytes current_registers(const MeterRecord& r, std::uint32_t now);
Bytes load_profile(const MeterRecord& r, std::uint32_t now);
// Energy (mWh) registered at `now`.
std::uint64_t energy_at(const MeterRecord& r, std::uint32_t now);
// Changes the relay state, settling the energy register first.
void set_relay(MeterRecord& r, bool connected, std::uint32_t now);

// The meter's key pair (the public point is computed from the scalar).
Result<HostEcKey> meter_key(const MeterRecord& r);
// True when the 32-byte big-endian scalar is in [1, n-1] of P-256.
bool valid_scalar(ByteView scalar32);

// The slot-`slot` key derived from `peer` (an ephemeral or the gs-provision public key) with
// the meter's private key, DESIGN §3.2.
Result<Block> derive_slot_key(const MeterRecord& r, const HostEcKey& peer, std::uint8_t slot,
                              std::uint32_t key_version);

}  // namespace gs::metersim
