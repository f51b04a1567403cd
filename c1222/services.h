// EPSEM request and response services (PROTOCOL.md §3.3, §3.4): typed decode and encode.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::c1222 {

// Request codes (PROTOCOL.md §3.3).
inline constexpr std::uint8_t kSvcIdentify = 0x20;
inline constexpr std::uint8_t kSvcTerminate = 0x21;
inline constexpr std::uint8_t kSvcDisconnect = 0x22;
inline constexpr std::uint8_t kSvcDeregister = 0x24;
inline constexpr std::uint8_t kSvcResolve = 0x25;
inline constexpr std::uint8_t kSvcTrace = 0x26;
inline constexpr std::uint8_t kSvcRegister = 0x27;
inline constexpr std::uint8_t kSvcFullRead = 0x30;
inline constexpr std::uint8_t kSvcPartialReadIndex1 = 0x31;  // .. 0x39: 1..9 indices
inline constexpr std::uint8_t kSvcDefaultRead = 0x3E;
inline constexpr std::uint8_t kSvcPartialReadOffset = 0x3F;
inline constexpr std::uint8_t kSvcFullWrite = 0x40;
inline constexpr std::uint8_t kSvcPartialWriteIndex1 = 0x41;  // .. 0x49: 1..9 indices
inline constexpr std::uint8_t kSvcPartialWriteOffset = 0x4F;
inline constexpr std::uint8_t kSvcLogon = 0x50;
inline constexpr std::uint8_t kSvcSecurity = 0x51;
inline constexpr std::uint8_t kSvcLogoff = 0x52;
inline constexpr std::uint8_t kSvcAuthenticate = 0x53;
inline constexpr std::uint8_t kSvcWait = 0x70;

// Response codes (PROTOCOL.md §3.4).
inline constexpr std::uint8_t kRespOk = 0x00;
inline constexpr std::uint8_t kRespErr = 0x01;
inline constexpr std::uint8_t kRespSns = 0x02;
inline constexpr std::uint8_t kRespIsc = 0x03;
inline constexpr std::uint8_t kRespOnp = 0x04;
inline constexpr std::uint8_t kRespIar = 0x05;
inline constexpr std::uint8_t kRespBsy = 0x06;
inline constexpr std::uint8_t kRespDnr = 0x07;
inline constexpr std::uint8_t kRespDlk = 0x08;
inline constexpr std::uint8_t kRespRno = 0x09;
inline constexpr std::uint8_t kRespIsss = 0x0A;
inline constexpr std::uint8_t kRespSme = 0x0B;
inline constexpr std::uint8_t kRespUat = 0x0C;
inline constexpr std::uint8_t kRespNett = 0x0D;
inline constexpr std::uint8_t kRespNetr = 0x0E;
inline constexpr std::uint8_t kRespRqtl = 0x0F;
inline constexpr std::uint8_t kRespRstl = 0x10;
inline constexpr std::uint8_t kRespSgnp = 0x11;
inline constexpr std::uint8_t kRespSgerr = 0x12;

// Codes below 0x20 are responses, 0x20 and above requests.
inline constexpr bool is_response_code(std::uint8_t code) noexcept { return code < 0x20; }

// "ok", "err", "sns", ... "sgerr"; "unknown" for any other byte.
const char* response_code_name(std::uint8_t code) noexcept;
// "identify", "full-read", "partial-read-index", ... "wait"; "unknown" for any other byte.
const char* request_code_name(std::uint8_t code) noexcept;

// A C12.19 table id as on the wire (PROTOCOL.md §3.3): the full 16 bits are kept.
struct TableId {
  static constexpr std::uint16_t kNumberMask = 0x07FF;
  static constexpr std::uint16_t kManufacturer = 0x0800;
  static constexpr std::uint16_t kPending = 0x1000;
  static constexpr std::uint16_t kUser = 0x2000;

  std::uint16_t raw = 0;

  std::uint16_t number() const noexcept { return raw & kNumberMask; }
  bool manufacturer() const noexcept { return (raw & kManufacturer) != 0; }
  bool pending() const noexcept { return (raw & kPending) != 0; }
  bool user_defined() const noexcept { return (raw & kUser) != 0; }
  // "ST-7", "MT-2040", with " pending" / " user" appended when those bits are set.
  std::string name() const;

  static TableId standard(std::uint16_t n) { return {static_cast<std::uint16_t>(n & kNumberMask)}; }
  static TableId mfg(std::uint16_t n) {
    return {static_cast<std::uint16_t>((n & kNumberMask) | kManufacturer)};
  }
  friend bool operator==(const TableId&, const TableId&) = default;
};

