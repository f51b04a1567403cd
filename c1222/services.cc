// EPSEM request and response services: bounded decoders (views into the input) and encoders.
#include "c1222/services.h"

#include <initializer_list>
#include <string>
#include <type_traits>

#include "c1222/ber.h"
#include "gridseal/overloaded.h"

namespace gs::c1222 {

namespace {

using gs::Overloaded;

constexpr std::size_t kMaxTableData = 0xFFFF;
constexpr std::uint32_t kMaxOffset = 0xFFFFFF;
constexpr std::size_t kLogonUserSize = 10;
constexpr std::size_t kPasswordSize = 20;

std::string hex2(std::uint8_t b) {
  static const char* digits = "0123456789abcdef";
  std::string s = "0x";
  s += digits[b >> 4];
  s += digits[b & 0x0F];
  return s;
}

// Fails with `truncated` at the reader position unless n bytes remain. A macro so that the
// description (often a concatenation) is only built when the check fails.
[[gnu::cold, gnu::noinline]] Error need_error(const Reader& r, std::size_t n,
                                              const std::string& what) {
  return Error(Errc::truncated,
               what + ": needs " + std::to_string(n) + " more byte(s), " +
                   std::to_string(r.remaining()) + " left",
               r.offset());
}
#define GS_NEED(r, n, what)                       \
  do {                                            \
    if ((r).remaining() < (n)) {                  \
      return need_error((r), (n), (what));        \
    }                                             \
  } while (0)

// Nothing may follow the last field.
Status finish(const Reader& r, const std::string& what) {
  if (!r.empty()) {
    return {Errc::trailing_data,
            what + ": " + std::to_string(r.remaining()) + " unexpected byte(s) after the last field",
            r.offset()};
  }
  return {};
}

std::uint8_t get_u8(Reader& r) { return *r.u8(); }        // after need()
std::uint16_t get_u16(Reader& r) { return *r.u16be(); }   // after need()
std::uint32_t get_u24(Reader& r) { return *r.u24be(); }   // after need()

// An id element: `06 len oid` (absolute) or `80 len rel-oid` (relative).
Result<ApTitle> read_id(Reader& r, const std::string& what) {
  GS_NEED(r, 2, what);
  std::size_t at = r.offset();
  std::uint8_t tag = r.peek();
  if (tag != 0x06 && tag != 0x80) {
    return {Errc::bad_tag, what + ": expected 06 or 80, found " + hex2(tag).substr(2), at};
  }
  GS_ASSIGN(Tlv t, r.tlv());
  bool relative = tag == 0x80;
  Status v = validate_oid(t.value, relative);
  if (!v.ok()) return {v.error().code, what + ": " + v.error().detail, at};
  return ApTitle{relative ? TitleForm::relative : TitleForm::absolute, t.value};
}

void write_id(Writer& w, const ApTitle& t) {
  w.tlv(t.form == TitleForm::relative ? 0x80 : 0x06, t.oid);
}

Status check_id(const ApTitle& t, const char* what) {
  Status v = validate_oid(t.oid, t.form == TitleForm::relative);
  if (!v.ok()) return {v.error().code, std::string(what) + ": " + v.error().detail};
  return {};
}

struct TableData {
  ByteView data;
  std::uint8_t checksum = 0;
  bool ok = true;
};

// `count(2) data checksum(1)`.
Result<TableData> read_table_data(Reader& r, const std::string& what, const ServiceOptions& opt) {
  GS_NEED(r, 2, what + " count");
  std::uint16_t count = get_u16(r);
  GS_NEED(r, std::size_t{count} + 1, what + " data of " + std::to_string(count) +
                                             " byte(s) + checksum");
  TableData d;
  d.data = *r.bytes(count);
  std::size_t at = r.offset();
  d.checksum = get_u8(r);
  d.ok = c1219_checksum(d.data) == d.checksum;
  if (!d.ok && opt.strict) {
    return {Errc::bad_checksum,
            what + ": checksum " + hex2(d.checksum) + ", data sums to " +
                hex2(c1219_checksum(d.data)),
            at};
  }
  return d;
}

Status write_table_data(Writer& w, ByteView data, const char* what) {
  if (data.size() > kMaxTableData) {
    return {Errc::too_large, std::string(what) + ": more than 65535 data bytes"};
  }
  w.u16be(static_cast<std::uint16_t>(data.size()));
  w.bytes(data);
  w.u8(c1219_checksum(data));
  return {};
}

Result<IndexList> read_indices(Reader& r, std::size_t n, const std::string& what) {
  GS_NEED(r, 2 * n, what + " " + std::to_string(n) + " index(es)");
  IndexList l;
  for (std::size_t i = 0; i < n; ++i) l.values[i] = get_u16(r);
  l.count = static_cast<std::uint8_t>(n);
  return l;
}

Status check_indices(const IndexList& l, const char* what) {
  if (l.count == 0 || l.count > kMaxIndices) {
    return {Errc::invalid_argument, std::string(what) + ": needs 1..9 indices"};
  }
  return {};
}

// Space-padded fixed-size text field.
Status write_padded(Writer& w, ByteView v, std::size_t size, const char* what) {
  if (v.size() > size) {
    return {Errc::too_large, std::string(what) + " longer than " + std::to_string(size) +
                                 " bytes"};
  }
  w.bytes(v);
  for (std::size_t i = v.size(); i < size; ++i) w.u8(' ');
  return {};
}

std::uint16_t load_proc(ByteView b, ByteOrder order) {
  return order == ByteOrder::little ? static_cast<std::uint16_t>(b[0] | (b[1] << 8))
                                    : static_cast<std::uint16_t>((b[0] << 8) | b[1]);
}

// --- requests --------------------------------------------------------------------------------

Result<Request> decode_request_body(std::uint8_t code, Reader& r, const ServiceOptions& opt) {
  const std::string name = request_code_name(code);
  switch (code) {
    case kSvcIdentify:
      GS_TRY(finish(r, name));
      return Request{IdentifyRequest{}};
    case kSvcTerminate:
      GS_TRY(finish(r, name));
      return Request{TerminateRequest{}};
    case kSvcDisconnect:
      GS_TRY(finish(r, name));
      return Request{DisconnectRequest{}};
    case kSvcDefaultRead:
      GS_TRY(finish(r, name));
      return Request{DefaultReadRequest{}};
    case kSvcLogoff:
      GS_TRY(finish(r, name));
      return Request{LogoffRequest{}};
    case kSvcDeregister:
    case kSvcResolve:
    case kSvcTrace: {
      GS_ASSIGN(ApTitle t, read_id(r, name + " ap-title"));
      GS_TRY(finish(r, name));
      if (code == kSvcDeregister) return Request{DeregisterRequest{t}};
      if (code == kSvcResolve) return Request{ResolveRequest{t}};
      return Request{TraceRequest{t}};
    }
    case kSvcRegister: {
      RegisterRequest q;
      GS_NEED(r, 2, name + " node-type and connection-type");
      q.node_type = get_u8(r);
      q.connection_type = get_u8(r);
      ByteView rest = r.rest();
      std::size_t used = 0;
      for (std::size_t g = 0;; ++g) {
        if (g == kMaxDeviceClassGroups) {
          return {Errc::too_large, name + ": device class longer than 4 groups", r.offset()};
        }
        GS_NEED(r, 4, name + " device-class");
        ByteView group = *r.bytes(4);
        used += 4;
        bool more = false;
        for (std::uint8_t b : group) more = more || (b & 0x80) != 0;
        if (!more) break;
      }
      q.device_class = rest.first(used);
      GS_ASSIGN(q.ap_title, read_id(r, name + " ap-title"));
      GS_ASSIGN(q.esn, read_id(r, name + " electronic-serial-number"));
      GS_NEED(r, 1, name + " native-address length");
      std::uint8_t alen = get_u8(r);
      GS_NEED(r, alen, name + " native-address");
      q.native_address = *r.bytes(alen);
      GS_NEED(r, 3, name + " registration-period");
      q.registration_period = get_u24(r);
      if (q.node_type & 0x80) {
        GS_NEED(r, 1, name + " domain-pattern length");
        std::uint8_t plen = get_u8(r);
        GS_NEED(r, plen, name + " domain-pattern");
        q.domain_pattern = *r.bytes(plen);
      }
      GS_TRY(finish(r, name));
      return Request{q};
    }
    case kSvcFullRead: {
      GS_NEED(r, 2, name + " table-id");
      FullReadRequest q{TableId{get_u16(r)}};
      GS_TRY(finish(r, name));
      return Request{q};
    }
    case kSvcPartialReadOffset: {
      GS_NEED(r, 7, name + " table-id, offset and count");
      PartialReadOffsetRequest q;
      q.table.raw = get_u16(r);
      q.offset = get_u24(r);
      q.count = get_u16(r);
      GS_TRY(finish(r, name));
      return Request{q};
    }
    case kSvcFullWrite: {
      GS_NEED(r, 2, name + " table-id");
      TableId table{get_u16(r)};
      GS_ASSIGN(TableData d, read_table_data(r, name, opt));
      GS_TRY(finish(r, name));
      if (opt.decode_procedures && table.raw == kProcedureTable && d.data.size() >= 3) {
        ProcedureRequest p;
        p.proc = load_proc(d.data, opt.procedure_order);
        p.sequence = d.data[2];
        p.params = d.data.subspan(3);
        p.checksum = d.checksum;
        p.checksum_ok = d.ok;
        return Request{p};
      }
      return Request{FullWriteRequest{table, d.data, d.checksum, d.ok}};
    }
    case kSvcPartialWriteOffset: {
      GS_NEED(r, 5, name + " table-id and offset");
      PartialWriteOffsetRequest q;
      q.table.raw = get_u16(r);
      q.offset = get_u24(r);
      GS_ASSIGN(TableData d, read_table_data(r, name, opt));
      GS_TRY(finish(r, name));
      q.data = d.data;
      q.checksum = d.checksum;
      q.checksum_ok = d.ok;
      return Request{q};
    }
    case kSvcLogon: {
      GS_NEED(r, 2 + kLogonUserSize + 2, name + " user-id, user and idle-timeout");
      LogonRequest q;
      q.user_id = get_u16(r);
      q.user = *r.bytes(kLogonUserSize);
      q.idle_timeout = get_u16(r);
      GS_TRY(finish(r, name));
      return Request{q};
    }
    case kSvcSecurity: {
      GS_NEED(r, kPasswordSize, name + " password");
      SecurityRequest q;
      q.password = *r.bytes(kPasswordSize);
      if (!r.empty()) {
        GS_NEED(r, 2, name + " user-id");
        q.user_id = get_u16(r);
      }
      GS_TRY(finish(r, name));
      return Request{q};
    }
    case kSvcAuthenticate: {
      GS_NEED(r, 1, name + " length");
      std::uint8_t len = get_u8(r);
      GS_NEED(r, len, name + " data");
      AuthenticateRequest q{*r.bytes(len)};
      GS_TRY(finish(r, name));
      return Request{q};
    }
    case kSvcWait: {
      GS_NEED(r, 1, name + " seconds");
      WaitRequest q{get_u8(r)};
      GS_TRY(finish(r, name));
      return Request{q};
    }
    default:
      break;
  }
  if (code > kSvcFullRead && code < kSvcFullRead + 10) {
    std::size_t n = code - kSvcFullRead;
    GS_NEED(r, 2, name + " table-id");
    PartialReadIndexRequest q;
    q.table.raw = get_u16(r);
    GS_ASSIGN(q.index, read_indices(r, n, name));
    GS_NEED(r, 2, name + " element-count");
    q.element_count = get_u16(r);
    GS_TRY(finish(r, name));
    return Request{q};
  }
  if (code > kSvcFullWrite && code < kSvcFullWrite + 10) {
    std::size_t n = code - kSvcFullWrite;
    GS_NEED(r, 2, name + " table-id");
    PartialWriteIndexRequest q;
    q.table.raw = get_u16(r);
    GS_ASSIGN(q.index, read_indices(r, n, name));
    GS_ASSIGN(TableData d, read_table_data(r, name, opt));
    GS_TRY(finish(r, name));
    q.data = d.data;
    q.checksum = d.checksum;
    q.checksum_ok = d.ok;
    return Request{q};
  }
  return Request{RawService{code, r.rest()}};
}

// --- responses -------------------------------------------------------------------------------

bool is_read_code(std::uint8_t c) {
  return c == kSvcFullRead || (c > kSvcFullRead && c < kSvcFullRead + 10) ||
         c == kSvcDefaultRead || c == kSvcPartialReadOffset;
}

Result<Response> decode_ok(Reader& r, std::optional<std::uint8_t> request,
                           const ServiceOptions& opt) {
  if (!request) {
    ByteView d = r.rest();
    if (d.size() >= 3 && ((std::size_t{d[0]} << 8) | d[1]) == d.size() - 3) {
      GS_ASSIGN(TableData t, read_table_data(r, "ok (read data)", opt));
      return Response{ReadResponse{t.data, t.checksum, t.ok}};
    }
    return Response{OkResponse{*r.bytes(r.remaining())}};
  }
  std::uint8_t q = *request;
  std::string name = std::string("ok to ") + request_code_name(q);
  if (is_read_code(q)) {
    GS_ASSIGN(TableData t, read_table_data(r, name, opt));
    GS_TRY(finish(r, name));
    return Response{ReadResponse{t.data, t.checksum, t.ok}};
  }
  switch (q) {
    case kSvcLogon: {
      GS_NEED(r, 2, name + " idle-timeout");
      LogonResponse p{get_u16(r)};
      GS_TRY(finish(r, name));
      return Response{p};
    }
    case kSvcIdentify: {
      GS_NEED(r, 3, name + " std, ver, rev");
      IdentifyResponse p;
      p.standard = get_u8(r);
      p.version = get_u8(r);
      p.revision = get_u8(r);
      for (std::size_t n = 0;; ++n) {
        GS_NEED(r, 1, name + " feature list end (00)");
        std::size_t at = r.offset();
        std::uint8_t tag = get_u8(r);
        if (tag == 0x00) break;
        if (n == kMaxIdentifyFeatures) {
          return {Errc::too_large, name + ": more than 16 features", at};
        }
        switch (tag) {
          case 0x04: {
            GS_ASSIGN(ApTitle t, read_id(r, name + " security-mechanism"));
            p.security_mechanisms.push_back(t);
            break;
          }
          case 0x05:
            GS_NEED(r, 1, name + " session-ctrl");
            p.session_ctrl = get_u8(r);
            break;
          case 0x06: {
            GS_ASSIGN(ApTitle t, read_id(r, name + " device-class"));
            p.device_class = t;
            break;
          }
          case 0x07: {
            GS_NEED(r, 1, name + " device-identity length");
            std::size_t len_at = r.offset();
            std::uint8_t len = get_u8(r);
            if (len == 0) {
              return {Errc::bad_length, name + ": device-identity length 0 (no format byte)",
                      len_at};
            }
            GS_NEED(r, len, name + " device-identity");
            p.identity_format = get_u8(r);
            p.identity = *r.bytes(len - 1u);
            break;
          }
          default:
            return {Errc::bad_value, name + ": unknown feature " + hex2(tag), at};
        }
      }
      GS_TRY(finish(r, name));
      return Response{p};
    }
    case kSvcResolve: {
      GS_NEED(r, 1, name + " address length");
      std::uint8_t len = get_u8(r);
      GS_NEED(r, len, name + " native address");
      ResolveResponse p{*r.bytes(len)};
      GS_TRY(finish(r, name));
      return Response{p};
    }
    case kSvcTrace: {
      TraceResponse p;
      while (!r.empty()) {
        if (p.titles.size() == kMaxTraceTitles) {
          return {Errc::too_large, name + ": more than 32 ap-titles", r.offset()};
        }
        GS_ASSIGN(ApTitle t, read_id(r, name + " ap-title"));
        p.titles.push_back(t);
      }
      return Response{p};
    }
    case kSvcRegister: {
      RegisterResponse p;
      GS_ASSIGN(p.ap_title, read_id(r, name + " ap-title"));
      GS_NEED(r, 6, name + " reg-delay, reg-period, reg-info");
      p.reg_delay = get_u16(r);
      p.reg_period = get_u24(r);
      p.reg_info = get_u8(r);
      GS_TRY(finish(r, name));
      return Response{p};
    }
    default:
      break;
  }
  // Writes, security, logoff, terminate, ... and unknown requests: a bare ok. Extra bytes
  // after an ok to a known request are an error; to an unknown request they are kept.
  bool known = std::string(request_code_name(q)) != "unknown";
  if (known) GS_TRY(finish(r, name));
  return Response{OkResponse{*r.bytes(r.remaining())}};
}

}  // namespace

// --- names -----------------------------------------------------------------------------------

const char* response_code_name(std::uint8_t code) noexcept {
  static const char* const names[] = {"ok",  "err", "sns",  "isc", "onp", "iar", "bsy",
                                      "dnr", "dlk", "rno",  "isss", "sme", "uat", "nett",
                                      "netr", "rqtl", "rstl", "sgnp", "sgerr"};
  if (code < sizeof(names) / sizeof(names[0])) return names[code];
  return "unknown";
}

const char* request_code_name(std::uint8_t code) noexcept {
  switch (code) {
    case kSvcIdentify: return "identify";
    case kSvcTerminate: return "terminate";
    case kSvcDisconnect: return "disconnect";
    case kSvcDeregister: return "deregister";
    case kSvcResolve: return "resolve";
    case kSvcTrace: return "trace";
    case kSvcRegister: return "register";
    case kSvcFullRead: return "full-read";
    case kSvcDefaultRead: return "default-read";
    case kSvcPartialReadOffset: return "partial-read-offset";
    case kSvcFullWrite: return "full-write";
    case kSvcPartialWriteOffset: return "partial-write-offset";
    case kSvcLogon: return "logon";
    case kSvcSecurity: return "security";
    case kSvcLogoff: return "logoff";
    case kSvcAuthenticate: return "authenticate";
    case kSvcWait: return "wait";
    default: break;
  }
  if (code > kSvcFullRead && code < kSvcFullRead + 10) return "partial-read-index";
  if (code > kSvcFullWrite && code < kSvcFullWrite + 10) return "partial-write-index";
  return "unknown";
}

std::string TableId::name() const {
  std::string s = manufacturer() ? "MT-" : "ST-";
  s += std::to_string(number());
  if (pending()) s += " pending";
  if (user_defined()) s += " user";
  return s;
}

IndexList IndexList::of(std::initializer_list<std::uint16_t> v) {
  IndexList l;
  for (std::uint16_t x : v) {
    if (l.count == kMaxIndices) break;
    l.values[l.count++] = x;
  }
  return l;
}

std::uint8_t request_code(const Request& r) noexcept {
  return std::visit(
      Overloaded{
          [](const IdentifyRequest&) { return kSvcIdentify; },
          [](const TerminateRequest&) { return kSvcTerminate; },
          [](const DisconnectRequest&) { return kSvcDisconnect; },
          [](const DeregisterRequest&) { return kSvcDeregister; },
          [](const ResolveRequest&) { return kSvcResolve; },
          [](const TraceRequest&) { return kSvcTrace; },
          [](const RegisterRequest&) { return kSvcRegister; },
          [](const FullReadRequest&) { return kSvcFullRead; },
          [](const PartialReadIndexRequest& q) {
            return static_cast<std::uint8_t>(kSvcFullRead + q.index.count);
          },
          [](const DefaultReadRequest&) { return kSvcDefaultRead; },
          [](const PartialReadOffsetRequest&) { return kSvcPartialReadOffset; },
          [](const FullWriteRequest&) { return kSvcFullWrite; },
          [](const PartialWriteIndexRequest& q) {
            return static_cast<std::uint8_t>(kSvcFullWrite + q.index.count);
          },
          [](const PartialWriteOffsetRequest&) { return kSvcPartialWriteOffset; },
          [](const ProcedureRequest&) { return kSvcFullWrite; },
          [](const LogonRequest&) { return kSvcLogon; },
          [](const SecurityRequest&) { return kSvcSecurity; },
          [](const LogoffRequest&) { return kSvcLogoff; },
          [](const AuthenticateRequest&) { return kSvcAuthenticate; },
          [](const WaitRequest&) { return kSvcWait; },
          [](const RawService& s) { return s.code; },
      },
      r);
}

std::uint8_t response_code(const Response& r) noexcept {
  return std::visit(Overloaded{
                        [](const ErrorResponse& e) { return e.code; },
                        [](const RawService& s) { return s.code; },
                        [](const auto&) { return kRespOk; },
                    },
                    r);
}

// --- decode ----------------------------------------------------------------------------------

Result<Request> decode_request(ByteView service, std::size_t origin, const ServiceOptions& opt) {
  Reader r(service, origin);
  if (r.empty()) return {Errc::truncated, "empty service (no code byte)", origin};
  std::uint8_t code = get_u8(r);
  if (is_response_code(code)) {
    return {Errc::bad_value, "response code " + hex2(code) + " where a request was expected",
            origin};
  }
  return decode_request_body(code, r, opt);
}

Result<Response> decode_response(ByteView service, std::optional<std::uint8_t> request,
                                 std::size_t origin, const ServiceOptions& opt) {
  Reader r(service, origin);
  if (r.empty()) return {Errc::truncated, "empty service (no code byte)", origin};
  std::uint8_t code = get_u8(r);
  if (!is_response_code(code)) {
    return {Errc::bad_value, "request code " + hex2(code) + " where a response was expected",
            origin};
  }
  if (code == kRespOk) return decode_ok(r, request, opt);
  if (code > kRespSgerr) return Response{RawService{code, r.rest()}};
  ErrorResponse e;
  e.code = code;
  if (code == kRespRqtl || code == kRespRstl) {
    GS_NEED(r, 4, std::string(response_code_name(code)) + " maximum size");
    e.max_size = *r.u32be();
  }
  e.data = *r.bytes(r.remaining());
  return Response{e};
}

Result<std::vector<DecodedService>> decode_services(const std::vector<ServiceSpan>& spans,
                                                    std::span<const std::uint8_t> request_codes,
                                                    const ServiceOptions& opt) {
  std::vector<DecodedService> out;
  out.reserve(spans.size());
  for (std::size_t i = 0; i < spans.size(); ++i) {
    const ServiceSpan& s = spans[i];
    if (s.bytes.empty()) return {Errc::truncated, "empty service", s.offset};
    DecodedService d;
    d.offset = s.offset;
    d.bytes = s.bytes;
    if (is_response_code(s.bytes[0])) {
      std::optional<std::uint8_t> q;
      if (i < request_codes.size()) q = request_codes[i];
      GS_ASSIGN(Response v, decode_response(s.bytes, q, s.offset, opt));
      d.value = std::move(v);
    } else {
      GS_ASSIGN(Request v, decode_request(s.bytes, s.offset, opt));
      d.value = std::move(v);
    }
    out.push_back(std::move(d));
  }
  return out;
}

// --- encode ----------------------------------------------------------------------------------

Status encode_request(const Request& req, Bytes& out, const ServiceOptions& opt) {
  Bytes buf;
  Writer w(buf);
  w.u8(request_code(req));
  Status st = std::visit(
      Overloaded{
          [](const IdentifyRequest&) -> Status { return {}; },
          [](const TerminateRequest&) -> Status { return {}; },
          [](const DisconnectRequest&) -> Status { return {}; },
          [](const DefaultReadRequest&) -> Status { return {}; },
          [](const LogoffRequest&) -> Status { return {}; },
          [&](const DeregisterRequest& q) -> Status {
            GS_TRY(check_id(q.title, "deregister ap-title"));
            write_id(w, q.title);
            return {};
          },
          [&](const ResolveRequest& q) -> Status {
            GS_TRY(check_id(q.title, "resolve ap-title"));
            write_id(w, q.title);
            return {};
          },
          [&](const TraceRequest& q) -> Status {
            GS_TRY(check_id(q.title, "trace ap-title"));
            write_id(w, q.title);
            return {};
          },
          [&](const RegisterRequest& q) -> Status {
            if (q.device_class.empty() || q.device_class.size() % 4 != 0 ||
                q.device_class.size() > 4 * kMaxDeviceClassGroups) {
              return {Errc::invalid_argument, "register: device class must be 4..16 bytes, x4"};
            }
            GS_TRY(check_id(q.ap_title, "register ap-title"));
            GS_TRY(check_id(q.esn, "register esn"));
            if (q.native_address.size() > 255) {
              return {Errc::too_large, "register: native address above 255 bytes"};
            }
            if (q.registration_period > kMaxOffset) {
              return {Errc::too_large, "register: registration period above 24 bits"};
            }
            bool pattern_flag = (q.node_type & 0x80) != 0;
            if (pattern_flag != q.domain_pattern.has_value()) {
              return {Errc::invalid_argument,
                      "register: node-type bit 7 must match the domain pattern's presence"};
            }
            if (q.domain_pattern && q.domain_pattern->size() > 255) {
              return {Errc::too_large, "register: domain pattern above 255 bytes"};
            }
            w.u8(q.node_type);
            w.u8(q.connection_type);
            w.bytes(q.device_class);
            write_id(w, q.ap_title);
            write_id(w, q.esn);
            w.u8(static_cast<std::uint8_t>(q.native_address.size()));
            w.bytes(q.native_address);
            w.u24be(q.registration_period);
            if (q.domain_pattern) {
              w.u8(static_cast<std::uint8_t>(q.domain_pattern->size()));
              w.bytes(*q.domain_pattern);
            }
            return {};
          },
          [&](const FullReadRequest& q) -> Status {
            w.u16be(q.table.raw);
            return {};
          },
          [&](const PartialReadIndexRequest& q) -> Status {
            GS_TRY(check_indices(q.index, "partial-read-index"));
            w.u16be(q.table.raw);
            for (std::uint16_t i : q.index.view()) w.u16be(i);
            w.u16be(q.element_count);
            return {};
          },
          [&](const PartialReadOffsetRequest& q) -> Status {
            if (q.offset > kMaxOffset) {
              return {Errc::too_large, "partial-read-offset: offset above 24 bits"};
            }
            w.u16be(q.table.raw);
            w.u24be(q.offset);
            w.u16be(q.count);
            return {};
          },
          [&](const FullWriteRequest& q) -> Status {
            w.u16be(q.table.raw);
            return write_table_data(w, q.data, "full-write");
          },
          [&](const PartialWriteIndexRequest& q) -> Status {
            GS_TRY(check_indices(q.index, "partial-write-index"));
            w.u16be(q.table.raw);
            for (std::uint16_t i : q.index.view()) w.u16be(i);
            return write_table_data(w, q.data, "partial-write-index");
          },
          [&](const PartialWriteOffsetRequest& q) -> Status {
            if (q.offset > kMaxOffset) {
              return {Errc::too_large, "partial-write-offset: offset above 24 bits"};
            }
            w.u16be(q.table.raw);
            w.u24be(q.offset);
            return write_table_data(w, q.data, "partial-write-offset");
          },
          [&](const ProcedureRequest& q) -> Status {
            if (q.params.size() > kMaxTableData - 3) {
              return {Errc::too_large, "procedure: parameters above 65532 bytes"};
            }
            Bytes data;
            if (opt.procedure_order == ByteOrder::little) {
              data.push_back(static_cast<std::uint8_t>(q.proc));
              data.push_back(static_cast<std::uint8_t>(q.proc >> 8));
            } else {
              data.push_back(static_cast<std::uint8_t>(q.proc >> 8));
              data.push_back(static_cast<std::uint8_t>(q.proc));
            }
            data.push_back(q.sequence);
            data.insert(data.end(), q.params.begin(), q.params.end());
            w.u16be(kProcedureTable);
            return write_table_data(w, data, "procedure");
          },
          [&](const LogonRequest& q) -> Status {
            w.u16be(q.user_id);
            GS_TRY(write_padded(w, q.user, kLogonUserSize, "logon user"));
            w.u16be(q.idle_timeout);
            return {};
          },
          [&](const SecurityRequest& q) -> Status {
            GS_TRY(write_padded(w, q.password, kPasswordSize, "security password"));
            if (q.user_id) w.u16be(*q.user_id);
            return {};
          },
          [&](const AuthenticateRequest& q) -> Status {
            if (q.data.size() > 255) {
              return {Errc::too_large, "authenticate: data above 255 bytes"};
            }
            w.u8(static_cast<std::uint8_t>(q.data.size()));
            w.bytes(q.data);
            return {};
          },
          [&](const WaitRequest& q) -> Status {
            w.u8(q.seconds);
            return {};
          },
          [&](const RawService& s) -> Status {
            if (is_response_code(s.code)) {
              return {Errc::invalid_argument, "raw request with a response code"};
            }
            w.bytes(s.data);
            return {};
          },
      },
      req);
  if (!st.ok()) return st;
  out.insert(out.end(), buf.begin(), buf.end());
  return {};
}

Status encode_response(const Response& resp, Bytes& out) {
  Bytes buf;
  Writer w(buf);
  w.u8(response_code(resp));
  Status st = std::visit(
      Overloaded{
          [&](const OkResponse& p) -> Status {
            w.bytes(p.data);
            return {};
          },
          [&](const ReadResponse& p) -> Status {
            return write_table_data(w, p.data, "read response");
          },
          [&](const LogonResponse& p) -> Status {
            w.u16be(p.idle_timeout);
            return {};
          },
          [&](const IdentifyResponse& p) -> Status {
            if (p.security_mechanisms.size() + (p.session_ctrl ? 1 : 0) +
                    (p.device_class ? 1 : 0) + (p.identity ? 1 : 0) >
                kMaxIdentifyFeatures) {
              return {Errc::too_large, "identify response: more than 16 features"};
            }
            w.u8(p.standard);
            w.u8(p.version);
            w.u8(p.revision);
            for (const ApTitle& t : p.security_mechanisms) {
              GS_TRY(check_id(t, "identify security mechanism"));
              w.u8(0x04);
              write_id(w, t);
            }
            if (p.session_ctrl) {
              w.u8(0x05);
              w.u8(*p.session_ctrl);
            }
            if (p.device_class) {
              GS_TRY(check_id(*p.device_class, "identify device class"));
              w.u8(0x06);
              write_id(w, *p.device_class);
            }
            if (p.identity) {
              if (p.identity->size() > 254) {
                return {Errc::too_large, "identify: device identity above 254 bytes"};
              }
              w.u8(0x07);
              w.u8(static_cast<std::uint8_t>(p.identity->size() + 1));
              w.u8(p.identity_format.value_or(0));
              w.bytes(*p.identity);
            }
            w.u8(0x00);
            return {};
          },
          [&](const ResolveResponse& p) -> Status {
            if (p.native_address.size() > 255) {
              return {Errc::too_large, "resolve: native address above 255 bytes"};
            }
            w.u8(static_cast<std::uint8_t>(p.native_address.size()));
            w.bytes(p.native_address);
            return {};
          },
          [&](const TraceResponse& p) -> Status {
            if (p.titles.size() > kMaxTraceTitles) {
              return {Errc::too_large, "trace: more than 32 ap-titles"};
            }
            for (const ApTitle& t : p.titles) {
              GS_TRY(check_id(t, "trace ap-title"));
              write_id(w, t);
            }
            return {};
          },
          [&](const RegisterResponse& p) -> Status {
            GS_TRY(check_id(p.ap_title, "register response ap-title"));
            if (p.reg_period > kMaxOffset) {
              return {Errc::too_large, "register response: period above 24 bits"};
            }
            write_id(w, p.ap_title);
            w.u16be(p.reg_delay);
            w.u24be(p.reg_period);
            w.u8(p.reg_info);
            return {};
          },
          [&](const ErrorResponse& p) -> Status {
            if (p.code == kRespOk || p.code > kRespSgerr) {
              return {Errc::invalid_argument, "error response code must be 0x01..0x12"};
            }
            bool sized = p.code == kRespRqtl || p.code == kRespRstl;
            if (sized != p.max_size.has_value()) {
              return {Errc::invalid_argument, "maximum size goes with rqtl/rstl only"};
            }
            if (p.max_size) w.u32be(*p.max_size);
            w.bytes(p.data);
            return {};
          },
          [&](const RawService& s) -> Status {
            if (!is_response_code(s.code)) {
              return {Errc::invalid_argument, "raw response with a request code"};
            }
            w.bytes(s.data);
            return {};
          },
      },
      resp);
  if (!st.ok()) return st;
  out.insert(out.end(), buf.begin(), buf.end());
  return {};
}

}  // namespace gs::c1222
