// Fleet creation, lookup and the state file (format in fleet.h).
#include "tools/metersim/fleet.h"

#include <fcntl.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <type_traits>

#include "c1222/oid.h"

namespace gs::metersim {

namespace {

constexpr std::array<std::uint8_t, 8> kMagic = {'G', 'S', 'M', 'E', 'T', 'S', 'I', 'M'};
constexpr std::size_t kMaxIdPrefix = kSerialSize - 8;
constexpr std::uint16_t kMaxPhase = 43200;

// --- big-endian writer and bounded reader ----------------------------------------------------

class Out {
 public:
  explicit Out(Bytes& b) : b_(b) {}
  void u8(std::uint8_t v) { b_.push_back(v); }
  void u16(std::uint16_t v) { uint(v, 2); }
  void u32(std::uint32_t v) { uint(v, 4); }
  void u64(std::uint64_t v) { uint(v, 8); }
  void bytes(ByteView v) {
    if (v.empty()) return;
    const std::size_t at = b_.size();
    b_.resize(at + v.size());
    std::memcpy(b_.data() + at, v.data(), v.size());
  }

 private:
  void uint(std::uint64_t v, int n) {
    for (int i = n - 1; i >= 0; --i) b_.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
  }
  Bytes& b_;
};

// Reads fixed fields; the caller checked the total size first, so running out is a bug.
class In {
 public:
  explicit In(ByteView b) : b_(b) {}
  std::uint8_t u8() { return static_cast<std::uint8_t>(uint(1)); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(uint(2)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(uint(4)); }
  std::uint64_t u64() { return uint(8); }
  ByteView bytes(std::size_t n) {
    GS_CHECK(pos_ + n <= b_.size());
    ByteView v = b_.subspan(pos_, n);
    pos_ += n;
    return v;
  }
  std::size_t pos() const { return pos_; }

 private:
  std::uint64_t uint(std::size_t n) {
    ByteView v = bytes(n);
    std::uint64_t x = 0;
    for (std::uint8_t c : v) x = (x << 8) | c;
    return x;
  }
  ByteView b_;
  std::size_t pos_ = 0;
};

void write_record(Out& o, const MeterRecord& r) {
  o.u8(r.title_len);
  o.bytes(r.title);
  o.bytes(ByteView(reinterpret_cast<const std::uint8_t*>(r.serial.data()), r.serial.size()));
  o.bytes(r.private_scalar);
  for (const KeySlotState& s : r.slots) {
    o.u8(s.installed);
    o.u32(s.version);
    o.bytes(s.key);
  }
  o.u8(r.active_slot);
  for (const TrustEntry& t : r.trust) {
    o.u8(t.present);
    o.u8(t.key_id);
    o.u16(t.key_index);
  }
  o.u32(r.replacement_seq);
  for (const ReplayEntry& e : r.replay) {
    o.u64(e.id);
    o.u32(e.not_after);
  }
  o.u32(r.replay_floor);
  o.u32(r.out_counter);
  o.u8(r.connected);
  o.u16(r.base_power_w);
  o.u16(r.phase_s);
  o.u64(r.energy_mwh);
  o.u32(r.energy_since);
  o.u16(r.last_proc);
  o.u8(r.last_seq);
  o.u8(r.last_result);
}

Error record_error(std::size_t i, const std::string& what) {
  return Error(Errc::bad_value, "state file: meter " + std::to_string(i) + ": " + what);
}

bool all_zero(ByteView b) {
  return std::all_of(b.begin(), b.end(), [](std::uint8_t c) { return c == 0; });
}

// `version`: of the file (1 has no MT-2044 sequence: none accepted yet).
Result<MeterRecord> read_record(In& in, std::size_t i, std::size_t trusted_keys,
                                std::uint16_t version) {
  MeterRecord r;
  r.title_len = in.u8();
  ByteView title = in.bytes(kMaxTitle);
  if (r.title_len == 0 || r.title_len > kMaxTitle) return record_error(i, "title length");
  if (!c1222::validate_oid(title.first(r.title_len), false).ok()) {
    return record_error(i, "title is not a valid OID");
  }
  if (!all_zero(title.subspan(r.title_len))) return record_error(i, "title padding not zero");
  std::copy(title.begin(), title.end(), r.title.begin());
  ByteView serial = in.bytes(kSerialSize);
  std::size_t n = 0;
  while (n < serial.size() && serial[n] >= 0x21 && serial[n] <= 0x7E) ++n;
  if (n == 0 || !all_zero(serial.subspan(n))) return record_error(i, "serial (meter id)");
  std::copy(serial.begin(), serial.end(), reinterpret_cast<std::uint8_t*>(r.serial.data()));
  ByteView scalar = in.bytes(kEcScalarSize);
  if (!valid_scalar(scalar)) return record_error(i, "private key out of range");
  std::copy(scalar.begin(), scalar.end(), r.private_scalar.begin());
  for (KeySlotState& s : r.slots) {
    s.installed = in.u8();
    s.version = in.u32();
    ByteView k = in.bytes(16);
    std::copy(k.begin(), k.end(), s.key.begin());
    if (s.installed > 1) return record_error(i, "key slot flag");
    if (s.installed == 0 && (s.version != 0 || !all_zero(k))) {
      return record_error(i, "empty key slot with data");
    }
  }
  r.active_slot = in.u8();
  if (r.active_slot >= kKeySlots || r.slots[r.active_slot].installed == 0) {
    return record_error(i, "active key slot not installed");
  }
  for (std::size_t t = 0; t < kTrustSlots; ++t) {
    TrustEntry& e = r.trust[t];
    e.present = in.u8();
    e.key_id = in.u8();
    e.key_index = in.u16();
    if (e.present > 1) return record_error(i, "trust flag");
    if (e.present == 1 && e.key_index >= trusted_keys) return record_error(i, "trust key index");
    if (e.present == 0 && (e.key_id != 0 || e.key_index != 0)) {
      return record_error(i, "empty trust entry with data");
    }
    if (t == 1 && e.present == 1 && r.trust[0].present == 1 && r.trust[0].key_id == e.key_id) {
      return record_error(i, "signer key id trusted twice");
    }
  }
  if (version >= 2) r.replacement_seq = in.u32();
  for (ReplayEntry& e : r.replay) {
    e.id = in.u64();
    e.not_after = in.u32();
    if (e.not_after == 0 && e.id != 0) return record_error(i, "free replay entry with an id");
  }
  r.replay_floor = in.u32();
  r.out_counter = in.u32();
  r.connected = in.u8();
  if (r.connected > 1) return record_error(i, "relay state");
  r.base_power_w = in.u16();
  r.phase_s = in.u16();
  if (r.phase_s >= kMaxPhase) return record_error(i, "load phase");
  r.energy_mwh = in.u64();
  r.energy_since = in.u32();
  r.last_proc = in.u16();
  r.last_seq = in.u8();
  r.last_result = in.u8();
  return r;
}

// --- deterministic per-meter material from a 32-byte fleet secret ---------------------------

Result<Sha256Digest> derive(const std::array<std::uint8_t, 32>& secret, const char* label,
                            std::uint64_t index, std::uint32_t counter) {
  Bytes in;
  in.reserve(64);
  in.insert(in.end(), label, label + std::strlen(label));
  in.insert(in.end(), secret.begin(), secret.end());
  Out o(in);
  o.u64(index);
  o.u32(counter);
  auto d = sha256(in);
  secure_zero(in.data(), in.size());
  return d;
}

std::uint64_t first_u64(const Sha256Digest& d) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < 8; ++i) v = (v << 8) | d[i];
  return v;
}

Status check_export(const ExportOptions& o) {
  if (o.meters == 0 || o.meters > kMaxMeters) {
    return Status(Errc::invalid_argument, "--meters must be 1.." + std::to_string(kMaxMeters));
  }
  if (o.first > 0xFFFFFFFFULL || o.first + o.meters - 1 > 0xFFFFFFFFULL) {
    return Status(Errc::invalid_argument, "meter numbers above 2^32-1");
  }
  if (o.id_prefix.size() > kMaxIdPrefix) {
    return Status(Errc::invalid_argument, "--id-prefix longer than 8 characters");
  }
  for (char c : o.id_prefix) {
    if (c < 0x21 || c > 0x7E || c == ',' || c == '"') {
      return Status(Errc::invalid_argument, "--id-prefix must be printable ASCII without , or \"");
    }
  }
  if (o.keys == KeyMode::ecdh && !o.provision_key) {
    return Status(Errc::invalid_argument, "--keys ecdh needs --provision-pub (gs-provision)");
  }
  return {};
}

}  // namespace

