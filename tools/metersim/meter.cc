// The simulated meter: command verification (DESIGN §3.1), execution, signed answers.
#include "tools/metersim/meter.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <variant>

#include "c1222/security.h"
#include "c1222/services.h"
#include "src/host_aes.h"
#include "src/invocation_ids.h"

namespace gs::metersim {

namespace {

using c1222::CommandClass;

// P-256 group order n, big-endian.
constexpr std::array<std::uint8_t, 32> kOrder = {
    0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51};

constexpr double kPi = 3.14159265358979323846;
constexpr double kDay = 86400.0;
constexpr double kDailySwing = 0.4;  // power = base * (1 + swing * sin(...))
constexpr std::uint32_t kInterval = 900;

void put_le16(Bytes& out, std::uint16_t v) {
  out.push_back(static_cast<std::uint8_t>(v));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
}
void put_le32(Bytes& out, std::uint32_t v) {
  for (int s = 0; s < 32; s += 8) out.push_back(static_cast<std::uint8_t>(v >> s));
}

// Watt-seconds drawn in [t0, t1] by the load model (no relay logic).
double watt_seconds(const MeterRecord& r, double t0, double t1) {
  if (t1 <= t0) return 0.0;
  const double w = 2.0 * kPi / kDay;
  const double phi = 2.0 * r.phase_s;
  const double swing = kDailySwing / w * (std::cos(w * (t0 + phi)) - std::cos(w * (t1 + phi)));
  return static_cast<double>(r.base_power_w) * ((t1 - t0) + swing);
}

double power_at(const MeterRecord& r, std::uint32_t t) {
  const double w = 2.0 * kPi / kDay;
  return r.base_power_w * (1.0 + kDailySwing * std::sin(w * (t + 2.0 * r.phase_s)));
}

// Energy (Wh) drawn in [t0, t1] given the relay history the record knows: when disconnected,
// nothing after energy_since.
double interval_wh(const MeterRecord& r, std::uint32_t t0, std::uint32_t t1) {
  double end = t1;
  if (r.connected == 0) end = std::min<double>(end, r.energy_since);
  return watt_seconds(r, t0, end) / 3600.0;
}

Result<c1222::Digest> digest_of(ByteView data) {
  GS_ASSIGN(Sha256Digest d, sha256(data));
  c1222::Digest out{};
  std::copy(d.begin(), d.end(), out.begin());
  return out;
}

// One planned service of a verified command.
struct ReadTable {
  std::uint16_t table = 0;
  std::optional<std::pair<std::uint32_t, std::uint16_t>> range;  // partial: offset, count
};
struct Procedure {
  c1222::ProcedureRequest req;
};
struct KeyUpdateOp {
  c1222::KeyUpdate update;
};
struct ChallengeWrite {
  c1222::Challenge challenge{};
};
struct ReplaceKeyOp {
  // None when the write does not decode strictly (answered only after the revocation check).
  std::optional<c1222::CommandKeyReplacement> statement;
};
struct ReadReceipt {};
struct ReadChallengeAnswer {};
struct Answer {
  std::uint8_t code = c1222::kRespSns;  // a fixed error answer (unsupported service, ...)
};
using Action = std::variant<ReadTable, Procedure, KeyUpdateOp, ChallengeWrite, ReplaceKeyOp,
                            ReadReceipt, ReadChallengeAnswer, Answer>;

bool writes(ByteView service, std::uint16_t table) {
  return service.size() >= 3 && service[0] >= c1222::kSvcFullWrite &&
         service[0] <= c1222::kSvcPartialWriteOffset &&
         ((static_cast<std::uint16_t>(service[1]) << 8) | service[2]) == table;
}

// Maps one service to what the meter will do; `required` receives the class it needs.
Action plan(ByteView service, std::size_t offset, std::optional<CommandClass>* required) {
  c1222::ServiceOptions opt;
  opt.strict = true;
  opt.decode_procedures = true;
  opt.procedure_order = c1222::ByteOrder::little;
  if (writes(service, c1222::kTableKeyUpdate)) {
    *required = CommandClass::key_management;
    auto k = c1222::decode_key_update_service(service);
    if (!k.ok()) return Answer{c1222::kRespErr};
    return KeyUpdateOp{*k};
  }
  if (writes(service, c1222::kTableChallenge)) {
    *required = CommandClass::key_management;
    auto c = c1222::decode_challenge_write(service);
    if (!c.ok()) return Answer{c1222::kRespErr};
    return ChallengeWrite{*c};
  }
  if (writes(service, c1222::kTableCommandKeyReplacement)) {
    *required = CommandClass::key_management;
    auto r = c1222::decode_replacement_write(service);
    if (!r.ok()) return ReplaceKeyOp{std::nullopt};
    return ReplaceKeyOp{*r};
  }
  auto req = c1222::decode_request(service, offset, opt);
  if (!req.ok()) return Answer{c1222::kRespErr};
  if (auto* fr = std::get_if<c1222::FullReadRequest>(&*req)) {
    switch (fr->table.raw) {
      case kTableIdentity:
      case kTableProcResponse:
      case kTableCurrentRegs:
      case kTableLoadProfile:
        return ReadTable{fr->table.raw, std::nullopt};
      case c1222::kTableSignedReceipt:
        return ReadReceipt{};
      case c1222::kTableChallenge:
        return ReadChallengeAnswer{};
      default:
        return Answer{c1222::kRespIar};
    }
  }
  if (auto* pr = std::get_if<c1222::PartialReadOffsetRequest>(&*req)) {
    switch (pr->table.raw) {
      case kTableIdentity:
      case kTableProcResponse:
      case kTableCurrentRegs:
      case kTableLoadProfile:
        return ReadTable{pr->table.raw, std::make_pair(pr->offset, pr->count)};
      default:
        return Answer{c1222::kRespIar};
    }
  }
  if (auto* proc = std::get_if<c1222::ProcedureRequest>(&*req)) {
    if (!proc->manufacturer() && proc->number() == kProcRemoteConnect) {
      *required = CommandClass::connect_disconnect;
      return Procedure{*proc};
    }
    return Answer{c1222::kRespSns};
  }
  return Answer{c1222::kRespSns};
}

// Executes one MT-2044 statement (profile.h) and returns the service's answer; the trust slot
// and the sequence change only when it is ok. Codes: `sns` no gs-revocation key provisioned
// (the meter cannot authenticate any statement), `err` not a strict MT-2044 write, `isc` the
// signature does not verify with gs-revocation, `onp` sequence not above the last accepted one
// (replay or older statement) or no room for another key, `iar` key id held by the other slot,
// public key not on the curve, or the gs-revocation key itself offered as a command key.
std::uint8_t replace_command_key(MeterRecord& rec, TrustTable& trust, const HostEcKey* revocation,
                                 const std::optional<c1222::CommandKeyReplacement>& statement) {
  if (revocation == nullptr) return c1222::kRespSns;
  if (!statement) return c1222::kRespErr;
  const c1222::CommandKeyReplacement& st = *statement;
  auto digest = digest_of(c1222::replacement_signed_bytes(st));
  if (!digest.ok()) return c1222::kRespErr;
  if (!revocation->verify(*digest, st.signature).ok()) return c1222::kRespIsc;
  if (st.sequence <= rec.replacement_seq) return c1222::kRespOnp;
  GS_CHECK(st.trust_slot < kTrustSlots);  // decode_replacement_data refuses others
  const TrustEntry& other = rec.trust[st.trust_slot == 0 ? 1 : 0];
  if (other.present != 0 && other.key_id == st.key_id) return c1222::kRespIar;
  auto key = HostEcKey::from_public(st.public_key);
  if (!key.ok()) return c1222::kRespIar;
  // The roles stay apart: gs-revocation never signs commands (DESIGN §4).
  if (key->public_point() == revocation->public_point()) return c1222::kRespIar;
  auto index = trust.add(std::move(key).value());
  if (!index.ok()) return c1222::kRespOnp;
  rec.trust[st.trust_slot] = TrustEntry{1, st.key_id, *index};
  rec.replacement_seq = st.sequence;
  return c1222::kRespOk;
}

}  // namespace

std::string MeterRecord::serial_text() const {
  std::size_t n = 0;
  while (n < serial.size() && serial[n] != 0) ++n;
  return std::string(serial.data(), n);
}

Result<std::uint16_t> TrustTable::add(ByteView point65) {
  if (point65.size() != kEcPointSize) {
    return Result<std::uint16_t>(Errc::bad_length, "command key is not a 65-byte point");
  }
  GS_ASSIGN(HostEcKey k, HostEcKey::from_public(point65));
  return add(std::move(k));
}

Result<std::uint16_t> TrustTable::add(HostEcKey key) {
  std::lock_guard<std::mutex> lock(add_mutex_);
  const std::size_t n = size_.load(std::memory_order_relaxed);
  for (std::size_t i = 0; i < n; ++i) {
    if (keys_[i]->public_point() == key.public_point()) return static_cast<std::uint16_t>(i);
  }
  if (n >= kMaxTrustedKeys) {
    return Result<std::uint16_t>(Errc::too_large, "more than " + std::to_string(kMaxTrustedKeys) +
                                                      " command keys in one fleet");
  }
  keys_[n] = std::make_unique<const HostEcKey>(std::move(key));
  size_.store(n + 1, std::memory_order_release);  // publishes keys_[n] to lock-free readers
  return static_cast<std::uint16_t>(n);
}

bool valid_scalar(ByteView s) {
  if (s.size() != kOrder.size()) return false;
  if (std::all_of(s.begin(), s.end(), [](std::uint8_t b) { return b == 0; })) return false;
  return std::lexicographical_compare(s.begin(), s.end(), kOrder.begin(), kOrder.end());
}

Result<HostEcKey> meter_key(const MeterRecord& r) {
  return HostEcKey::from_private(r.private_scalar);
}

Result<Block> derive_slot_key(const MeterRecord& r, const HostEcKey& peer, std::uint8_t slot,
                              std::uint32_t key_version) {
  GS_ASSIGN(Bytes input, c1222::key_context_input(r.title_view(), slot, key_version));
  GS_ASSIGN(Block context, profile_key_context(input));
  GS_ASSIGN(HostEcKey own, meter_key(r));
  Block key{};
  GS_TRY(own.derive_profile_key(peer, context, key));
  return key;
}

std::uint64_t energy_at(const MeterRecord& r, std::uint32_t now) {
  if (r.connected == 0 || now <= r.energy_since) return r.energy_mwh;
  const double mwh = watt_seconds(r, r.energy_since, now) * 1000.0 / 3600.0;
  return r.energy_mwh + static_cast<std::uint64_t>(mwh);
}

void set_relay(MeterRecord& r, bool connected, std::uint32_t now) {
  r.energy_mwh = energy_at(r, now);
  r.energy_since = std::max(r.energy_since, now);
  r.connected = connected ? 1 : 0;
}

// ST-1: MANUFACTURER(4) ED_MODEL(8) HW_VERSION(1) HW_REVISION(1) FW_VERSION(1) FW_REVISION(1)
// MFG_SERIAL_NUMBER(16, space padded).
Bytes identity_table(const MeterRecord& r) {
  Bytes out;
  out.reserve(kIdentitySize);
  for (char c : std::string_view("GSIMMETERSIM")) out.push_back(static_cast<std::uint8_t>(c));
  out.insert(out.end(), {1, 0, 1, 0});
  const std::string s = r.serial_text();
  for (std::size_t i = 0; i < kSerialSize; ++i) {
    out.push_back(static_cast<std::uint8_t>(i < s.size() ? s[i] : ' '));
  }
  return out;
}

// ST-23 (simulator layout, little-endian): demand resets(1) | delivered Wh(4) | received Wh(4) |
// reactive varh(4) | max demand W(4) | present demand W(4) | reading time UTC(4) | relay(1).
Bytes current_registers(const MeterRecord& r, std::uint32_t now) {
  const std::uint64_t wh = energy_at(r, now) / 1000;
  Bytes out;
  out.reserve(kCurrentRegsSize);
  out.push_back(0);
  put_le32(out, static_cast<std::uint32_t>(wh));
  put_le32(out, 0);
  put_le32(out, static_cast<std::uint32_t>(wh / 4));
  put_le32(out, static_cast<std::uint32_t>(r.base_power_w * (1.0 + kDailySwing)));
  put_le32(out, r.connected != 0 ? static_cast<std::uint32_t>(power_at(r, now)) : 0U);
  put_le32(out, now);
  out.push_back(r.connected);
  return out;
}

// ST-64 (simulator layout, little-endian): interval minutes(1)=15 | intervals(1)=96 |
// end time UTC of the newest interval(4) | 96 x Wh(2), oldest first.
Bytes load_profile(const MeterRecord& r, std::uint32_t now) {
  const std::uint32_t end = now - now % kInterval;
  Bytes out;
  out.reserve(kLoadProfileSize);
  out.push_back(static_cast<std::uint8_t>(kInterval / 60));
  out.push_back(static_cast<std::uint8_t>(kLoadProfileIntervals));
  put_le32(out, end);
  for (std::size_t i = kLoadProfileIntervals; i > 0; --i) {
    const std::uint32_t t1 = end - static_cast<std::uint32_t>((i - 1) * kInterval);
    const std::uint32_t t0 = t1 >= kInterval ? t1 - kInterval : 0;
    const double wh = interval_wh(r, t0, t1);
    put_le16(out, static_cast<std::uint16_t>(std::clamp(wh, 0.0, 65535.0)));
  }
  return out;
}

namespace {

// ST-8: procedure(2, LE) | sequence(1) | result code(1) | relay state(1).
Bytes proc_response_table(const MeterRecord& r) {
  Bytes out;
  put_le16(out, r.last_proc);
  out.push_back(r.last_seq);
  out.push_back(r.last_result);
  out.push_back(r.connected);
  return out;
}

// Everything needed to answer one request.
class Exchange {
 public:
  Exchange(MeterRecord& rec, const c1222::Message& req, std::uint32_t now)
      : rec_(rec), req_(req), now_(now) {}

