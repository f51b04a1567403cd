// Manufacturer fleet files (meter_id,ap_title,ecc_public_key,key_slot,key): parsing (in
// src/fleet_csv.cc), key preparation in the HSM (nothing leaves it in clear) and batched,
// idempotent storage.
#pragma once

#include <functional>
#include <istream>
#include <string>
#include <vector>

#include "c1222/oid.h"
#include "hsm/session.h"
#include "src/key_store.h"

namespace gs {

inline constexpr std::size_t kMaxCsvLine = 1024;

enum class KeySource : std::uint8_t { plain, wrapped, ecdh };

struct FleetRow {
  std::size_t line = 0;
  std::string meter_id;
  std::string ap_title_text;
  Bytes ap_title;  // absolute OID content
  Bytes public_key;
  int slot = 0;
  KeySource source = KeySource::plain;
  Bytes key_material;  // plain key (test fleets) or wrapped blob; wiped after use
};

// Parses one data line (no header). Errors name the field.
Result<FleetRow> parse_fleet_row(std::string_view line, std::size_t line_no, ByteView base_oid);
// Checks the header line.
Status check_fleet_header(std::string_view line);
// A line the importer skips: blank (spaces, tabs, a trailing CR) or a comment (# first).
bool skipped_fleet_line(std::string_view line) noexcept;

struct ImportProgress {
  std::size_t rows = 0;       // data rows read so far
  std::size_t inserted = 0;
  std::size_t unchanged = 0;
  std::size_t failed = 0;
};

struct ImportOptions {
  std::size_t batch = 1000;
  Bytes base_oid;
  // Label of the manufacturer transport key (`gridseal hsm import-transport-key`) that
  // `wrapped:<hex>` rows are wrapped under; empty: such rows stop the import.
  std::string transport_key;
  // Called after every batch; also the place to print a progress bar.
  std::function<void(const ImportProgress&)> on_progress;
  // Called for every refused row or batch: line number (0 = whole batch) and reason.
  std::function<void(std::size_t line, const std::string& reason)> on_error;
};

// Imports a fleet file. A batch with any invalid row is not written (its good rows are counted
// as failed too); other batches are. Returns the totals; failed > 0 means the caller exits 1.
Result<ImportProgress> import_fleet(std::istream& in, hsm::Session& session,
                                    store::KeyStore& store, const ImportOptions& opt);

}  // namespace gs