static_assert(std::is_trivially_copyable_v<MeterRecord>, "records are wiped and copied as bytes");

Fleet::~Fleet() {
  if (!meters_.empty()) secure_zero(meters_.data(), meters_.size() * sizeof(MeterRecord));
}

Status Fleet::build_index() {
  index_.clear();
  index_.reserve(meters_.size());
  for (std::size_t i = 0; i < meters_.size(); ++i) {
    const ByteView t = meters_[i].title_view();
    auto [it, inserted] =
        index_.emplace(std::string(t.begin(), t.end()), static_cast<std::uint32_t>(i));
    if (!inserted) {
      return record_error(i, "title " + c1222::oid_to_dotted(t, false) + " also used by meter " +
                                 std::to_string(it->second));
    }
  }
  return {};
}

std::optional<std::size_t> Fleet::find(ByteView absolute_title) const {
  auto it = index_.find(std::string(absolute_title.begin(), absolute_title.end()));
  if (it == index_.end()) return std::nullopt;
  return it->second;
}

MeterReply Fleet::handle(std::size_t index, const c1222::Message& request, std::uint32_t now) {
  GS_CHECK(index < meters_.size());
  std::lock_guard<std::mutex> lock(lock_of(index));
  return Meter(meters_[index], trust_, revocation()).handle(request, now);
}