inline constexpr std::uint16_t kProcedureTable = 7;  // ST-7, procedure initiate

// 1..9 element indices of a partial read/write by index.
inline constexpr std::size_t kMaxIndices = 9;
struct IndexList {
  std::array<std::uint16_t, kMaxIndices> values{};
  std::uint8_t count = 0;

  std::span<const std::uint16_t> view() const { return {values.data(), count}; }
  static IndexList of(std::initializer_list<std::uint16_t> v);  // at most 9 kept
};

// --- requests ------------------------------------------------------------------------------

struct IdentifyRequest {};
struct TerminateRequest {};
struct DisconnectRequest {};
struct DeregisterRequest { ApTitle title; };
struct ResolveRequest { ApTitle title; };
struct TraceRequest { ApTitle title; };
// Field details are [unconfirmed] (ICSNPP): device class = 4-byte groups, another group
// following while any byte of the group has bit 7 set (at most kMaxDeviceClassGroups).
inline constexpr std::size_t kMaxDeviceClassGroups = 4;
struct RegisterRequest {
  std::uint8_t node_type = 0;        // bit 7: my-domain-pattern present
  std::uint8_t connection_type = 0;
  ByteView device_class;
  ApTitle ap_title;
  ApTitle esn;                        // electronic serial number, an id element
  ByteView native_address;            // at most 255 bytes
  std::uint32_t registration_period = 0;  // 24 bits, seconds
  std::optional<ByteView> domain_pattern;  // when node_type bit 7
};
struct FullReadRequest { TableId table; };
struct PartialReadIndexRequest {
  TableId table;
  IndexList index;  // 1..9, code = 0x30 + count
  std::uint16_t element_count = 0;
};
struct DefaultReadRequest {};
struct PartialReadOffsetRequest {
  TableId table;
  std::uint32_t offset = 0;  // 24 bits
  std::uint16_t count = 0;
};
// Table data of a write: `count(2) data checksum(1)`. Decode fills checksum as received and
// checksum_ok; encode always writes the correct checksum of data.
struct FullWriteRequest {
  TableId table;
  ByteView data;
  std::uint8_t checksum = 0;
  bool checksum_ok = true;
};
struct PartialWriteIndexRequest {
  TableId table;
  IndexList index;  // 1..9, code = 0x40 + count
  ByteView data;
  std::uint8_t checksum = 0;
  bool checksum_ok = true;
};
struct PartialWriteOffsetRequest {
  TableId table;
  std::uint32_t offset = 0;  // 24 bits
  ByteView data;
  std::uint8_t checksum = 0;
  bool checksum_ok = true;
};

// Byte order of the ST-7 procedure number (the device's data order, PROTOCOL.md §3.3).
enum class ByteOrder : std::uint8_t { little, big };

// A procedure call: a full write to ST-7 whose data is `proc(2) seq(1) params`.
struct ProcedureRequest {
  std::uint16_t proc = 0;  // host value (already converted from the wire byte order)
  std::uint8_t sequence = 0;
  ByteView params;
  std::uint8_t checksum = 0;
  bool checksum_ok = true;

  std::uint16_t number() const noexcept { return proc & 0x07FF; }
  bool manufacturer() const noexcept { return (proc & 0x0800) != 0; }
  // 0 post result in ST-8 on completion, 1 on exception, 2 never, 3 now and on completion.
  std::uint8_t response_selector() const noexcept {
    return static_cast<std::uint8_t>((proc >> 12) & 0x0F);
  }
  static std::uint16_t make(std::uint16_t number, bool mfg, std::uint8_t selector) {
    return static_cast<std::uint16_t>((number & 0x07FF) | (mfg ? 0x0800 : 0) |
                                      ((selector & 0x0F) << 12));
  }
};
struct LogonRequest {
  std::uint16_t user_id = 0;
  ByteView user;  // 10 bytes on the wire; encode pads shorter names with spaces
  std::uint16_t idle_timeout = 0;
};
struct SecurityRequest {
  ByteView password;  // 20 bytes on the wire; encode pads with spaces
  std::optional<std::uint16_t> user_id;
};
struct LogoffRequest {};
struct AuthenticateRequest { ByteView data; };  // len(1) data
struct WaitRequest { std::uint8_t seconds = 0; };

// A service whose code gridseal does not interpret: kept, never dropped.
struct RawService {
  std::uint8_t code = 0;
  ByteView data;  // after the code byte
};