  // A refusal: one error code, secured when possible.
  MeterReply refuse(std::uint8_t code, std::string reason) {
    MeterReply r;
    r.outcome = Outcome::refused;
    r.code = code;
    r.reason = std::move(reason);
    const Bytes body = one_service(code);
    auto sealed = secured(body, rec_.active_slot);
    r.wire = sealed.ok() ? std::move(sealed).value() : plain(body);
    return r;
  }

  // The services of an executed command, secured under the (possibly new) active key.
  MeterReply executed(const Bytes& body) {
    MeterReply r;
    r.outcome = Outcome::executed;
    auto sealed = secured(body, rec_.active_slot);
    if (sealed.ok()) {
      r.wire = std::move(sealed).value();
    } else {
      r.code = c1222::kRespErr;
      r.reason = "cannot seal the response: " + sealed.error().message();
      r.wire = plain(one_service(c1222::kRespErr));
    }
    return r;
  }

 private:
  static Bytes one_service(std::uint8_t code) {
    Bytes body;
    const std::uint8_t s[1] = {code};
    c1222::append_service(body, ByteView(s, 1));
    return body;
  }

  // The response header: back to the caller, our own next invocation id.
  c1222::Message header(const Bytes& a8) const {
    c1222::Message m;
    if (req_.calling_ap_title) m.called_ap_title = *req_.calling_ap_title;
    m.called_ap_invocation_id = req_.calling_ap_invocation_id;
    m.calling_ap_title = req_.called_ap_title;
    m.calling_ap_invocation_id = ByteView(a8);
    return m;
  }

