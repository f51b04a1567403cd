// gridseal-bench: fleet files with meter keys (see fleet_file.h).
#include "tools/bench/fleet_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "src/host_ecdsa.h"

namespace gs::bench {

namespace {

// gridseal-metersim state file, format versions 1 and 2 (tools/metersim/fleet.h): version 2 puts
// the keys (and the gs-revocation key) after the records and adds 4 bytes (the MT-2044
// sequence) after the trust entries, before the out counter.
constexpr std::array<std::uint8_t, 8> kStateMagic = {'G', 'S', 'M', 'E', 'T', 'S', 'I', 'M'};
constexpr std::size_t kStateHeader = 20;
constexpr std::size_t kStateRecordV1 = 427;
constexpr std::size_t kStateRecord = 431;
constexpr std::size_t kStateMaxMeters = 2'000'000;
constexpr std::size_t kStateMaxKeys = 64;
constexpr std::size_t kPointSize = 65;
constexpr std::size_t kDigestSize = 32;
// Offsets inside a record.
constexpr std::size_t kTitleLen = 0, kTitle = 1, kTitleMax = 64;
constexpr std::size_t kSlots = 113, kSlotSize = 21, kSlotCount = 4;  // installed | version | key
constexpr std::size_t kActiveSlot = 197;
constexpr std::size_t kOutCounter = 402;

std::uint32_t be32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
         std::uint32_t{p[3]};
}

Result<Bytes> read_file(const std::string& path, std::size_t max_size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error(Errc::not_found, path + ": " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return Error(Errc::invalid_argument, path + ": not a regular file");
  }
  if (static_cast<std::uint64_t>(st.st_size) > max_size) {
    return Error(Errc::too_large, path + ": larger than any fleet file this tool reads");
  }
  Bytes data(static_cast<std::size_t>(st.st_size));
  std::size_t got = 0;
  while (got < data.size()) {
    const ssize_t n = ::read(fd, data.data() + got, data.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error(Errc::storage_failure, path + ": " + std::strerror(errno));
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  data.resize(got);
  return data;
}

// The title as meters send it: relative to the default base OID when under it.
c1222::OwnedApTitle title_from_absolute(ByteView abs) {
  const ByteView base = c1222::default_base_oid();
  if (abs.size() > base.size() && std::equal(base.begin(), base.end(), abs.begin())) {
    return c1222::OwnedApTitle{c1222::TitleForm::relative, Bytes(abs.begin() + base.size(), abs.end())};
  }
  return c1222::OwnedApTitle{c1222::TitleForm::absolute, Bytes(abs.begin(), abs.end())};
}

Result<FleetKeys> parse_state(const std::string& path, Bytes& file, std::size_t limit) {
  auto bad = [&](const std::string& what) {
    return Error(Errc::bad_value, path + ": state file: " + what);
  };
  if (file.size() < kStateHeader + kDigestSize) return bad("shorter than a header");
  const std::uint16_t version = static_cast<std::uint16_t>((file[8] << 8) | file[9]);
  if (version != 1 && version != 2) {
    return bad("format version " + std::to_string(version) + " (reads 1 and 2)");
  }
  const std::size_t record_size = version == 1 ? kStateRecordV1 : kStateRecord;
  const std::size_t record = static_cast<std::size_t>((file[10] << 8) | file[11]);
  if (record != record_size) return bad("record size " + std::to_string(record));
  const std::uint32_t count = be32(&file[12]);
  const std::size_t keys = file[16];
  const std::size_t revocation = file[17];  // 0 in version 1 (reserved)
  if (count == 0 || count > kStateMaxMeters) return bad("meter count " + std::to_string(count));
  if (keys > kStateMaxKeys) return bad(std::to_string(keys) + " command keys");
  if (revocation > 1) return bad("gs-revocation flag");
  const std::size_t expected = kStateHeader + (keys + revocation) * kPointSize +
                               std::size_t{count} * record_size + kDigestSize;
  if (file.size() != expected) {
    return bad(std::to_string(file.size()) + " bytes, expected " + std::to_string(expected));
  }
  GS_ASSIGN(auto digest, sha256(ByteView(file.data(), file.size() - kDigestSize)));
  if (!std::equal(digest.begin(), digest.end(), file.end() - kDigestSize)) {
    return bad("SHA-256 does not match (corrupt file)");
  }
  FleetKeys f;
  f.from_state = true;
  const std::size_t n = limit == 0 ? count : std::min<std::size_t>(limit, count);
  f.meters.reserve(n);
  const std::uint8_t* rec = file.data() + kStateHeader + (version == 1 ? keys * kPointSize : 0);
  const std::size_t out_counter = version == 1 ? kOutCounter : kOutCounter + 4;
  for (std::size_t i = 0; i < n; ++i, rec += record_size) {
    const std::size_t tlen = rec[kTitleLen];
    if (tlen == 0 || tlen > kTitleMax) return bad("meter " + std::to_string(i) + ": title length");
    const ByteView abs(rec + kTitle, tlen);
    if (auto st = c1222::validate_oid(abs, false); !st.ok()) {
      return bad("meter " + std::to_string(i) + ": title: " + st.error().message());
    }
    const std::size_t slot = rec[kActiveSlot];
    if (slot >= kSlotCount || rec[kSlots + slot * kSlotSize] != 1) {
      return bad("meter " + std::to_string(i) + ": active slot not installed");
    }
    FleetMeter m;
    m.title = title_from_absolute(abs);
    m.key_id = static_cast<std::uint8_t>(slot);
    std::memcpy(m.key.data(), rec + kSlots + slot * kSlotSize + 5, m.key.size());
    m.counter = be32(rec + out_counter);
    f.meters.push_back(std::move(m));
  }
  return f;
}

std::vector<std::string> split_csv(const std::string& line) {
  std::vector<std::string> out;
  std::string field;
  std::istringstream in(line);
  while (std::getline(in, field, ',')) out.push_back(field);
  if (!line.empty() && line.back() == ',') out.emplace_back();
  return out;
}

Result<FleetKeys> parse_csv(const std::string& path, Bytes& file, std::size_t limit) {
  std::string text(file.begin(), file.end());
  std::istringstream in(text);
  std::string line;
  std::size_t line_no = 0;
  auto bad = [&](const std::string& what) {
    return Error(Errc::bad_value, path + ":" + std::to_string(line_no) + ": " + what);
  };
  FleetKeys f;
  bool header = false;
  while (std::getline(in, line)) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (!header) {
      if (line != "meter_id,ap_title,ecc_public_key,key_slot,key") {
        return bad("not a fleet file: the header must be "
                   "meter_id,ap_title,ecc_public_key,key_slot,key (or a gridseal-metersim "
                   "state file)");
      }
      header = true;
      continue;
    }
    if (limit != 0 && f.meters.size() >= limit) break;
    const auto fields = split_csv(line);
    if (fields.size() != 5) return bad("expected 5 fields");
    FleetMeter m;
    auto title = c1222::OwnedApTitle::parse(fields[1]);
    if (!title.ok()) return bad("ap_title: " + title.error().message());
    m.title = std::move(title).value();
    if (fields[3].size() != 1 || fields[3][0] < '0' || fields[3][0] > '3') {
      return bad("key_slot must be 0..3");
    }
    m.key_id = static_cast<std::uint8_t>(fields[3][0] - '0');
    const std::string& key = fields[4];
    if (key.rfind("plain:", 0) != 0) {
      return bad("meter " + fields[0] + ": key `" + key.substr(0, key.find(':')) +
                 "`: the bench seals as the meter and needs its key; use a fleet with plain "
                 "keys (gridseal-bench make-fleet, gridseal-metersim export --keys plain) or "
                 "the gridseal-metersim state file");
    }
    auto bytes = from_hex(std::string_view(key).substr(6));
    if (!bytes || bytes->size() != m.key.size()) return bad("plain key must be 32 hex digits");
    std::copy(bytes->begin(), bytes->end(), m.key.begin());
    secure_zero(bytes->data(), bytes->size());
    f.meters.push_back(std::move(m));
  }
  secure_zero(text.data(), text.size());
  if (!header) return Error(Errc::bad_value, path + ": empty fleet file");
  if (f.meters.empty()) return Error(Errc::bad_value, path + ": no meters");
  return f;
}

}  // namespace

FleetKeys::~FleetKeys() {
  for (FleetMeter& m : meters) secure_zero(m.key.data(), m.key.size());
}

Result<FleetKeys> load_fleet(const std::string& path, std::size_t limit) {
  const std::size_t max_size = kStateHeader + (kStateMaxKeys + 1) * kPointSize +
                               kStateMaxMeters * kStateRecord + kDigestSize;
  GS_ASSIGN(Bytes file, read_file(path, max_size));
  Result<FleetKeys> r = (file.size() >= kStateMagic.size() &&
                         std::equal(kStateMagic.begin(), kStateMagic.end(), file.begin()))
                            ? parse_state(path, file, limit)
                            : parse_csv(path, file, limit);
  secure_zero(file.data(), file.size());
  return r;
}

}  // namespace gs::bench
