// libFuzzer target: the fleet file parser behind `gridseal meters import` (src/meter_import.h).
// Fleet files come from meter manufacturers. The input is the header line, a line break, then
// one data row. An accepted row must satisfy every rule the importer relies on, and written
// back as a CSV line it must parse to the same row.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "gridseal/bytes.h"
#include "src/meter_import.h"

namespace {

void must(bool ok) {
  if (!ok) __builtin_trap();
}

std::string key_field(const gs::FleetRow& r) {
  switch (r.source) {
    case gs::KeySource::plain: return "plain:" + gs::to_hex(r.key_material);
    case gs::KeySource::wrapped: return "wrapped:" + gs::to_hex(r.key_material);
    case gs::KeySource::ecdh: return "ecdh";
  }
  return "";
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  const std::size_t nl = in.find('\n');
  (void)gs::check_fleet_header(in.substr(0, nl));
  if (nl == std::string_view::npos) return 0;
  const std::string_view line = in.substr(nl + 1);
  if (gs::skipped_fleet_line(line)) return 0;
  auto r = gs::parse_fleet_row(line, 2, gs::c1222::default_base_oid());
  if (!r.ok()) return 0;
  must(r->line == 2);
  must(!r->meter_id.empty() && r->meter_id.size() <= gs::store::kMaxMeterIdLength);
  for (char c : r->meter_id) must(c >= 0x21 && c <= 0x7E && c != ',');
  must(!r->ap_title.empty() && r->ap_title.size() <= gs::c1222::kMaxOidLength);
  must(r->public_key.empty() ||
       (r->public_key.size() == gs::store::kPublicKeySize && r->public_key[0] == 0x04));
  must(r->slot >= 0 && r->slot < static_cast<int>(gs::store::kSlotsPerMeter));
  switch (r->source) {
    case gs::KeySource::plain: must(r->key_material.size() == 16); break;
    case gs::KeySource::wrapped:
      must(r->key_material.size() >= 16 && r->key_material.size() <= 64);
      break;
    case gs::KeySource::ecdh: must(r->key_material.empty() && !r->public_key.empty() && r->slot == 0); break;
  }
  const std::string again = r->meter_id + "," + r->ap_title_text + "," + gs::to_hex(r->public_key) +
                            "," + std::to_string(r->slot) + "," + key_field(*r);
  auto r2 = gs::parse_fleet_row(again, 2, gs::c1222::default_base_oid());
  must(r2.ok());
  must(r2->meter_id == r->meter_id && r2->ap_title_text == r->ap_title_text &&
       r2->ap_title == r->ap_title && r2->public_key == r->public_key && r2->slot == r->slot &&
       r2->source == r->source && r2->key_material == r->key_material);
  return 0;
}