  Bytes next_id() {
    const std::uint32_t id = ids::id_for_counter(rec_.out_counter);
    ++rec_.out_counter;
    return ids::encode_id(id);
  }

  Result<Bytes> secured(const Bytes& body, std::uint8_t slot) {
    if (!req_.calling_ap_title || !req_.called_ap_title) {
      return Result<Bytes>(Errc::missing_element, "no AP title to answer to");
    }
    if (slot >= kKeySlots || rec_.slots[slot].installed == 0) {
      return Result<Bytes>(Errc::not_found, "no active key");
    }
    GS_ASSIGN(std::unique_ptr<HostAes> aes, HostAes::make(rec_.slots[slot].key));
    GS_ASSIGN(c1222::EaxPrime eax, c1222::EaxPrime::make(*aes));
    Bytes epsem{static_cast<std::uint8_t>(c1222::kEpsemReserved | c1222::kEpsemEdClassIncluded)};
    epsem.insert(epsem.end(), kEdClass.begin(), kEdClass.end());
    epsem.insert(epsem.end(), body.begin(), body.end());
    const Bytes a8 = next_id();
    c1222::Message m = header(a8);
    c1222::AuthValue av;
    av.key_id = slot;
    av.iv = std::array<std::uint8_t, c1222::kIvSize>{
        static_cast<std::uint8_t>(now_ >> 24), static_cast<std::uint8_t>(now_ >> 16),
        static_cast<std::uint8_t>(now_ >> 8), static_cast<std::uint8_t>(now_)};
    m.auth = av;
    m.epsem = epsem;
    return c1222::seal(m, c1222::SecurityMode::encrypted, eax);
  }