Result<std::unique_ptr<Fleet>> Fleet::generate(const ExportOptions& opt, std::ostream* csv) {
  GS_TRY(check_export(opt));
  std::unique_ptr<Fleet> f(new Fleet());
  std::array<std::optional<std::uint16_t>, kTrustSlots> trust_index;
  const std::optional<EcPoint>* trusted[kTrustSlots] = {&opt.trust_cmd1, &opt.trust_cmd2};
  for (std::size_t t = 0; t < kTrustSlots; ++t) {
    if (!*trusted[t]) continue;
    auto idx = f->trust_.add(**trusted[t]);
    if (!idx.ok()) {
      return Error(idx.error().code,
                   "--trust-cmd" + std::to_string(t + 1) + ": " + idx.error().message());
    }
    trust_index[t] = *idx;
  }
  if (opt.trust_revocation) {
    auto r = HostEcKey::from_public(*opt.trust_revocation);
    if (!r.ok()) return Error(r.error().code, "--trust-revocation: " + r.error().message());
    // DESIGN §4 keeps the roles apart: the key that replaces command keys signs no command.
    for (const std::optional<EcPoint>* t : trusted) {
      if (*t && **t == *opt.trust_revocation) {
        return Error(Errc::invalid_argument, "--trust-revocation is also a command key");
      }
    }
    f->revocation_.emplace(std::move(r).value());
  }
  std::optional<HostEcKey> provision;
  if (opt.keys == KeyMode::ecdh) {
    auto p = HostEcKey::from_public(*opt.provision_key);
    if (!p.ok()) return Error(p.error().code, "--provision-pub: " + p.error().message());
    provision.emplace(std::move(p).value());
  }
  std::array<std::uint8_t, 32> secret{};
  if (opt.seed) {
    Bytes s{'G', 'S', 'S', 'E', 'E', 'D'};
    Out(s).u64(*opt.seed);
    GS_ASSIGN(Sha256Digest d, sha256(s));
    std::copy(d.begin(), d.end(), secret.begin());
  } else if (RAND_bytes(secret.data(), static_cast<int>(secret.size())) != 1) {
    return Error(Errc::crypto_failure, "no random bytes for the fleet secret");
  }
  struct Wipe {
    std::array<std::uint8_t, 32>& s;
    ~Wipe() { secure_zero(s.data(), s.size()); }
  } wipe{secret};

  f->meters_.resize(opt.meters);
  const bool want_csv = csv != nullptr;
  // Meter i: its record, and its fleet-file line appended to `line`.
  auto make_meter = [&](std::size_t i, std::string& line) -> Status {
    MeterRecord& r = f->meters_[i];
    const std::uint64_t n = opt.first + i;
    const std::string title_text = opt.title_prefix + "." + std::to_string(n);
    auto title = c1222::OwnedApTitle::parse(title_text);
    if (!title.ok()) {
      return Status(Errc::invalid_argument, "title " + title_text + ": " + title.error().message());
    }
    const Bytes abs = title->view().absolute(c1222::default_base_oid());
    if (abs.empty() || abs.size() > kMaxTitle) {
      return Status(Errc::invalid_argument, "title " + title_text + " longer than 64 bytes");
    }
    r.title_len = static_cast<std::uint8_t>(abs.size());
    std::copy(abs.begin(), abs.end(), r.title.begin());
    char serial[kSerialSize + 8];
    std::snprintf(serial, sizeof serial, "%s%08llu", opt.id_prefix.c_str(),
                  static_cast<unsigned long long>(n));
    const std::size_t serial_len = std::min(std::strlen(serial), kSerialSize);
    std::copy_n(serial, serial_len, r.serial.begin());

    std::optional<HostEcKey> key;
    for (std::uint32_t attempt = 0; !key; ++attempt) {
      GS_ASSIGN(Sha256Digest d, derive(secret, "GSSIM-EC", i, attempt));
      if (!valid_scalar(d)) continue;
      auto k = HostEcKey::from_private(d);
      if (!k.ok()) return k.error();
      std::copy(d.begin(), d.end(), r.private_scalar.begin());
      secure_zero(d.data(), d.size());
      key.emplace(std::move(k).value());
    }
    GS_ASSIGN(Sha256Digest model, derive(secret, "GSSIM-LOAD", i, 0));
    const std::uint64_t m = first_u64(model);
    r.base_power_w = static_cast<std::uint16_t>(300 + m % 2200);
    r.phase_s = static_cast<std::uint16_t>((m >> 16) % kMaxPhase);
    r.energy_mwh = ((m >> 32) % 30'000'000ULL) * 1000ULL;  // 0 .. 30 MWh on the register
    r.energy_since = opt.now;
    r.connected = 1;
    for (std::size_t t = 0; t < kTrustSlots; ++t) {
      if (!trust_index[t]) continue;
      r.trust[t] = TrustEntry{1, static_cast<std::uint8_t>(t + 1), *trust_index[t]};
    }
    KeySlotState& s0 = r.slots[0];
    s0.installed = 1;
    s0.version = 1;
    if (opt.keys == KeyMode::ecdh) {
      // DESIGN §3.2 with gs-provision in place of the ephemeral key, slot 0, key version 1.
      GS_ASSIGN(Bytes input, c1222::key_context_input(r.title_view(), 0, 1));
      GS_ASSIGN(Block context, profile_key_context(input));
      Block k{};
      GS_TRY(key->derive_profile_key(*provision, context, k));
      std::copy(k.begin(), k.end(), s0.key.begin());
      secure_zero(k.data(), k.size());
    } else {
      GS_ASSIGN(Sha256Digest d, derive(secret, "GSSIM-AES", i, 0));
      std::copy_n(d.begin(), s0.key.size(), s0.key.begin());
      secure_zero(d.data(), d.size());
    }
    r.active_slot = 0;
    if (want_csv) {
      line += r.serial_text();
      line += ',';
      line += title_text;
      line += ',';
      line += to_hex(key->public_point());
      line += ",0,";
      line += opt.keys == KeyMode::ecdh ? std::string("ecdh") : "plain:" + to_hex(s0.key);
      line += '\n';
    }
    return {};
  };

  // Key-pair work dominates: chunks of meters on every core, lines written in meter order.
  const std::size_t threads = std::clamp<std::size_t>(
      std::min<std::size_t>(std::thread::hardware_concurrency(), opt.meters / 256), 1, 8);
  constexpr std::size_t kChunk = 4096;
  if (want_csv) *csv << "meter_id,ap_title,ecc_public_key,key_slot,key\n";
  std::vector<std::string> lines(threads);
  std::vector<Status> status(threads);
  for (std::size_t begin = 0; begin < opt.meters; begin += kChunk * threads) {
    auto work = [&](std::size_t t) {
      const std::size_t from = begin + t * kChunk;
      const std::size_t to = std::min(opt.meters, from + kChunk);
      for (std::size_t i = from; i < to && status[t].ok(); ++i) status[t] = make_meter(i, lines[t]);
    };
    std::vector<std::thread> pool;
    for (std::size_t t = 1; t < threads; ++t) pool.emplace_back(work, t);
    work(0);
    for (auto& th : pool) th.join();
    for (std::size_t t = 0; t < threads; ++t) {
      if (!status[t].ok()) return status[t].error();
      if (want_csv) *csv << lines[t];
      secure_zero(lines[t].data(), lines[t].size());
      lines[t].clear();
    }
  }
  if (csv != nullptr && !*csv) return Error(Errc::storage_failure, "writing the fleet file");
  GS_TRY(f->build_index());
  return f;
}

