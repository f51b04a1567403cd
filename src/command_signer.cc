// Secured-command construction: signing input, MT-2040, receipt read, mode-2 seal, broadcast.
#include "src/command_signer.h"

#include <algorithm>

#include "c1222/security.h"
#include "c1222/services.h"
#include "hsm/ops.h"
#include "src/host_ecdsa.h"
#include "src/invocation_ids.h"

namespace gs::ses {

namespace {

constexpr std::uint8_t kReceiptRead[] = {0x03, c1222::kServiceFullRead, 0x0F, 0xFA};
constexpr std::uint8_t kResponseNever = 0x02;

bool needs_receipt(c1222::CommandClass c) {
  return c == c1222::CommandClass::connect_disconnect ||
         c == c1222::CommandClass::key_management;
}

// The services of a mode-0 request: its EPSEM split, checked, with the EPSEM bytes after the
// control byte and ED class.
struct RequestBody {
  c1222::Epsem epsem;
  std::vector<c1222::ServiceSpan> services;
};

Result<RequestBody> request_body(const c1222::Message& m) {
  RequestBody rb;
  GS_ASSIGN(rb.epsem, c1222::split_epsem(m.epsem, m.epsem_offset));
  if (c1222::security_mode(rb.epsem.control) != c1222::SecurityMode::cleartext) {
    return {Errc::unsupported, "request must be in security mode 0"};
  }
  GS_ASSIGN(rb.services, c1222::split_services(rb.epsem.body));
  if (rb.services.empty()) return {Errc::missing_element, "request without services"};
  const ByteView first = rb.services.front().bytes;
  if (first.size() >= 3 && (first[0] == c1222::kServicePartialWriteOffset ||
                            first[0] == c1222::kSvcFullWrite) &&
      first[1] == 0x0F && first[2] == 0xF8) {
    return {Errc::bad_value, "request already carries MT-2040"};
  }
  return rb;
}

Result<c1222::Signature> sign_input(Signer& signer, ByteView input) {
  GS_ASSIGN(Sha256Digest d, sha256(input));
  c1222::Digest digest{};
  std::copy(d.begin(), d.end(), digest.begin());
  return signer.sign(digest);
}

ByteView base_of(const CommandParams& p) {
  return p.base_oid.empty() ? c1222::default_base_oid() : p.base_oid;
}

Status check_params(const CommandParams& p) {
  if (!ids::is_interoperable(p.invocation_id)) {
    return {Errc::invalid_argument, "invocation id is not an issuable id"};
  }
  if (p.not_after < p.not_before) return {Errc::invalid_argument, "not_after before not_before"};
  if (static_cast<std::uint8_t>(p.command_class) > c1222::kMaxCommandClass) {
    return {Errc::invalid_argument, "unknown command class"};
  }
  return {};
}

// Builds the mode-0 EPSEM `control [ED] 55 <MT-2040> following` and the signature over it.
Result<Bytes> authorized_epsem(const c1222::Message& request, const c1222::ApTitle& calling,
                               const RequestBody& rb, ByteView following,
                               std::uint8_t control, const CommandParams& p, Signer& signer) {
  c1222::SignedAuthorization a;
  a.signer_key_id = signer.key_id();
  a.not_before = p.not_before;
  a.not_after = p.not_after;
  a.command_class = p.command_class;
  GS_ASSIGN(Bytes input,
            c1222::authorization_signing_input(*request.called_ap_title, calling,
                                               p.invocation_id, rb.epsem.ed_class, a, following,
                                               base_of(p)));
  GS_ASSIGN(a.signature, sign_input(signer, input));
  return c1222::build_authorized_epsem(control, rb.epsem.ed_class, a, following);
}

}  // namespace

Result<c1222::Signature> HsmSigner::sign(const c1222::Digest& digest) {
  GS_ASSIGN(hsm::Signature s, hsm::sign_digest(*session_, key_, digest));
  c1222::Signature out{};
  std::copy(s.begin(), s.end(), out.begin());
  return out;
}

Result<c1222::Signature> HostSigner::sign(const c1222::Digest& digest) {
  GS_ASSIGN(EcSignature s, key_->sign(digest));
  c1222::Signature out{};
  std::copy(s.begin(), s.end(), out.begin());
  return out;
}

const char* meter_refusal_name(MeterRefusal r) noexcept {
  switch (r) {
    case MeterRefusal::none: return "none";
    case MeterRefusal::unknown_meter: return "unknown_meter";
    case MeterRefusal::meter_revoked: return "meter_revoked";
    case MeterRefusal::meter_quarantined: return "meter_quarantined";
    case MeterRefusal::no_active_key: return "no_active_key";
  }
  return "unknown";
}

std::uint8_t response_code_for(MeterRefusal r) noexcept {
  switch (r) {
    case MeterRefusal::none: return 0x00;
    case MeterRefusal::unknown_meter: return 0x0C;  // uat
    default: return 0x03;                           // isc
  }
}

MeterKeyChoice choose_meter_key(const store::Meter* meter) noexcept {
  if (meter == nullptr) return {MeterRefusal::unknown_meter, nullptr};
  switch (meter->state) {
    case store::MeterState::compromised: return {MeterRefusal::meter_revoked, nullptr};
    case store::MeterState::quarantined: return {MeterRefusal::meter_quarantined, nullptr};
    case store::MeterState::active: break;
  }
  const store::KeySlot* s = meter->active_slot();
  if (s == nullptr || s->slot < 0 || s->slot > 127) return {MeterRefusal::no_active_key, nullptr};
  return {MeterRefusal::none, s};
}

c1222::ApTitle calling_title_for(const c1222::Message& request, const CommandParams& params) {
  return request.calling_ap_title ? *request.calling_ap_title : params.head_end_title;
}

Result<Bytes> secure_command(const c1222::Message& request, const store::Meter& meter,
                             const CommandParams& params, Signer& signer,
                             c1222::EaxPrime& meter_key, std::uint8_t meter_key_id) {
  GS_TRY(check_params(params));
  if (meter_key_id > 127) return {Errc::invalid_argument, "key id above 127"};
  if (!request.called_ap_title) return {Errc::missing_element, "request without called AP title"};
  const Bytes called_abs = request.called_ap_title->absolute(base_of(params));
  if (called_abs != meter.ap_title) {
    return {Errc::invalid_argument, "request is not addressed to this meter"};
  }
  const c1222::ApTitle calling = calling_title_for(request, params);
  if (calling.oid.empty()) return {Errc::missing_element, "no calling AP title"};
  GS_ASSIGN(RequestBody rb, request_body(request));

  // Services as on the wire (length prefixes included), then the receipt read if needed.
  // split_services() consumed the whole body: it is exactly the services.
  const ByteView last = rb.services.back().bytes;
  Bytes following(rb.epsem.body.begin(), rb.epsem.body.end());
  const bool ends_with_receipt =
      last.size() == 3 && std::equal(last.begin(), last.end(), std::begin(kReceiptRead) + 1);
  if (needs_receipt(params.command_class) && !ends_with_receipt) {
    following.insert(following.end(), std::begin(kReceiptRead), std::end(kReceiptRead));
  }

  GS_ASSIGN(Bytes epsem, authorized_epsem(request, calling, rb, following, rb.epsem.control,
                                          params, signer));
  const Bytes a8 = ids::encode_id(params.invocation_id);
  c1222::Message out;
  out.called_ap_title = request.called_ap_title;
  out.calling_ap_title = calling;
  out.calling_ae_qualifier = request.calling_ae_qualifier;
  out.calling_ap_invocation_id = ByteView(a8);
  c1222::AuthValue av;
  av.key_id = meter_key_id;
  av.iv = std::array<std::uint8_t, c1222::kIvSize>{
      static_cast<std::uint8_t>(params.now >> 24), static_cast<std::uint8_t>(params.now >> 16),
      static_cast<std::uint8_t>(params.now >> 8), static_cast<std::uint8_t>(params.now)};
  out.auth = av;
  out.epsem = epsem;
  c1222::SealOptions so;
  so.base_oid = base_of(params);
  return c1222::seal(out, c1222::SecurityMode::encrypted, meter_key, so);
}

Result<Bytes> sign_broadcast(const c1222::Message& request, const CommandParams& params,
                             Signer& signer) {
  GS_TRY(check_params(params));
  if (params.command_class != c1222::CommandClass::demand_response) {
    return {Errc::invalid_argument, "a broadcast is class demand_response"};
  }
  if (!request.called_ap_title) return {Errc::missing_element, "request without called AP title"};
  const c1222::ApTitle calling = calling_title_for(request, params);
  if (calling.oid.empty()) return {Errc::missing_element, "no calling AP title"};
  GS_ASSIGN(RequestBody rb, request_body(request));
  const ByteView following = rb.epsem.body;
  const auto control = static_cast<std::uint8_t>(
      (rb.epsem.control & ~c1222::kEpsemResponseMask) | kResponseNever);
  GS_ASSIGN(Bytes epsem,
            authorized_epsem(request, calling, rb, following, control, params, signer));
  const Bytes a8 = ids::encode_id(params.invocation_id);
  c1222::Message out;
  out.called_ap_title = request.called_ap_title;
  out.calling_ap_title = calling;
  out.calling_ae_qualifier = request.calling_ae_qualifier;
  out.calling_ap_invocation_id = ByteView(a8);
  out.epsem = epsem;
  return c1222::encode(out);
}

}  // namespace gs::ses