  // Mode 0 (when the request cannot be answered secured).
  Bytes plain(const Bytes& body) {
    Bytes epsem{c1222::kEpsemReserved};
    epsem.insert(epsem.end(), body.begin(), body.end());
    const Bytes a8 = next_id();
    c1222::Message m = header(a8);
    m.epsem = epsem;
    auto out = c1222::encode(m);
    GS_CHECK(out.ok());
    return std::move(out).value();
  }

  MeterRecord& rec_;
  const c1222::Message& req_;
  std::uint32_t now_;
};

}  // namespace

MeterReply Meter::handle(const c1222::Message& request, std::uint32_t now) {
  Exchange ex(rec_, request, now);
  using c1222::kRespSme;

  // --- 1. Security envelope: mode 2 under one of our keys, MAC good. ----------------------
  auto e = c1222::split_epsem(request.epsem, request.epsem_offset);
  if (!e.ok()) return ex.refuse(c1222::kRespErr, "EPSEM: " + e.error().message());
  if (c1222::security_mode(e->control) != c1222::SecurityMode::encrypted) {
    return ex.refuse(c1222::kRespIsc, "command not in security mode 2");
  }
  if (!request.auth || !request.auth->key_id || !request.auth->iv) {
    return ex.refuse(kRespSme, "no key id / IV");
  }
  const std::uint8_t key_id = *request.auth->key_id;
  if (key_id >= kKeySlots || rec_.slots[key_id].installed == 0) {
    return ex.refuse(kRespSme, "no key with id " + std::to_string(key_id));
  }
  auto aes = HostAes::make(rec_.slots[key_id].key);
  if (!aes.ok()) return ex.refuse(c1222::kRespErr, "AES: " + aes.error().message());
  auto eax = c1222::EaxPrime::make(**aes);
  if (!eax.ok()) return ex.refuse(c1222::kRespErr, "EAX': " + eax.error().message());
  auto opened = c1222::open(
      request, [&](std::uint8_t id) -> c1222::EaxPrime* { return id == key_id ? &*eax : nullptr; });
  if (!opened.ok()) return ex.refuse(kRespSme, "open: " + opened.error().message());
  auto clear = c1222::decode(opened->wire);
  if (!clear.ok()) return ex.refuse(c1222::kRespErr, "opened: " + clear.error().message());

  // --- 2. Signed authorization (MT-2040), before anything executes. ----------------------
  auto cmd = c1222::extract_authorization(*clear);
  if (!cmd.ok()) {
    const bool unsigned_cmd = cmd.error().code == Errc::missing_element;
    return ex.refuse(unsigned_cmd ? c1222::kRespIsc : kRespSme,
                     "MT-2040: " + cmd.error().message());
  }
  if (!clear->called_ap_title || clear->called_ap_title->absolute(c1222::default_base_oid()) !=
                                     Bytes(rec_.title_view().begin(), rec_.title_view().end())) {
    return ex.refuse(c1222::kRespUat, "command not addressed to this meter");
  }
  const c1222::SignedAuthorization& auth = cmd->authorization;
  const TrustEntry* trusted = nullptr;
  for (const TrustEntry& t : rec_.trust) {
    if (t.present != 0 && t.key_id == auth.signer_key_id && t.key_index < trust_.size()) {
      trusted = &t;
    }
  }
  if (trusted == nullptr) {
    return ex.refuse(kRespSme, "untrusted signer key id " + std::to_string(auth.signer_key_id));
  }
  if (auth.not_after < auth.not_before || auth.not_after - auth.not_before > kMaxWindow) {
    return ex.refuse(kRespSme, "validity window malformed or too long");
  }
  if (now < auth.not_before || now > auth.not_after) {
    return ex.refuse(kRespSme, "outside the validity window");
  }
  for (ReplayEntry& r : rec_.replay) {
    if (r.not_after != 0 && r.not_after < now) r = ReplayEntry{};  // window closed
  }
  for (const ReplayEntry& r : rec_.replay) {
    if (r.not_after != 0 && r.id == cmd->invocation_id) {
      return ex.refuse(kRespSme, "replay: invocation id already accepted");
    }
  }
  if (auth.not_after <= rec_.replay_floor) {
    return ex.refuse(c1222::kRespBsy, "replay table full: window ends at or before the floor");
  }
  auto digest = digest_of(cmd->signing_input);
  if (!digest.ok()) return ex.refuse(c1222::kRespErr, "hash: " + digest.error().message());
  auto verified = trust_.key(trusted->key_index).verify(*digest, auth.signature);
  if (!verified.ok()) return ex.refuse(kRespSme, "signature: " + verified.error().message());

  // Accepted: remember the id until its window closes (evicting the entry that closes first).
  ReplayEntry* slot = &rec_.replay[0];
  for (ReplayEntry& r : rec_.replay) {
    if (r.not_after == 0) {
      slot = &r;
      break;
    }
    if (r.not_after < slot->not_after) slot = &r;
  }
  if (slot->not_after != 0) rec_.replay_floor = std::max(rec_.replay_floor, slot->not_after);
  *slot = ReplayEntry{cmd->invocation_id, auth.not_after};

  // --- 3. Plan every service; refuse the whole command if its class does not cover one. ---
  auto spans = c1222::split_services(cmd->following);
  if (!spans.ok()) return ex.refuse(c1222::kRespErr, "services: " + spans.error().message());
  std::vector<Action> actions;
  actions.reserve(spans->size());
  for (const c1222::ServiceSpan& s : *spans) {
    std::optional<CommandClass> required;
    actions.push_back(plan(s.bytes, s.offset, &required));
    if (required && *required != auth.command_class) {
      return ex.refuse(c1222::kRespIsc,
                       std::string("service needs class ") + c1222::command_class_name(*required));
    }
  }

  // --- 4. Execute in order; responses are positional (the MT-2040 write answers ok). ------
  Bytes body;
  const std::uint8_t ok[1] = {c1222::kRespOk};
  c1222::append_service(body, ByteView(ok, 1));
  std::uint8_t result = c1222::kRespOk;  // first error code, for the receipt
  std::optional<c1222::Challenge> challenge;
  std::optional<HostEcKey> own;
  auto own_key = [&]() -> const HostEcKey* {
    if (!own) {
      auto k = meter_key(rec_);
      if (!k.ok()) return nullptr;
      own.emplace(std::move(k).value());
    }
    return &*own;
  };
  auto answer = [&](std::uint8_t code) {
    const std::uint8_t s[1] = {code};
    c1222::append_service(body, ByteView(s, 1));
    if (result == c1222::kRespOk) result = code;
  };
  auto answer_data = [&](ByteView data) {
    auto svc = c1222::encode_read_response(data);
    if (!svc.ok()) {
      answer(c1222::kRespErr);
      return;
    }
    c1222::append_service(body, *svc);
  };
  auto sign = [&](ByteView signed_bytes) -> std::optional<c1222::Signature> {
    const HostEcKey* k = own_key();
    auto d = digest_of(signed_bytes);
    if (k == nullptr || !d.ok()) return std::nullopt;
    auto s = k->sign(*d);
    if (!s.ok()) return std::nullopt;
    c1222::Signature out{};
    std::copy(s->begin(), s->end(), out.begin());
    return out;
  };

  for (const Action& a : actions) {
    if (const auto* rt = std::get_if<ReadTable>(&a)) {
      Bytes data;
      switch (rt->table) {
        case kTableIdentity:
          data = identity_table(rec_);
          break;
        case kTableProcResponse:
          data = proc_response_table(rec_);
          break;
        case kTableCurrentRegs:
          data = current_registers(rec_, now);
          break;
        default:
          data = load_profile(rec_, now);
          break;
      }
      if (rt->range) {
        const auto [off, count] = *rt->range;
        if (static_cast<std::size_t>(off) + count > data.size()) {
          answer(c1222::kRespIar);
          continue;
        }
        data = Bytes(data.begin() + off, data.begin() + off + count);
      }
      answer_data(data);
    } else if (const auto* p = std::get_if<Procedure>(&a)) {
      const ByteView params = p->req.params;
      rec_.last_proc = p->req.proc;
      rec_.last_seq = p->req.sequence;
      if (params.empty() || params.size() > 2 ||
          (params[0] != kActionConnect && params[0] != kActionDisconnect)) {
        rec_.last_result = 2;  // invalid parameter
        answer(c1222::kRespIar);
        continue;
      }
      set_relay(rec_, params[0] == kActionConnect, now);
      rec_.last_result = 0;
      answer(c1222::kRespOk);
    } else if (const auto* ku = std::get_if<KeyUpdateOp>(&a)) {
      const c1222::KeyUpdate& k = ku->update;
      if (k.target_slot >= kKeySlots) {
        answer(c1222::kRespIar);
        continue;
      }
      bool rollback = false;
      for (std::size_t i = 0; i < kKeySlots; ++i) {
        const KeySlotState& s = rec_.slots[i];
        if (s.installed == 0) continue;
        if (i == k.target_slot ? k.key_version < s.version : k.key_version <= s.version) {
          rollback = true;
        }
      }
      if (rollback) {
        answer(c1222::kRespOnp);
        continue;
      }
      auto peer = HostEcKey::from_public(k.ephemeral_public);
      if (!peer.ok()) {
        answer(c1222::kRespIar);
        continue;
      }
      auto key = derive_slot_key(rec_, *peer, k.target_slot, k.key_version);
      if (!key.ok()) {
        answer(c1222::kRespErr);
        continue;
      }
      KeySlotState& s = rec_.slots[k.target_slot];
      std::copy(key->begin(), key->end(), s.key.begin());
      secure_zero(key->data(), key->size());
      s.version = k.key_version;
      s.installed = 1;
      rec_.active_slot = k.target_slot;  // the answer already goes under the new key
      answer(c1222::kRespOk);
    } else if (const auto* cw = std::get_if<ChallengeWrite>(&a)) {
      challenge = cw->challenge;
      answer(c1222::kRespOk);
    } else if (const auto* rk = std::get_if<ReplaceKeyOp>(&a)) {
      answer(replace_command_key(rec_, trust_, revocation_, rk->statement));
    } else if (std::holds_alternative<ReadChallengeAnswer>(a)) {
      if (!challenge) {
        answer(c1222::kRespIsss);  // nothing to answer: no challenge written before
        continue;
      }
      c1222::ChallengeAnswer ca;
      ca.challenge = *challenge;
      ca.meter_time = now;
      auto sb = c1222::challenge_signed_bytes(rec_.title_view(), ca);
      std::optional<c1222::Signature> sig;
      if (sb.ok()) sig = sign(*sb);
      if (!sig) {
        answer(c1222::kRespErr);
        continue;
      }
      ca.signature = *sig;
      c1222::append_service(body, c1222::encode_challenge_answer_response(ca));
    } else if (std::holds_alternative<ReadReceipt>(a)) {
      c1222::SignedReceipt r;
      r.invocation_id = cmd->invocation_id;
      r.result = result;
      r.executed_at = now;
      r.command_digest = *digest;
      auto sb = c1222::receipt_signed_bytes(rec_.title_view(), r);
      std::optional<c1222::Signature> sig;
      if (sb.ok()) sig = sign(*sb);
      if (!sig) {
        answer(c1222::kRespErr);
        continue;
      }
      r.signature = *sig;
      c1222::append_service(body, c1222::encode_receipt_response(r));
    } else {
      answer(std::get<Answer>(a).code);
    }
  }
  return ex.executed(body);
}

}  // namespace gs::metersim