Bytes Fleet::serialize() const {
  constexpr std::size_t kKeyCountAt = 16;
  Bytes out;
  out.reserve(kHeaderSize + meters_.size() * kRecordSize + (kMaxTrustedKeys + 1) * kEcPointSize +
              kSha256Size);
  Out o(out);
  o.bytes(kMagic);
  o.u16(kStateVersion);
  o.u16(static_cast<std::uint16_t>(kRecordSize));
  o.u32(static_cast<std::uint32_t>(meters_.size()));
  o.u8(0);  // key count, known once every record is copied
  o.u8(revocation_ ? 1 : 0);
  o.bytes(std::array<std::uint8_t, 2>{});
  GS_CHECK(out.size() == kHeaderSize);
  for (std::size_t i = 0; i < meters_.size(); ++i) {
    MeterRecord copy;
    {
      std::lock_guard<std::mutex> lock(lock_of(i));
      copy = meters_[i];
    }
    const std::size_t before = out.size();
    write_record(o, copy);
    GS_CHECK(out.size() - before == kRecordSize);
    secure_zero(&copy, sizeof copy);
  }
  // Read after the records: keys added meanwhile are included, so every index is covered.
  const std::size_t keys = trust_.size();
  out[kKeyCountAt] = static_cast<std::uint8_t>(keys);
  for (std::size_t i = 0; i < keys; ++i) o.bytes(trust_.key(i).public_point());
  if (revocation_) o.bytes(revocation_->public_point());
  auto d = sha256(out);
  GS_CHECK(d.ok());
  o.bytes(*d);
  return out;
}

