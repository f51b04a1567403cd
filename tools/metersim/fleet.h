// A fleet of simulated meters: creation (export), lookup by AP title, locked access for the
// relay's threads, and the versioned, bounded state file.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <unordered_map>
#include <vector>

#include "tools/metersim/meter.h"

namespace gs::metersim {

// Upper bound on a fleet (and so on a state file: about 860 MB).
inline constexpr std::size_t kMaxMeters = 2'000'000;

// State file, format version 2. Integers big-endian.
//   header   magic "GSMETSIM" (8) | format version = 2 (2) | record size = 431 (2) |
//            meter count 1..kMaxMeters (4) | command key count 0..64 (1) |
//            gs-revocation key present 0/1 (1) | reserved = 0 (2)
//   records  meter count x 431 bytes:
//            title length 1..64 (1) | title, absolute OID content, zero padded (64) |
//            serial = meter id, printable ASCII, zero padded (16) | private scalar (32) |
//            4 key slots x [installed 0/1 (1) | key version (4) | AES-128 key (16)] |
//            active slot (1, an installed one) |
//            2 trust entries x [present 0/1 (1) | signer key id (1) | key index (2)] |
//            last accepted MT-2044 sequence (4) |
//            16 replay entries x [invocation id (8) | not_after (4), 0 = free] |
//            replay floor (4) | own invocation counter (4) | relay connected 0/1 (1) |
//            mean power W (2) | phase (2, < 43200) | energy mWh (8) | energy time (4) |
//            last procedure (2) | its sequence (1) | its result (1)
//   keys     command key count x 65-byte uncompressed P-256 points (provisioned and installed
//            by MT-2044; trust entries index them). After the records: a save while serving
//            copies every record first and then the table, which only grows, so every index a
//            copied record holds is in the file.
//   revocation  the gs-revocation public key (65), when present
//   trailer  SHA-256 of every byte before it (32)
// Version 1 (still read, never written): the same header with the byte after the key count
// reserved = 0, the keys before the records, 427-byte records without the MT-2044 sequence. It
// loads as a fleet without a gs-revocation key whose meters accepted no statement yet.
// Loading checks the exact file size, the digest, every length, count, flag and range, and
// refuses duplicate titles: a truncated or corrupt file is refused with the reason.
inline constexpr std::uint16_t kStateVersion = 2;
inline constexpr std::size_t kRecordSize = 431;
inline constexpr std::size_t kRecordSizeV1 = 427;
inline constexpr std::size_t kHeaderSize = 20;

enum class KeyMode : std::uint8_t { plain, ecdh };

struct ExportOptions {
  std::size_t meters = 0;           // 1..kMaxMeters
  std::string title_prefix = ".7";  // meter n is "<prefix>.<n>"
  std::uint64_t first = 1;          // n of the first meter
  std::string id_prefix = "SIM";    // meter id "<prefix><n, 8 digits>", at most 16 chars
  KeyMode keys = KeyMode::plain;
  std::optional<EcPoint> provision_key;  // gs-provision public key, required for ecdh
  std::optional<EcPoint> trust_cmd1;     // gs-cmd-1 (signer key id 1)
  std::optional<EcPoint> trust_cmd2;     // gs-cmd-2 (signer key id 2)
  std::optional<EcPoint> trust_revocation;  // gs-revocation: signs MT-2044 replacements
  std::optional<std::uint64_t> seed;     // same seed, same fleet; none: random
  std::uint32_t now = 0;                 // registers start counting here
};

class Fleet {
 public:
  // Creates the meters and writes the manufacturer file (meter_id,ap_title,ecc_public_key,
  // key_slot,key) that `gridseal meters import` reads to `csv` when given.
  static Result<std::unique_ptr<Fleet>> generate(const ExportOptions& opt, std::ostream* csv);
  // Reads and validates a state file.
  static Result<std::unique_ptr<Fleet>> load(const std::string& path);
  static Result<std::unique_ptr<Fleet>> parse(ByteView file);
  ~Fleet();  // wipes the meters' keys
  Fleet(const Fleet&) = delete;
  Fleet& operator=(const Fleet&) = delete;

  // The state file bytes (each record copied under its lock).
  Bytes serialize() const;
  // Writes the state file atomically (temporary file, fsync, rename, fsync of the directory).
  Status save(const std::string& path) const;

  std::size_t size() const noexcept { return meters_.size(); }
  // Index of the meter with this absolute title.
  std::optional<std::size_t> find(ByteView absolute_title) const;
  // Handles a command for meter `index` under that meter's lock.
  MeterReply handle(std::size_t index, const c1222::Message& request, std::uint32_t now);

  // Direct access (tests, tools): the caller must not race with handle().
  MeterRecord& record(std::size_t index) { return meters_[index]; }
  const MeterRecord& record(std::size_t index) const { return meters_[index]; }
  const TrustTable& trust() const noexcept { return trust_; }
  // The gs-revocation public key, null when the fleet has none (MT-2044 answered `sns`).
  const HostEcKey* revocation() const noexcept { return revocation_ ? &*revocation_ : nullptr; }

 private:
  static constexpr std::size_t kStripes = 64;
  Fleet() = default;
  Status build_index();
  std::mutex& lock_of(std::size_t index) const { return stripes_[index % kStripes]; }

  TrustTable trust_;
  std::optional<HostEcKey> revocation_;  // set before serving, never changed after
  std::vector<MeterRecord> meters_;
  std::unordered_map<std::string, std::uint32_t> index_;
  mutable std::array<std::mutex, kStripes> stripes_;
};

}  // namespace gs::metersim
