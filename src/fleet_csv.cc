// Manufacturer fleet files: the CSV parsing of src/meter_import.h, kept apart from the key
// preparation in the HSM so that it can be fuzzed on its own (tests/fuzz/fleet_csv_fuzz.cc).
#include "src/meter_import.h"

#include <charconv>

namespace gs {

namespace {

std::vector<std::string_view> split_csv(std::string_view line) {
  std::vector<std::string_view> out;
  std::size_t pos = 0;
  while (true) {
    std::size_t c = line.find(',', pos);
    out.push_back(line.substr(pos, c == std::string_view::npos ? line.npos : c - pos));
    if (c == std::string_view::npos) break;
    pos = c + 1;
    if (out.size() > 16) break;
  }
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

Error row_error(std::size_t line, const std::string& what) {
  return Error(Errc::invalid_argument, "line " + std::to_string(line) + ": " + what);
}

}  // namespace

bool skipped_fleet_line(std::string_view line) noexcept {
  return trim(line).empty() || line.front() == '#';
}

Status check_fleet_header(std::string_view line) {
  auto f = split_csv(trim(line));
  const char* want[] = {"meter_id", "ap_title", "ecc_public_key", "key_slot", "key"};
  if (f.size() != 5) return row_error(1, "header must be meter_id,ap_title,ecc_public_key,key_slot,key");
  for (std::size_t i = 0; i < 5; ++i) {
    if (trim(f[i]) != want[i]) {
      return row_error(1, "header column " + std::to_string(i + 1) + " must be " + want[i]);
    }
  }
  return {};
}

Result<FleetRow> parse_fleet_row(std::string_view line, std::size_t line_no, ByteView base_oid) {
  if (line.size() > kMaxCsvLine) return row_error(line_no, "line longer than 1024 bytes");
  if (line.find('"') != std::string_view::npos) {
    return row_error(line_no, "quoted fields are not supported");
  }
  auto f = split_csv(trim(line));
  if (f.size() != 5) {
    return row_error(line_no, "expected 5 fields, found " + std::to_string(f.size()));
  }
  FleetRow r;
  r.line = line_no;
  r.meter_id = std::string(trim(f[0]));
  if (r.meter_id.empty() || r.meter_id.size() > store::kMaxMeterIdLength) {
    return row_error(line_no, "meter_id must be 1..64 characters");
  }
  for (char c : r.meter_id) {
    if (c < 0x21 || c > 0x7E) return row_error(line_no, "meter_id must be printable ASCII");
  }
  r.ap_title_text = std::string(trim(f[1]));
  auto title = c1222::OwnedApTitle::parse(r.ap_title_text);
  if (!title.ok()) return row_error(line_no, "ap_title: " + title.error().detail);
  r.ap_title = title->view().absolute(base_oid);
  if (r.ap_title.size() > c1222::kMaxOidLength) return row_error(line_no, "ap_title too long");
  std::string_view pk = trim(f[2]);
  if (!pk.empty()) {
    auto b = from_hex(pk);
    if (!b || b->size() != store::kPublicKeySize || (*b)[0] != 0x04) {
      return row_error(line_no, "ecc_public_key must be a 65-byte uncompressed point (04...) in hex");
    }
    r.public_key = std::move(*b);
  }
  std::string_view slot = trim(f[3]);
  auto [p, ec] = std::from_chars(slot.data(), slot.data() + slot.size(), r.slot);
  if (ec != std::errc() || p != slot.data() + slot.size() || r.slot < 0 ||
      r.slot >= store::kSlotsPerMeter) {
    return row_error(line_no, "key_slot must be 0..3");
  }
  std::string_view key = trim(f[4]);
  if (key.starts_with("plain:")) {
    auto b = from_hex(key.substr(6));
    if (!b || b->size() != 16) return row_error(line_no, "key plain:<32 hex digits> expected");
    r.source = KeySource::plain;
    r.key_material = std::move(*b);
  } else if (key.starts_with("wrapped:")) {
    auto b = from_hex(key.substr(8));
    if (!b || b->size() < 16 || b->size() > 64) return row_error(line_no, "key wrapped:<hex> expected");
    r.source = KeySource::wrapped;
    r.key_material = std::move(*b);
  } else if (key == "ecdh") {
    if (r.public_key.empty()) return row_error(line_no, "key ecdh needs ecc_public_key");
    if (r.slot != 0) return row_error(line_no, "key ecdh provisions slot 0 (DESIGN §3.2)");
    r.source = KeySource::ecdh;
  } else {
    return row_error(line_no, "key must be plain:<hex>, wrapped:<hex> or ecdh");
  }
  return r;
}

}  // namespace gs