using Request =
    std::variant<IdentifyRequest, TerminateRequest, DisconnectRequest, DeregisterRequest,
                 ResolveRequest, TraceRequest, RegisterRequest, FullReadRequest,
                 PartialReadIndexRequest, DefaultReadRequest, PartialReadOffsetRequest,
                 FullWriteRequest, PartialWriteIndexRequest, PartialWriteOffsetRequest,
                 ProcedureRequest, LogonRequest, SecurityRequest, LogoffRequest,
                 AuthenticateRequest, WaitRequest, RawService>;

// The wire code of a request (0x30 + n for partial reads by index, 0x40 for procedures, ...).
std::uint8_t request_code(const Request& r) noexcept;

// --- responses -----------------------------------------------------------------------------

// ok with no structure known for it (write, security, logoff, ... or unknown context).
struct OkResponse { ByteView data; };  // data normally empty
// ok to a read: `00 count(2) data checksum(1)`.
struct ReadResponse {
  ByteView data;
  std::uint8_t checksum = 0;
  bool checksum_ok = true;
};
struct LogonResponse { std::uint16_t idle_timeout = 0; };
// ok to identify: std ver rev, then features until 00 (PROTOCOL.md §3.3).
inline constexpr std::size_t kMaxIdentifyFeatures = 16;
struct IdentifyResponse {
  std::uint8_t standard = 0;
  std::uint8_t version = 0;
  std::uint8_t revision = 0;
  std::vector<ApTitle> security_mechanisms;  // feature 04 (id elements, at most 16 features)
  std::optional<std::uint8_t> session_ctrl;  // feature 05: bit 7 sessionless, bits 0-6 sessions
  std::optional<ApTitle> device_class;       // feature 06
  std::optional<std::uint8_t> identity_format;  // feature 07 <len> <format> <identity>
  std::optional<ByteView> identity;
};
struct ResolveResponse { ByteView native_address; };  // addr-len(1) address
inline constexpr std::size_t kMaxTraceTitles = 32;
struct TraceResponse { std::vector<ApTitle> titles; };
struct RegisterResponse {
  ApTitle ap_title;
  std::uint16_t reg_delay = 0;
  std::uint32_t reg_period = 0;  // 24 bits
  std::uint8_t reg_info = 0;
};
// Error codes 0x01..0x12. rqtl/rstl carry the peer's maximum size (4 bytes, big-endian);
// any other data after the code is kept in `data`.
struct ErrorResponse {
  std::uint8_t code = kRespErr;
  std::optional<std::uint32_t> max_size;
  ByteView data;
};

using Response = std::variant<OkResponse, ReadResponse, LogonResponse, IdentifyResponse,
                              ResolveResponse, TraceResponse, RegisterResponse, ErrorResponse,
                              RawService>;

std::uint8_t response_code(const Response& r) noexcept;

// --- decode / encode -----------------------------------------------------------------------

struct ServiceOptions {
  // Strict: a bad C12.19 checksum is an Errc::bad_checksum error instead of a flag.
  bool strict = false;
  // Full writes to ST-7 are decoded as ProcedureRequest (when they carry >= 3 data bytes).
  bool decode_procedures = true;
  ByteOrder procedure_order = ByteOrder::little;  // as Wireshark's default
};

// `service` is code + data (as from split_services); `origin` the offset of the code byte in
// the message, used in errors. Truncated or overlong services are errors naming the offset.
Result<Request> decode_request(ByteView service, std::size_t origin = 0,
                               const ServiceOptions& opt = {});
// A response service. `request` is the code of the request it answers (responses are
// positional); without it an ok whose data is exactly `count(2) data checksum` with a matching
// count decodes as ReadResponse, any other ok as OkResponse.
Result<Response> decode_response(ByteView service, std::optional<std::uint8_t> request = {},
                                 std::size_t origin = 0, const ServiceOptions& opt = {});

// Appends code + data (no service-length prefix: append_service adds it). Fails when a field
// does not fit its wire size (offset > 24 bits, data > 65535 bytes, 0 or > 9 indices, ...).
Status encode_request(const Request& r, Bytes& out, const ServiceOptions& opt = {});
Status encode_response(const Response& r, Bytes& out);

// One service of an EPSEM, decoded by direction: codes < 0x20 as responses (to
// request_codes[i] when given), others as requests.
struct DecodedService {
  std::size_t offset = 0;  // of the code byte
  ByteView bytes;          // code + data
  std::variant<Request, Response> value;
  bool is_response() const noexcept { return value.index() == 1; }
};
Result<std::vector<DecodedService>> decode_services(
    const std::vector<ServiceSpan>& spans, std::span<const std::uint8_t> request_codes = {},
    const ServiceOptions& opt = {});

}  // namespace gs::c1222
