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

// Upper bound on a fleet (and so on a state file: about 850 MB).
inline constexpr std::size_t kMaxMeters = 2'000'000;

// State file, format version 1. Integers big-endian.
//   header   magic "GSMETSIM" (8) | format version = 1 (2) | record size = 427 (2) |
//            meter count 1..kMaxMeters (4) | trusted key count 0..16 (1) | reserved = 0 (3)
//   keys     trusted key count x 65-byte uncompressed P-256 points (the fleet's command keys)
//   records  meter count x 427 bytes:
//            title length 1..64 (1) | title, absolute OID content, zero padded (64) |
//            serial = meter id, printable ASCII, zero padded (16) | private scalar (32) |
//            4 key slots x [installed 0/1 (1) | key version (4) | AES-128 key (16)] |
//            active slot (1, an installed one) |
//            2 trust entries x [present 0/1 (1) | signer key id (1) | key index (2)] |
//            16 replay entries x [invocation id (8) | not_after (4), 0 = free] |
//            replay floor (4) | own invocation counter (4) | relay connected 0/1 (1) |
//            mean power W (2) | phase (2, < 43200) | energy mWh (8) | energy time (4) |
//            last procedure (2) | its sequence (1) | its result (1)
//   trailer  SHA-256 of every byte before it (32)
// Loading checks the exact file size, the digest, every length, count, flag and range, and
// refuses duplicate titles: a truncated or corrupt file is refused with the reason.
inline constexpr std::uint16_t kStateVersion = 1;
inline constexpr std::size_t kRecordSize = 427;
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

 private:
  static constexpr std::size_t kStripes = 64;
  Fleet() = default;
  Status build_index();
  std::mutex& lock_of(std::size_t index) const { return stripes_[index % kStripes]; }

  TrustTable trust_;
  std::vector<MeterRecord> meters_;
  std::unordered_map<std::string, std::uint32_t> index_;
  mutable std::array<std::mutex, kStripes> stripes_;
};

}  // namespace gs::metersim
