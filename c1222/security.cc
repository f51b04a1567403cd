// Canonified cleartext (PROTOCOL §4.2) and the seal/open of security modes 1 and 2.
#include "c1222/security.h"

#include "c1222/ber.h"

namespace gs::c1222 {

namespace {

constexpr std::size_t kMinCleartext = 17;  // EAX' forgeries exist at 16 bytes and below

void put_abs_title(Writer& w, std::uint8_t tag, const ApTitle& t, ByteView base) {
  std::size_t outer = w.open(tag);
  std::size_t inner = w.open(0x06);
  if (t.form == TitleForm::relative) w.bytes(base);
  w.bytes(t.oid);
  w.close(inner);
  w.close(outer);
}

void put_integer(Writer& w, std::uint8_t tag, ByteView content) {
  std::size_t mark = w.open(tag);
  w.tlv(0x02, content);
  w.close(mark);
}

ByteView base_or_default(const SealOptions& opt) {
  return opt.base_oid.empty() ? default_base_oid() : opt.base_oid;
}

}  // namespace

Result<Bytes> canonify(const Message& m, ByteView base) {
  if (!m.called_ap_title) {
    return {Errc::missing_element, "called-AP-title (A2) is required for security"};
  }
  if (!m.calling_ap_invocation_id) {
    return {Errc::missing_element, "calling-AP-invocation-id (A8) is required"};
  }
  if (m.raw_user_info_header.empty() || m.epsem.empty()) {
    return {Errc::missing_element, "user-information header not available (decode first)"};
  }
  if (m.auth && m.raw_auth_value.empty()) {
    return {Errc::missing_element, "calling-authentication-value bytes not available"};
  }
  Bytes out;
  out.reserve(192);
  Writer w(out);
  if (m.aso_context) {
    std::size_t a1 = w.open(kTagAsoContext);
    w.tlv(0x06, *m.aso_context);
    w.close(a1);
  }
  put_abs_title(w, kTagCalledApTitle, *m.called_ap_title, base);
  if (m.called_ap_invocation_id) {
    put_integer(w, kTagCalledApInvocationId, *m.called_ap_invocation_id);
  }
  if (m.calling_ae_qualifier) put_integer(w, kTagCallingAeQualifier, *m.calling_ae_qualifier);
  put_integer(w, kTagCallingApInvocationId, *m.calling_ap_invocation_id);
  if (m.mechanism_name) w.tlv(kTagMechanismName, *m.mechanism_name);
  if (m.auth) w.tlv(kTagCallingAuthValue, m.raw_auth_value);
  w.bytes(m.raw_user_info_header);
  w.u8(m.epsem[0]);
  if (m.calling_ap_title) put_abs_title(w, kTagCallingApTitle, *m.calling_ap_title, base);
  if (m.auth && m.auth->key_id) w.u8(*m.auth->key_id);
  if (m.auth && m.auth->iv) w.bytes(*m.auth->iv);
  return out;
}

Result<Bytes> seal(const Message& clear, SecurityMode mode, EaxPrime& key,
                   const SealOptions& opt) {
  if (mode != SecurityMode::authenticated && mode != SecurityMode::encrypted) {
    return {Errc::invalid_argument, "seal needs mode 1 or 2"};
  }
  if (!clear.auth || !clear.auth->key_id || !clear.auth->iv) {
    return {Errc::missing_element,
            "calling-authentication-value (AC) with key id and IV is required to seal"};
  }
  if (clear.epsem.empty()) return {Errc::missing_element, "EPSEM is required"};
  std::uint8_t control = clear.epsem[0];
  if (security_mode(control) != SecurityMode::cleartext) {
    return {Errc::bad_value, "message is already secured"};
  }
  control = static_cast<std::uint8_t>((control & ~kEpsemSecurityMask) |
                                      (static_cast<std::uint8_t>(mode) << 2));

  // Encoded once with room for the MAC; the control byte is patched in the output.
  EncodedLayout at;
  GS_ASSIGN(Bytes wire, encode(clear, &at, kMacSize));
  wire[at.epsem_offset] = control;
  const std::size_t epsem_size = clear.epsem.size() + kMacSize;
  // Point the raw views at what encode() wrote, as decode() would have.
  Message m = clear;
  m.raw_auth_value = ByteView(wire).subspan(at.auth_value_offset, at.auth_value_size);
  m.raw_user_info_header =
      ByteView(wire).subspan(at.user_info_offset, at.epsem_offset - at.user_info_offset);
  m.epsem = ByteView(wire).subspan(at.epsem_offset, epsem_size);
  m.epsem_offset = at.epsem_offset;
  GS_ASSIGN(Bytes cleartext, canonify(m, base_or_default(opt)));
  if (cleartext.size() < kMinCleartext) {
    return {Errc::short_cleartext, "canonified cleartext of 16 bytes or less"};
  }
  const std::size_t body_at = m.epsem_offset + 1;
  const std::size_t body_len = m.epsem.size() - 1 - kMacSize;
  MutableByteView body(wire.data() + body_at, body_len);
  Mac mac{};
  if (mode == SecurityMode::encrypted) {
    GS_ASSIGN(mac, key.encrypt(cleartext, body));
  } else {
    cleartext.insert(cleartext.end(), body.begin(), body.end());
    GS_ASSIGN(mac, key.encrypt(cleartext, {}));
  }
  std::copy(mac.begin(), mac.end(), wire.begin() + static_cast<std::ptrdiff_t>(body_at + body_len));
  return wire;
}

Result<Bytes> seal(ByteView wire_mode0, SecurityMode mode, EaxPrime& key,
                   const SealOptions& opt) {
  GS_ASSIGN(Message m, decode(wire_mode0, {.max_message = kMaxBerLength}));
  return seal(m, mode, key, opt);
}

Result<Opened> open(const Message& m, const KeyLookup& keys, const SealOptions& opt) {
  GS_ASSIGN(Epsem e, split_epsem(m.epsem, m.epsem_offset));
  SecurityMode mode = security_mode(e.control);
  if (mode == SecurityMode::cleartext) {
    return {Errc::bad_value, "message is not secured (security mode 0)", m.epsem_offset};
  }
  std::uint8_t key_id = (m.auth && m.auth->key_id) ? *m.auth->key_id : 0;
  EaxPrime* key = keys ? keys(key_id) : nullptr;
  if (key == nullptr) return {Errc::not_found, "no key for key id " + std::to_string(key_id)};
  GS_ASSIGN(Bytes cleartext, canonify(m, base_or_default(opt)));
  if (cleartext.size() < kMinCleartext) {
    return {Errc::short_cleartext, "canonified cleartext of 16 bytes or less"};
  }
  // Everything between the control byte and the MAC: ED class + services (maybe encrypted).
  ByteView protected_part = m.epsem.subspan(1, m.epsem.size() - 1 - kMacSize);
  Bytes epsem;
  epsem.reserve(m.epsem.size());
  epsem.push_back(static_cast<std::uint8_t>(e.control & ~kEpsemSecurityMask));
  epsem.insert(epsem.end(), protected_part.begin(), protected_part.end());
  if (mode == SecurityMode::encrypted) {
    MutableByteView data(epsem.data() + 1, protected_part.size());
    GS_TRY(key->decrypt(cleartext, data, *e.mac));
  } else {
    cleartext.insert(cleartext.end(), protected_part.begin(), protected_part.end());
    GS_TRY(key->decrypt(cleartext, {}, *e.mac));
  }
  Message out = m;
  out.epsem = epsem;
  Opened o;
  GS_ASSIGN(o.wire, encode(out));
  o.mode = mode;
  o.key_id = key_id;
  return o;
}

Result<Opened> open(ByteView wire, const KeyLookup& keys, const SealOptions& opt) {
  GS_ASSIGN(Message m, decode(wire, {.max_message = kMaxBerLength}));
  return open(m, keys, opt);
}

}  // namespace gs::c1222