Result<std::unique_ptr<Fleet>> Fleet::parse(ByteView file) {
  using R = Result<std::unique_ptr<Fleet>>;
  if (file.size() < kHeaderSize + kSha256Size) {
    return R(Errc::truncated,
             "state file: " + std::to_string(file.size()) + " bytes, shorter than a header");
  }
  In in(file);
  if (!std::equal(kMagic.begin(), kMagic.end(), in.bytes(kMagic.size()).begin())) {
    return R(Errc::bad_value, "state file: bad magic (not a gridseal-metersim state file)");
  }
  const std::uint16_t version = in.u16();
  if (version != 1 && version != kStateVersion) {
    return R(Errc::unsupported, "state file: format version " + std::to_string(version) +
                                    " (this build reads versions 1 and 2)");
  }
  const std::size_t expected_record = version == 1 ? kRecordSizeV1 : kRecordSize;
  const std::uint16_t record_size = in.u16();
  if (record_size != expected_record) {
    return R(Errc::bad_value, "state file: record size " + std::to_string(record_size) +
                                  ", expected " + std::to_string(expected_record));
  }
  const std::uint32_t count = in.u32();
  if (count == 0 || count > kMaxMeters) {
    return R(Errc::too_large, "state file: meter count " + std::to_string(count) + " not in 1.." +
                                  std::to_string(kMaxMeters));
  }
  const std::uint8_t keys = in.u8();
  if (keys > kMaxTrustedKeys) {
    return R(Errc::too_large, "state file: " + std::to_string(keys) + " command keys (max " +
                                  std::to_string(kMaxTrustedKeys) + ")");
  }
  // Version 1 has this byte reserved (0): such a fleet has no gs-revocation key.
  const std::uint8_t has_revocation = in.u8();
  if (has_revocation > 1 || (version == 1 && has_revocation != 0)) {
    return R(Errc::bad_value, version == 1 ? "state file: reserved bytes not zero"
                                           : "state file: gs-revocation flag");
  }
  if (!all_zero(in.bytes(2))) return R(Errc::bad_value, "state file: reserved bytes not zero");
  const std::size_t expected = kHeaderSize + (keys + has_revocation) * kEcPointSize +
                               std::size_t{count} * expected_record + kSha256Size;
  if (file.size() != expected) {
    return R(file.size() < expected ? Errc::truncated : Errc::trailing_data,
             "state file: " + std::to_string(file.size()) + " bytes, expected " +
                 std::to_string(expected) + " for " + std::to_string(count) + " meters" +
                 (file.size() < expected ? " (truncated)" : ""));
  }
  auto digest = sha256(file.first(file.size() - kSha256Size));
  if (!digest.ok()) return digest.error();
  if (!std::equal(digest->begin(), digest->end(), file.end() - kSha256Size)) {
    return R(Errc::bad_checksum, "state file: SHA-256 does not match (corrupt file)");
  }
  std::unique_ptr<Fleet> f(new Fleet());
  auto read_keys = [&]() -> Status {
    for (std::size_t k = 0; k < keys; ++k) {
      auto idx = f->trust_.add(in.bytes(kEcPointSize));
      if (!idx.ok()) {
        return Status(Errc::bad_value, "state file: command key " + std::to_string(k) + ": " +
                                           idx.error().message());
      }
      if (*idx != k) return Status(Errc::bad_value, "state file: command key listed twice");
    }
    return {};
  };
  if (version == 1) {
    GS_TRY(read_keys());
  }
  f->meters_.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    GS_ASSIGN(MeterRecord r, read_record(in, i, keys, version));
    f->meters_.push_back(r);
  }
  if (version != 1) {
    GS_TRY(read_keys());
  }
  if (has_revocation != 0) {
    auto r = HostEcKey::from_public(in.bytes(kEcPointSize));
    if (!r.ok()) return R(Errc::bad_value, "state file: gs-revocation key: " + r.error().message());
    f->revocation_.emplace(std::move(r).value());
  }
  GS_CHECK(in.pos() == file.size() - kSha256Size);
  GS_TRY(f->build_index());
  return f;
}

Result<std::unique_ptr<Fleet>> Fleet::load(const std::string& path) {
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
  const std::size_t limit =
      kHeaderSize + (kMaxTrustedKeys + 1) * kEcPointSize + kMaxMeters * kRecordSize + kSha256Size;
  if (static_cast<std::uint64_t>(st.st_size) > limit) {
    return Error(Errc::too_large, path + ": larger than any valid state file");
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
  auto f = parse(data);
  secure_zero(data.data(), data.size());
  if (!f.ok()) return Error(f.error().code, path + ": " + f.error().message());
  return f;
}

Status Fleet::save(const std::string& path) const {
  Bytes data = serialize();
  struct Wipe {
    Bytes& b;
    ~Wipe() { secure_zero(b.data(), b.size()); }
  } wipe{data};
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return Status(Errc::storage_failure, tmp + ": " + std::strerror(errno));
  std::size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      return Status(Errc::storage_failure, tmp + ": " + why);
    }
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return Status(Errc::storage_failure, tmp + ": fsync/close failed");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    return Status(Errc::storage_failure, path + ": rename: " + why);
  }
  std::string dir = std::filesystem::path(path).parent_path().string();
  if (dir.empty()) dir = ".";
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  return {};
}

}  // namespace gs::metersim
