// Strict decoder and minimal encoder of the C12.22 ACSE PDU and the EPSEM envelope.
#include "c1222/message.h"

#include "c1222/ber.h"

namespace gs::c1222 {

namespace {

// Longest INTEGER content accepted for ids and qualifiers: 9 bytes covers every unsigned
// 64-bit value with its leading 00.
constexpr std::size_t kMaxIntegerContent = 9;

int element_rank(std::uint8_t tag) {
  switch (tag) {
    case kTagAsoContext: return 1;
    case kTagCalledApTitle: return 2;
    case kTagCalledApInvocationId: return 3;
    case kTagCallingApTitle: return 4;
    case kTagCallingAeQualifier: return 5;
    case kTagCallingApInvocationId: return 6;
    case kTagMechanismName: return 7;
    case kTagCallingAuthValue: return 8;
    case kTagUserInformation: return 9;
    default: return 0;
  }
}

const char* element_name(std::uint8_t tag) {
  switch (tag) {
    case kTagAsoContext: return "application-context (A1)";
    case kTagCalledApTitle: return "called-AP-title (A2)";
    case kTagCalledApInvocationId: return "called-AP-invocation-id (A4)";
    case kTagCallingApTitle: return "calling-AP-title (A6)";
    case kTagCallingAeQualifier: return "calling-AE-qualifier (A7)";
    case kTagCallingApInvocationId: return "calling-AP-invocation-id (A8)";
    case kTagMechanismName: return "mechanism-name (8B)";
    case kTagCallingAuthValue: return "calling-authentication-value (AC)";
    case kTagUserInformation: return "user-information (BE)";
    default: return "element";
  }
}

Status no_trailing(const Reader& r, const char* inside) {
  if (!r.empty()) {
    return {Errc::trailing_data, std::string("unexpected bytes inside ") + inside, r.offset()};
  }
  return {};
}

Result<ByteView> decode_oid(Reader& r, const char* what) {
  GS_ASSIGN(Tlv t, r.tlv(0x06, what));
  auto st = validate_oid(t.value, false);
  if (!st.ok()) return Error(st.error().code, st.error().detail, t.offset);
  return t.value;
}

Result<ApTitle> decode_title(const Tlv& outer, const char* what) {
  Reader r(outer.value, outer.offset + outer.header_size);
  if (r.empty()) return {Errc::missing_element, std::string("empty ") + what, r.offset()};
  std::uint8_t tag = r.peek();
  if (tag != 0x06 && tag != 0x80) {
    return {Errc::bad_tag, std::string(what) + " must hold an OID (06) or relative OID (80)",
            r.offset()};
  }
  GS_ASSIGN(Tlv t, r.tlv());
  auto st = validate_oid(t.value, tag == 0x80);
  if (!st.ok()) return Error(st.error().code, st.error().detail, t.offset);
  GS_TRY(no_trailing(r, what));
  return ApTitle{tag == 0x80 ? TitleForm::relative : TitleForm::absolute, t.value};
}

Result<ByteView> decode_integer(const Tlv& outer, const char* what) {
  Reader r(outer.value, outer.offset + outer.header_size);
  GS_ASSIGN(Tlv t, r.tlv(0x02, what));
  if (t.value.empty()) return {Errc::bad_value, std::string("empty INTEGER in ") + what, t.offset};
  if (t.value.size() > kMaxIntegerContent) {
    return {Errc::too_large, std::string("INTEGER longer than 9 bytes in ") + what, t.offset};
  }
  GS_TRY(no_trailing(r, what));
  return t.value;
}

Result<AuthValue> decode_auth(const Tlv& ac) {
  AuthValue a;
  Reader r(ac.value, ac.offset + ac.header_size);
  GS_ASSIGN(Tlv ext, r.tlv(0xA2, "EXTERNAL in calling-authentication-value"));
  GS_TRY(no_trailing(r, "calling-authentication-value"));
  Reader e = r.sub(ext);
  if (!e.empty() && e.peek() == 0x02) {
    GS_ASSIGN(Tlv ind, e.tlv());
    (void)ind;  // indirect-reference: tolerated here, it does not enter the cleartext alone
  }
  if (e.empty()) return {Errc::missing_element, "authentication encoding missing", e.offset()};
  if (e.peek() == 0x81) {  // octet-aligned encoding: opaque, no key id / IV
    GS_ASSIGN(Tlv oct, e.tlv());
    (void)oct;
    GS_TRY(no_trailing(e, "calling-authentication-value"));
    return a;
  }
  GS_ASSIGN(Tlv single, e.tlv(0xA0, "single-ASN1-type"));
  GS_TRY(no_trailing(e, "calling-authentication-value"));
  Reader s = e.sub(single);
  if (s.empty()) return {Errc::missing_element, "empty authentication mechanism", s.offset()};
  if (s.peek() == 0xA0) {  // C12.21 authentication: kept as raw bytes only
    GS_ASSIGN(Tlv c1221, s.tlv());
    (void)c1221;
    GS_TRY(no_trailing(s, "calling-authentication-value"));
    return a;
  }
  GS_ASSIGN(Tlv sec, s.tlv(0xA1, "C12.22 security"));
  GS_TRY(no_trailing(s, "calling-authentication-value"));
  Reader f = s.sub(sec);
  if (!f.empty() && f.peek() == 0x80) {
    GS_ASSIGN(Tlv kid, f.tlv());
    if (kid.value.size() != 1) return {Errc::bad_value, "key-id must be 1 byte", kid.offset};
    a.key_id = kid.value[0];
  }
  if (!f.empty() && f.peek() == 0x81) {
    GS_ASSIGN(Tlv iv, f.tlv());
    if (iv.value.size() != kIvSize) return {Errc::bad_value, "IV must be 4 bytes", iv.offset};
    std::array<std::uint8_t, kIvSize> v{};
    std::copy(iv.value.begin(), iv.value.end(), v.begin());
    a.iv = v;
  }
  if (!f.empty()) {
    return {Errc::bad_tag, "unexpected field in C12.22 security (want 80 key-id, 81 iv)",
            f.offset()};
  }
  return a;
}

}  // namespace

Result<Message> decode(ByteView wire, const DecodeLimits& limits) {
  if (wire.size() > limits.max_message) {
    return {Errc::too_large,
            "message of " + std::to_string(wire.size()) + " bytes exceeds the cap of " +
                std::to_string(limits.max_message),
            0};
  }
  Reader top(wire);
  GS_ASSIGN(Tlv pdu, top.tlv(kTagMessage, "C12.22 message"));
  if (!top.empty()) {
    return {Errc::trailing_data,
            std::to_string(top.remaining()) + " bytes after the end of the message",
            top.offset()};
  }
  Message m;
  Reader r = top.sub(pdu);
  int last_rank = 0;
  while (!r.empty()) {
    std::uint8_t tag = r.peek();
    int rank = element_rank(tag);
    std::size_t at = r.offset();
    if (rank == 0) {
      std::uint8_t b[1] = {tag};
      return {Errc::bad_tag, "unknown element " + to_hex(b), at};
    }
    if (rank <= last_rank) {
      return {Errc::wrong_order,
              std::string(element_name(tag)) + (rank == last_rank ? " repeated" : " out of order"),
              at};
    }
    last_rank = rank;
    GS_ASSIGN(Tlv t, r.tlv());
    switch (tag) {
      case kTagAsoContext: {
        Reader s = r.sub(t);
        GS_ASSIGN(m.aso_context, decode_oid(s, "application-context OID"));
        GS_TRY(no_trailing(s, element_name(tag)));
        break;
      }
      case kTagCalledApTitle: {
        GS_ASSIGN(m.called_ap_title, decode_title(t, element_name(tag)));
        break;
      }
      case kTagCalledApInvocationId: {
        GS_ASSIGN(m.called_ap_invocation_id, decode_integer(t, element_name(tag)));
        break;
      }
      case kTagCallingApTitle: {
        GS_ASSIGN(m.calling_ap_title, decode_title(t, element_name(tag)));
        break;
      }
      case kTagCallingAeQualifier: {
        GS_ASSIGN(m.calling_ae_qualifier, decode_integer(t, element_name(tag)));
        break;
      }
      case kTagCallingApInvocationId: {
        GS_ASSIGN(m.calling_ap_invocation_id, decode_integer(t, element_name(tag)));
        break;
      }
      case kTagMechanismName: {
        auto st = validate_oid(t.value, false);
        if (!st.ok()) return Error(st.error().code, "mechanism-name: " + st.error().detail, t.offset);
        m.mechanism_name = t.value;
        break;
      }
      case kTagCallingAuthValue: {
        GS_ASSIGN(m.auth, decode_auth(t));
        m.raw_auth_value = t.value;
        break;
      }
      case kTagUserInformation: {
        Reader u = r.sub(t);
        GS_ASSIGN(Tlv ext, u.tlv(0x28, "EXTERNAL in user-information"));
        GS_TRY(no_trailing(u, "user-information"));
        Reader e = u.sub(ext);
        if (!e.empty() && e.peek() == 0x02) {
          return {Errc::unsupported, "indirect-reference in user-information is not supported",
                  e.offset()};
        }
        GS_ASSIGN(Tlv oct, e.tlv(0x81, "octet-aligned EPSEM"));
        GS_TRY(no_trailing(e, "user-information"));
        if (oct.value.empty()) return {Errc::missing_element, "empty EPSEM", oct.offset};
        m.epsem = oct.value;
        m.epsem_offset = oct.offset + oct.header_size;
        m.raw_user_info_header = wire.subspan(t.offset, m.epsem_offset - t.offset);
        break;
      }
      default: break;
    }
  }
  if (!m.calling_ap_invocation_id) {
    return {Errc::missing_element, "calling-AP-invocation-id (A8) is required", r.offset()};
  }
  if (m.epsem.empty()) {
    return {Errc::missing_element, "user-information (BE) is required", r.offset()};
  }
  return m;
}

namespace {
void put_title(Writer& w, std::uint8_t tag, const ApTitle& t) {
  std::size_t mark = w.open(tag);
  w.tlv(t.form == TitleForm::relative ? 0x80 : 0x06, t.oid);
  w.close(mark);
}
void put_integer(Writer& w, std::uint8_t tag, ByteView content) {
  std::size_t mark = w.open(tag);
  w.tlv(0x02, content);
  w.close(mark);
}
}  // namespace

Result<Bytes> encode(const Message& m, EncodedLayout* layout, std::size_t epsem_tail) {
  if (!m.calling_ap_invocation_id || m.calling_ap_invocation_id->empty()) {
    return {Errc::missing_element, "calling-AP-invocation-id (A8) is required"};
  }
  if (m.epsem.empty()) return {Errc::missing_element, "EPSEM is required"};
  Bytes out;
  out.reserve(160 + m.epsem.size() + epsem_tail);
  Writer w(out);
  std::size_t msg = w.open(kTagMessage);
  if (m.aso_context) {
    std::size_t a1 = w.open(kTagAsoContext);
    w.tlv(0x06, *m.aso_context);
    w.close(a1);
  }
  if (m.called_ap_title) put_title(w, kTagCalledApTitle, *m.called_ap_title);
  if (m.called_ap_invocation_id) {
    put_integer(w, kTagCalledApInvocationId, *m.called_ap_invocation_id);
  }
  if (m.calling_ap_title) put_title(w, kTagCallingApTitle, *m.calling_ap_title);
  if (m.calling_ae_qualifier) put_integer(w, kTagCallingAeQualifier, *m.calling_ae_qualifier);
  put_integer(w, kTagCallingApInvocationId, *m.calling_ap_invocation_id);
  if (m.mechanism_name) w.tlv(kTagMechanismName, *m.mechanism_name);
  if (m.auth && !m.raw_auth_value.empty()) {
    // Decoded from the wire: written back byte for byte (it is part of the MAC input).
    std::size_t ac = w.open(kTagCallingAuthValue);
    w.bytes(m.raw_auth_value);
    w.close(ac);
    if (layout != nullptr) {
      layout->auth_value_offset = ac;
      layout->auth_value_size = m.raw_auth_value.size();
    }
  } else if (m.auth) {
    std::size_t ac = w.open(kTagCallingAuthValue);
    std::size_t ext = w.open(0xA2);
    std::size_t single = w.open(0xA0);
    std::size_t sec = w.open(0xA1);
    if (m.auth->key_id) {
      std::uint8_t kid[1] = {*m.auth->key_id};
      w.tlv(0x80, kid);
    }
    if (m.auth->iv) w.tlv(0x81, *m.auth->iv);
    w.close(sec);
    w.close(single);
    w.close(ext);
    w.close(ac);
    if (layout != nullptr) {
      // AC's content is short (< 128 bytes): its length is one byte, so nothing moves later
      // except through the outer message length, accounted for below.
      layout->auth_value_offset = ac;
      layout->auth_value_size = w.size() - ac;
    }
  }
  // user-information: lengths are known up front, so it is written without patching.
  const std::size_t l3 = m.epsem.size() + epsem_tail;
  const std::size_t l2 = 1 + length_size(l3) + l3;
  const std::size_t l1 = 1 + length_size(l2) + l2;
  const std::size_t be = w.size();
  w.u8(kTagUserInformation);
  w.length(l1);
  w.u8(0x28);
  w.length(l2);
  w.u8(0x81);
  w.length(l3);
  const std::size_t epsem_at = w.size();
  w.bytes(m.epsem);
  out.insert(out.end(), epsem_tail, 0);
  const std::size_t before = w.size();
  w.close(msg);
  if (layout != nullptr) {
    // close() may have widened the outer length, shifting everything after the 60 header.
    const std::size_t shift = w.size() - before;
    if (m.auth) layout->auth_value_offset += shift;
    layout->user_info_offset = be + shift;
    layout->epsem_offset = epsem_at + shift;
  }
  return out;
}

Result<Epsem> split_epsem(ByteView epsem, std::size_t origin) {
  if (epsem.empty()) return {Errc::missing_element, "empty EPSEM", origin};
  Epsem e;
  e.control = epsem[0];
  SecurityMode mode = security_mode(e.control);
  if (static_cast<int>(mode) == 3) return {Errc::bad_value, "reserved security mode 3", origin};
  std::size_t begin = 1;
  std::size_t end = epsem.size();
  if (mode != SecurityMode::cleartext) {
    if (epsem.size() < 1 + kMacSize) {
      return {Errc::truncated, "secured EPSEM shorter than its 4-byte MAC", origin};
    }
    end -= kMacSize;
    std::array<std::uint8_t, kMacSize> mac{};
    std::copy(epsem.begin() + static_cast<std::ptrdiff_t>(end), epsem.end(), mac.begin());
    e.mac = mac;
  }
  if ((e.control & kEpsemEdClassIncluded) && mode != SecurityMode::encrypted) {
    if (end - begin < kEdClassSize) return {Errc::truncated, "ED class cut short", origin + 1};
    std::array<std::uint8_t, kEdClassSize> ed{};
    std::copy(epsem.begin() + 1, epsem.begin() + 1 + kEdClassSize, ed.begin());
    e.ed_class = ed;
    begin += kEdClassSize;
  }
  e.body = epsem.subspan(begin, end - begin);
  return e;
}

Result<std::vector<ServiceSpan>> split_services(ByteView body, std::size_t origin) {
  std::vector<ServiceSpan> out;
  Reader r(body, origin);
  while (!r.empty()) {
    std::size_t at = r.offset();
    if (r.peek() == 0x00) {
      return {Errc::bad_length, "zero service length (padding is not allowed)", at};
    }
    GS_ASSIGN(std::size_t len, r.length());
    if (len == 0) return {Errc::bad_length, "zero service length", at};
    std::size_t code_at = r.offset();
    GS_ASSIGN(ByteView svc, r.bytes(len));
    if (out.size() == kMaxServices) {
      return {Errc::too_large, "more than " + std::to_string(kMaxServices) + " services", at};
    }
    out.push_back({svc, code_at});
  }
  return out;
}

void append_service(Bytes& body, ByteView service) {
  Writer w(body);
  w.length(service.size());
  w.bytes(service);
}

}  // namespace gs::c1222
