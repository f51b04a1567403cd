// gridseal command-signature profile (DESIGN §3): table services and signed byte strings.
#include "c1222/profile.h"

#include <algorithm>
#include <cstring>

#include "c1222/ber.h"

namespace gs::c1222 {
namespace {

constexpr std::array<std::uint8_t, 4> kTagAuthorization = {'G', 'S', 'A', '1'};
constexpr std::array<std::uint8_t, 4> kTagKeyContext = {'G', 'S', 'K', '1'};
constexpr std::array<std::uint8_t, 4> kTagReceipt = {'G', 'S', 'R', '1'};
constexpr std::array<std::uint8_t, 4> kTagChallenge = {'G', 'S', 'C', '1'};
constexpr std::array<std::uint8_t, 4> kTagReplacement = {'G', 'S', 'V', '1'};

// 4F + table(2) + offset(3) + count(2) + checksum(1).
constexpr std::size_t kPartialWriteOverhead = 9;
// 00 + count(2) + checksum(1).
constexpr std::size_t kReadResponseOverhead = 4;
constexpr std::size_t kMaxTitle = 255;

void put_u16(Bytes& out, std::uint16_t v) {
  out.push_back(static_cast<std::uint8_t>(v >> 8));
  out.push_back(static_cast<std::uint8_t>(v));
}
void put_u32(Bytes& out, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<std::uint8_t>(v >> shift));
  }
}
void put_u64(Bytes& out, std::uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) {
    out.push_back(static_cast<std::uint8_t>(v >> shift));
  }
}
void put(Bytes& out, ByteView b) { out.insert(out.end(), b.begin(), b.end()); }

// A fixed-size big-endian field writer into a std::array.
template <std::size_t N>
class FixedWriter {
 public:
  explicit FixedWriter(std::array<std::uint8_t, N>& a) : a_(a) {}
  void u8(std::uint8_t v) { a_[pos_++] = v; }
  void u32(std::uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      u8(static_cast<std::uint8_t>(v >> shift));
    }
  }
  void u64(std::uint64_t v) {
    for (int shift = 56; shift >= 0; shift -= 8) {
      u8(static_cast<std::uint8_t>(v >> shift));
    }
  }
  void bytes(ByteView b) {
    std::copy(b.begin(), b.end(), a_.begin() + static_cast<std::ptrdiff_t>(pos_));
    pos_ += b.size();
  }
  std::size_t pos() const { return pos_; }

 private:
  std::array<std::uint8_t, N>& a_;
  std::size_t pos_ = 0;
};

std::uint32_t be32(ByteView b) {
  return (static_cast<std::uint32_t>(b[0]) << 24) | (static_cast<std::uint32_t>(b[1]) << 16) |
         (static_cast<std::uint32_t>(b[2]) << 8) | static_cast<std::uint32_t>(b[3]);
}
std::uint64_t be64(ByteView b) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < 8; ++i) {
    v = (v << 8) | b[i];
  }
  return v;
}

template <std::size_t N>
void copy_to(std::array<std::uint8_t, N>& dst, ByteView src) {
  std::copy_n(src.begin(), N, dst.begin());
}

Status check_version(ByteView data) {
  if (data.empty()) {
    return Status(Errc::truncated, "empty table data", 0);
  }
  if (data[0] != kProfileVersion) {
    return Status(Errc::unsupported, "profile version is not 1", 0);
  }
  return {};
}

Status check_title(ByteView title, const char* what) {
  if (title.empty() || title.size() > kMaxTitle) {
    return Status(Errc::bad_length, what);
  }
  return {};
}

// Shifts a service-relative error offset to a message offset.
Error at(Error e, std::size_t origin) {
  if (e.offset != Error::kNoOffset) {
    e.offset += origin;
  }
  return e;
}

bool writes_table(ByteView service, std::uint16_t table) {
  if (service.size() < 3 || service[0] < 0x40 || service[0] > 0x4F) {
    return false;
  }
  return ((static_cast<std::uint16_t>(service[1]) << 8) | service[2]) == table;
}

Bytes prefixed_title_bytes(const std::array<std::uint8_t, 4>& tag, ByteView title) {
  Bytes out;
  out.reserve(4 + 1 + title.size() + 64);
  put(out, tag);
  out.push_back(static_cast<std::uint8_t>(title.size()));
  put(out, title);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Result<Bytes> encode_partial_write(std::uint16_t table, ByteView data) {
  if (data.size() > 0xFFFF) {
    return Result<Bytes>(Errc::too_large, "table data above 65535 bytes");
  }
  Bytes out;
  out.reserve(data.size() + kPartialWriteOverhead);
  out.push_back(kServicePartialWriteOffset);
  put_u16(out, table);
  out.insert(out.end(), {0, 0, 0});
  put_u16(out, static_cast<std::uint16_t>(data.size()));
  put(out, data);
  out.push_back(c1219_checksum(data));
  return out;
}

Result<ByteView> decode_partial_write(ByteView service, std::uint16_t table,
                                      std::size_t expected_count) {
  Reader r(service);
  GS_ASSIGN(std::uint8_t code, r.u8());
  if (code != kServicePartialWriteOffset) {
    return Result<ByteView>(Errc::bad_value, "not a partial write by offset", 0);
  }
  GS_ASSIGN(std::uint16_t tid, r.u16be());
  if (tid != table) {
    return Result<ByteView>(Errc::bad_value, "unexpected table id", 1);
  }
  GS_ASSIGN(std::uint32_t offset, r.u24be());
  if (offset != 0) {
    return Result<ByteView>(Errc::bad_value, "table offset is not 0", 3);
  }
  GS_ASSIGN(std::uint16_t count, r.u16be());
  if (count != expected_count) {
    return Result<ByteView>(Errc::bad_length, "unexpected table data count", 6);
  }
  GS_ASSIGN(ByteView data, r.bytes(count));
  const std::size_t cksum_at = r.offset();
  GS_ASSIGN(std::uint8_t cksum, r.u8());
  if (!r.empty()) {
    return Result<ByteView>(Errc::trailing_data, "bytes after the checksum", r.offset());
  }
  if (cksum != c1219_checksum(data)) {
    return Result<ByteView>(Errc::bad_checksum, "table data checksum", cksum_at);
  }
  return data;
}

Bytes encode_full_read(std::uint16_t table) {
  Bytes out{kServiceFullRead};
  put_u16(out, table);
  return out;
}

Result<ByteView> decode_read_response(ByteView service, std::size_t expected_count) {
  Reader r(service);
  GS_ASSIGN(std::uint8_t code, r.u8());
  if (code != kResponseOk) {
    return Result<ByteView>(Errc::bad_value,
                            "read response code " + std::to_string(code) + " (not ok)", 0);
  }
  GS_ASSIGN(std::uint16_t count, r.u16be());
  if (count != expected_count) {
    return Result<ByteView>(Errc::bad_length, "unexpected table data count", 1);
  }
  GS_ASSIGN(ByteView data, r.bytes(count));
  const std::size_t cksum_at = r.offset();
  GS_ASSIGN(std::uint8_t cksum, r.u8());
  if (!r.empty()) {
    return Result<ByteView>(Errc::trailing_data, "bytes after the checksum", r.offset());
  }
  if (cksum != c1219_checksum(data)) {
    return Result<ByteView>(Errc::bad_checksum, "table data checksum", cksum_at);
  }
  return data;
}

Result<Bytes> encode_read_response(ByteView data) {
  if (data.size() > 0xFFFF) {
    return Result<Bytes>(Errc::too_large, "table data above 65535 bytes");
  }
  Bytes out;
  out.reserve(data.size() + kReadResponseOverhead);
  out.push_back(kResponseOk);
  put_u16(out, static_cast<std::uint16_t>(data.size()));
  put(out, data);
  out.push_back(c1219_checksum(data));
  return out;
}

Result<std::uint64_t> invocation_id_value(ByteView content) {
  if (content.empty()) {
    return Result<std::uint64_t>(Errc::bad_length, "empty invocation id");
  }
  if ((content[0] & 0x80) != 0) {
    return Result<std::uint64_t>(Errc::bad_value, "negative invocation id");
  }
  std::size_t i = 0;
  while (i < content.size() && content[i] == 0) {
    ++i;
  }
  if (content.size() - i > 8) {
    return Result<std::uint64_t>(Errc::too_large, "invocation id above 64 bits");
  }
  std::uint64_t v = 0;
  for (; i < content.size(); ++i) {
    v = (v << 8) | content[i];
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// MT-2040

const char* command_class_name(CommandClass c) noexcept {
  switch (c) {
    case CommandClass::read:
      return "read";
    case CommandClass::write:
      return "write";
    case CommandClass::connect_disconnect:
      return "connect_disconnect";
    case CommandClass::demand_response:
      return "demand_response";
    case CommandClass::key_management:
      return "key_management";
    case CommandClass::firmware:
      return "firmware";
    case CommandClass::time:
      return "time";
  }
  return "unknown";
}

Result<CommandClass> parse_command_class(std::string_view name) {
  for (std::uint8_t v = 0; v <= kMaxCommandClass; ++v) {
    const auto c = static_cast<CommandClass>(v);
    if (name == command_class_name(c)) {
      return c;
    }
  }
  return Result<CommandClass>(Errc::bad_value, "unknown command class");
}

std::array<std::uint8_t, kAuthorizationSignedPrefixSize> authorization_signed_prefix(
    const SignedAuthorization& a) {
  std::array<std::uint8_t, kAuthorizationSignedPrefixSize> out{};
  FixedWriter w(out);
  w.u8(kProfileVersion);
  w.u8(a.signer_key_id);
  w.u32(a.not_before);
  w.u32(a.not_after);
  w.u8(static_cast<std::uint8_t>(a.command_class));
  w.u8(0);  // reserved
  return out;
}

std::array<std::uint8_t, kAuthorizationDataSize> encode_authorization_data(
    const SignedAuthorization& a) {
  std::array<std::uint8_t, kAuthorizationDataSize> out{};
  FixedWriter w(out);
  w.bytes(authorization_signed_prefix(a));
  w.bytes(a.signature);
  return out;
}

Result<SignedAuthorization> decode_authorization_data(ByteView data) {
  if (data.size() != kAuthorizationDataSize) {
    return Result<SignedAuthorization>(Errc::bad_length, "MT-2040 data is not 76 bytes");
  }
  GS_TRY(check_version(data));
  if (data[10] > kMaxCommandClass) {
    return Result<SignedAuthorization>(Errc::bad_value, "unknown command class", 10);
  }
  if (data[11] != 0) {
    return Result<SignedAuthorization>(Errc::bad_value, "MT-2040 reserved byte is not 0", 11);
  }
  SignedAuthorization a;
  a.signer_key_id = data[1];
  a.not_before = be32(data.subspan(2, 4));
  a.not_after = be32(data.subspan(6, 4));
  a.command_class = static_cast<CommandClass>(data[10]);
  copy_to(a.signature, data.subspan(kAuthorizationSignedPrefixSize));
  return a;
}

Bytes encode_authorization_service(const SignedAuthorization& a) {
  const auto data = encode_authorization_data(a);
  auto r = encode_partial_write(kTableSignedAuthorization, data);
  GS_CHECK(r.ok() && r->size() == kAuthorizationServiceSize);
  return std::move(r).value();
}

Bytes encode_authorization_service_wire(const SignedAuthorization& a) {
  Bytes out;
  out.reserve(kAuthorizationWireSize);
  out.push_back(static_cast<std::uint8_t>(kAuthorizationServiceSize));
  put(out, encode_authorization_service(a));
  return out;
}

Result<SignedAuthorization> decode_authorization_service(ByteView service) {
  if (service.size() != kAuthorizationServiceSize) {
    return Result<SignedAuthorization>(Errc::bad_length, "MT-2040 service is not 85 bytes");
  }
  GS_ASSIGN(ByteView data,
            decode_partial_write(service, kTableSignedAuthorization, kAuthorizationDataSize));
  auto a = decode_authorization_data(data);
  if (!a.ok()) {
    return at(std::move(a).error(), 8);
  }
  return a;
}

Result<Bytes> authorization_signing_input(const SigningHeader& h, const SignedAuthorization& a,
                                          ByteView following) {
  GS_TRY(check_title(h.called_title, "called AP title length not in 1..255"));
  GS_TRY(check_title(h.calling_title, "calling AP title length not in 1..255"));
  Bytes out;
  out.reserve(4 + 2 + h.called_title.size() + h.calling_title.size() + 8 + kEdClassSize +
              kAuthorizationSignedPrefixSize + following.size());
  put(out, kTagAuthorization);
  out.push_back(static_cast<std::uint8_t>(h.called_title.size()));
  put(out, h.called_title);
  out.push_back(static_cast<std::uint8_t>(h.calling_title.size()));
  put(out, h.calling_title);
  put_u64(out, h.invocation_id);
  if (h.ed_class) {
    put(out, *h.ed_class);
  }
  put(out, authorization_signed_prefix(a));
  put(out, following);
  return out;
}

Result<Bytes> authorization_signing_input(const ApTitle& called, const ApTitle& calling,
                                          std::uint64_t invocation_id,
                                          const std::optional<EdClass>& ed_class,
                                          const SignedAuthorization& a, ByteView following,
                                          ByteView base) {
  const ByteView b = base.empty() ? default_base_oid() : base;
  const Bytes called_abs = called.absolute(b);
  const Bytes calling_abs = calling.absolute(b);
  SigningHeader h{called_abs, calling_abs, invocation_id, ed_class};
  return authorization_signing_input(h, a, following);
}

Bytes build_authorized_epsem(std::uint8_t control, const std::optional<EdClass>& ed_class,
                             const SignedAuthorization& a, ByteView following) {
  std::uint8_t c =
      control & static_cast<std::uint8_t>(~(kEpsemSecurityMask | kEpsemEdClassIncluded));
  if (ed_class) {
    c |= kEpsemEdClassIncluded;
  }
  Bytes out;
  out.reserve(1 + kEdClassSize + kAuthorizationWireSize + following.size());
  out.push_back(c);
  if (ed_class) {
    put(out, *ed_class);
  }
  put(out, encode_authorization_service_wire(a));
  put(out, following);
  return out;
}

Result<AuthorizedCommand> extract_authorization(const Message& m, ByteView base) {
  using R = Result<AuthorizedCommand>;
  if (!m.called_ap_title) {
    return R(Errc::missing_element, "signed command without called AP title");
  }
  if (!m.calling_ap_title) {
    return R(Errc::missing_element, "signed command without calling AP title");
  }
  if (!m.calling_ap_invocation_id) {
    return R(Errc::missing_element, "signed command without calling-AP-invocation-id");
  }
  GS_ASSIGN(std::uint64_t invocation_id, invocation_id_value(*m.calling_ap_invocation_id));
  GS_ASSIGN(Epsem e, split_epsem(m.epsem, m.epsem_offset));
  if (security_mode(e.control) != SecurityMode::cleartext || e.mac) {
    return R(Errc::unsupported, "secured EPSEM: open it before reading MT-2040", m.epsem_offset);
  }
  const std::size_t body_origin = m.epsem_offset + 1 + (e.ed_class ? kEdClassSize : 0);
  GS_ASSIGN(std::vector<ServiceSpan> services, split_services(e.body, body_origin));
  if (services.empty() || !writes_table(services[0].bytes, kTableSignedAuthorization)) {
    return R(Errc::missing_element, "first service is not the MT-2040 signed authorization",
             body_origin);
  }
  for (std::size_t i = 1; i < services.size(); ++i) {
    if (writes_table(services[i].bytes, kTableSignedAuthorization)) {
      return R(Errc::bad_value, "a second write of MT-2040", services[i].offset);
    }
  }
  const ServiceSpan& first = services[0];
  auto auth = decode_authorization_service(first.bytes);
  if (!auth.ok()) {
    return at(std::move(auth).error(), first.offset);
  }
  // Everything in the body after the first service, with the length prefixes as received.
  const auto end_of_first =
      static_cast<std::size_t>((first.bytes.data() + first.bytes.size()) - e.body.data());
  GS_CHECK(end_of_first <= e.body.size());

  AuthorizedCommand out;
  out.authorization = *auth;
  out.following = e.body.subspan(end_of_first);
  out.invocation_id = invocation_id;
  out.ed_class = e.ed_class;
  out.service_offset = first.offset;
  GS_ASSIGN(out.signing_input,
            authorization_signing_input(*m.called_ap_title, *m.calling_ap_title, invocation_id,
                                        e.ed_class, out.authorization, out.following, base));
  return out;
}

// ---------------------------------------------------------------------------------------------
// MT-2041

std::array<std::uint8_t, kKeyUpdateDataSize> encode_key_update_data(const KeyUpdate& k) {
  std::array<std::uint8_t, kKeyUpdateDataSize> out{};
  FixedWriter w(out);
  w.u8(kProfileVersion);
  w.u8(k.target_slot);
  w.u8(k.key_type);
  w.u32(k.key_version);
  w.bytes(k.ephemeral_public);
  return out;
}

Result<KeyUpdate> decode_key_update_data(ByteView data) {
  if (data.size() != kKeyUpdateDataSize) {
    return Result<KeyUpdate>(Errc::bad_length, "MT-2041 data is not 72 bytes");
  }
  GS_TRY(check_version(data));
  if (data[2] != kKeyTypeAes128EaxPrime) {
    return Result<KeyUpdate>(Errc::unsupported, "MT-2041 key type is not AES-128 EAX'", 2);
  }
  if (data[7] != 0x04) {
    return Result<KeyUpdate>(Errc::bad_value, "ephemeral key is not an uncompressed point", 7);
  }
  KeyUpdate k;
  k.target_slot = data[1];
  k.key_type = data[2];
  k.key_version = be32(data.subspan(3, 4));
  copy_to(k.ephemeral_public, data.subspan(7));
  return k;
}

Bytes encode_key_update_service(const KeyUpdate& k) {
  const auto data = encode_key_update_data(k);
  auto r = encode_partial_write(kTableKeyUpdate, data);
  GS_CHECK(r.ok());
  return std::move(r).value();
}

Result<KeyUpdate> decode_key_update_service(ByteView service) {
  GS_ASSIGN(ByteView data, decode_partial_write(service, kTableKeyUpdate, kKeyUpdateDataSize));
  auto k = decode_key_update_data(data);
  if (!k.ok()) {
    return at(std::move(k).error(), 8);
  }
  return k;
}

Result<Bytes> key_context_input(ByteView meter_title_abs, std::uint8_t slot,
                                std::uint32_t key_version) {
  GS_TRY(check_title(meter_title_abs, "meter AP title length not in 1..255"));
  Bytes out = prefixed_title_bytes(kTagKeyContext, meter_title_abs);
  out.push_back(slot);
  put_u32(out, key_version);
  return out;
}

// ---------------------------------------------------------------------------------------------
// MT-2042

std::array<std::uint8_t, kReceiptDataSize> encode_receipt_data(const SignedReceipt& r) {
  std::array<std::uint8_t, kReceiptDataSize> out{};
  FixedWriter w(out);
  w.u8(kProfileVersion);
  w.u64(r.invocation_id);
  w.u8(r.result);
  w.u32(r.executed_at);
  w.bytes(r.command_digest);
  w.bytes(r.signature);
  return out;
}

Result<SignedReceipt> decode_receipt_data(ByteView data) {
  if (data.size() != kReceiptDataSize) {
    return Result<SignedReceipt>(Errc::bad_length, "MT-2042 data is not 110 bytes");
  }
  GS_TRY(check_version(data));
  SignedReceipt r;
  r.invocation_id = be64(data.subspan(1, 8));
  r.result = data[9];
  r.executed_at = be32(data.subspan(10, 4));
  copy_to(r.command_digest, data.subspan(14, kDigestSize));
  copy_to(r.signature, data.subspan(kReceiptSignedDataSize));
  return r;
}

Bytes encode_receipt_response(const SignedReceipt& r) {
  const auto data = encode_receipt_data(r);
  auto out = encode_read_response(data);
  GS_CHECK(out.ok());
  return std::move(out).value();
}

Result<SignedReceipt> decode_receipt_response(ByteView service) {
  GS_ASSIGN(ByteView data, decode_read_response(service, kReceiptDataSize));
  auto r = decode_receipt_data(data);
  if (!r.ok()) {
    return at(std::move(r).error(), 3);
  }
  return r;
}

Result<Bytes> receipt_signed_bytes(ByteView meter_title_abs, const SignedReceipt& r) {
  GS_TRY(check_title(meter_title_abs, "meter AP title length not in 1..255"));
  const auto data = encode_receipt_data(r);
  Bytes out = prefixed_title_bytes(kTagReceipt, meter_title_abs);
  put(out, ByteView(data).first(kReceiptSignedDataSize));
  return out;
}

// ---------------------------------------------------------------------------------------------
// MT-2043

Bytes encode_challenge_write(const Challenge& c) {
  auto r = encode_partial_write(kTableChallenge, c);
  GS_CHECK(r.ok());
  return std::move(r).value();
}

Result<Challenge> decode_challenge_write(ByteView service) {
  GS_ASSIGN(ByteView data, decode_partial_write(service, kTableChallenge, kChallengeSize));
  Challenge c{};
  copy_to(c, data);
  return c;
}

std::array<std::uint8_t, kChallengeAnswerDataSize> encode_challenge_answer_data(
    const ChallengeAnswer& a) {
  std::array<std::uint8_t, kChallengeAnswerDataSize> out{};
  FixedWriter w(out);
  w.u8(kProfileVersion);
  w.bytes(a.challenge);
  w.u32(a.meter_time);
  w.bytes(a.signature);
  return out;
}

Result<ChallengeAnswer> decode_challenge_answer_data(ByteView data) {
  if (data.size() != kChallengeAnswerDataSize) {
    return Result<ChallengeAnswer>(Errc::bad_length, "MT-2043 data is not 85 bytes");
  }
  GS_TRY(check_version(data));
  ChallengeAnswer a;
  copy_to(a.challenge, data.subspan(1, kChallengeSize));
  a.meter_time = be32(data.subspan(1 + kChallengeSize, 4));
  copy_to(a.signature, data.subspan(1 + kChallengeSize + 4));
  return a;
}

Bytes encode_challenge_answer_response(const ChallengeAnswer& a) {
  const auto data = encode_challenge_answer_data(a);
  auto out = encode_read_response(data);
  GS_CHECK(out.ok());
  return std::move(out).value();
}

Result<ChallengeAnswer> decode_challenge_answer_response(ByteView service) {
  GS_ASSIGN(ByteView data, decode_read_response(service, kChallengeAnswerDataSize));
  auto a = decode_challenge_answer_data(data);
  if (!a.ok()) {
    return at(std::move(a).error(), 3);
  }
  return a;
}

Result<Bytes> challenge_signed_bytes(ByteView meter_title_abs, const ChallengeAnswer& a) {
  GS_TRY(check_title(meter_title_abs, "meter AP title length not in 1..255"));
  Bytes out = prefixed_title_bytes(kTagChallenge, meter_title_abs);
  put(out, a.challenge);
  put_u32(out, a.meter_time);
  return out;
}

// ---------------------------------------------------------------------------------------------
// MT-2044

std::array<std::uint8_t, kReplacementDataSize> encode_replacement_data(
    const CommandKeyReplacement& r) {
  std::array<std::uint8_t, kReplacementDataSize> out{};
  FixedWriter w(out);
  w.u8(kProfileVersion);
  w.u8(r.trust_slot);
  w.u8(r.key_id);
  w.u8(0);
  w.u32(r.sequence);
  w.u32(r.issued_at);
  w.bytes(r.public_key);
  w.bytes(r.signature);
  return out;
}

Result<CommandKeyReplacement> decode_replacement_data(ByteView data) {
  using R = Result<CommandKeyReplacement>;
  if (data.size() != kReplacementDataSize) {
    return R(Errc::bad_length, "MT-2044 data is not 141 bytes");
  }
  GS_TRY(check_version(data));
  CommandKeyReplacement r;
  r.trust_slot = data[1];
  r.key_id = data[2];
  if (r.trust_slot >= kTrustSlotCount) {
    return R(Errc::bad_value, "MT-2044 trust slot is not 0 or 1", 1);
  }
  if (r.key_id == 0) return R(Errc::bad_value, "MT-2044 key id 0", 2);
  if (data[3] != 0) return R(Errc::bad_value, "MT-2044 reserved byte is not 0", 3);
  r.sequence = be32(data.subspan(4, 4));
  if (r.sequence == 0) return R(Errc::bad_value, "MT-2044 sequence 0", 4);
  r.issued_at = be32(data.subspan(8, 4));
  copy_to(r.public_key, data.subspan(12, kPublicPointSize));
  if (r.public_key[0] != 0x04) {
    return R(Errc::bad_value, "MT-2044 public key is not an uncompressed point", 12);
  }
  copy_to(r.signature, data.subspan(kReplacementSignedDataSize));
  return r;
}

Bytes encode_replacement_write(const CommandKeyReplacement& r) {
  const auto data = encode_replacement_data(r);
  auto out = encode_partial_write(kTableCommandKeyReplacement, data);
  GS_CHECK(out.ok());
  return std::move(out).value();
}

Result<CommandKeyReplacement> decode_replacement_write(ByteView service) {
  GS_ASSIGN(ByteView data,
            decode_partial_write(service, kTableCommandKeyReplacement, kReplacementDataSize));
  auto r = decode_replacement_data(data);
  if (!r.ok()) {
    return at(std::move(r).error(), 8);
  }
  return r;
}

Bytes replacement_signed_bytes(const CommandKeyReplacement& r) {
  const auto data = encode_replacement_data(r);
  Bytes out(kTagReplacement.begin(), kTagReplacement.end());
  put(out, ByteView(data).first(kReplacementSignedDataSize));
  return out;
}

}  // namespace gs::c1222
