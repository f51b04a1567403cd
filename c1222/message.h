// The C12.22 ACSE PDU (PROTOCOL.md §2): decode from and encode to wire bytes.
#pragma once

#include <array>
#include <optional>

#include "c1222/oid.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::c1222 {

inline constexpr std::uint8_t kTagMessage = 0x60;
inline constexpr std::uint8_t kTagAsoContext = 0xA1;
inline constexpr std::uint8_t kTagCalledApTitle = 0xA2;
inline constexpr std::uint8_t kTagCalledApInvocationId = 0xA4;
inline constexpr std::uint8_t kTagCallingApTitle = 0xA6;
inline constexpr std::uint8_t kTagCallingAeQualifier = 0xA7;
inline constexpr std::uint8_t kTagCallingApInvocationId = 0xA8;
inline constexpr std::uint8_t kTagMechanismName = 0x8B;
inline constexpr std::uint8_t kTagCallingAuthValue = 0xAC;
inline constexpr std::uint8_t kTagUserInformation = 0xBE;

// Default cap on a whole message (DESIGN §2).
inline constexpr std::size_t kDefaultMaxMessage = 8 * 1024;

// EPSEM control byte (PROTOCOL.md §3.1).
inline constexpr std::uint8_t kEpsemReserved = 0x80;
inline constexpr std::uint8_t kEpsemRecoverySession = 0x40;
inline constexpr std::uint8_t kEpsemProxyServiceUsed = 0x20;
inline constexpr std::uint8_t kEpsemEdClassIncluded = 0x10;
inline constexpr std::uint8_t kEpsemSecurityMask = 0x0C;
inline constexpr std::uint8_t kEpsemResponseMask = 0x03;

enum class SecurityMode : std::uint8_t { cleartext = 0, authenticated = 1, encrypted = 2 };
inline SecurityMode security_mode(std::uint8_t control) {
  return static_cast<SecurityMode>((control & kEpsemSecurityMask) >> 2);
}

inline constexpr std::size_t kMacSize = 4;
inline constexpr std::size_t kIvSize = 4;
inline constexpr std::size_t kEdClassSize = 4;

// calling-authentication-value with C12.22 security (key id + IV), PROTOCOL.md §2.4.
struct AuthValue {
  std::optional<std::uint8_t> key_id;
  std::optional<std::array<std::uint8_t, kIvSize>> iv;
};

// A decoded message. Every view points into the decoded buffer (decode) or into buffers the
// caller keeps alive (encode). Integers are INTEGER contents as received.
struct Message {
  std::optional<ByteView> aso_context;           // A1: absolute OID content
  std::optional<ApTitle> called_ap_title;        // A2
  std::optional<ByteView> called_ap_invocation_id;  // A4: INTEGER content
  std::optional<ApTitle> calling_ap_title;       // A6
  std::optional<ByteView> calling_ae_qualifier;  // A7: INTEGER content
  std::optional<ByteView> calling_ap_invocation_id;  // A8: INTEGER content (required)
  std::optional<ByteView> mechanism_name;        // 8B: OID content
  std::optional<AuthValue> auth;                 // AC
  ByteView epsem;  // the octet string of user-information: control byte .. [MAC]

  // Filled by decode() only: raw bytes the canonified cleartext re-uses. encode() writes
  // raw_auth_value back as it is when set (clear it after changing `auth`).
  ByteView raw_auth_value;   // content of AC as received (empty when absent)
  ByteView raw_user_info_header;  // "BE L1 28 L2 81 L3" as received
  std::size_t epsem_offset = 0;   // offset of the EPSEM control byte in the message
};

struct DecodeLimits {
  std::size_t max_message = kDefaultMaxMessage;
};

// Decodes one whole message (exactly one PDU, no trailing bytes). Strict: elements must come in
// the order of PROTOCOL.md §2.1, at most once each; unknown elements, an indirect-reference in
// user-information, a missing A8 or user-information are errors naming the byte offset.
Result<Message> decode(ByteView wire, const DecodeLimits& limits = {});

// Where encode() put the parts the canonified cleartext re-uses.
struct EncodedLayout {
  std::size_t auth_value_offset = 0;  // content of AC
  std::size_t auth_value_size = 0;
  std::size_t user_info_offset = 0;   // the BE tag
  std::size_t epsem_offset = 0;       // the EPSEM control byte
};

// Encodes a message with minimal lengths in the canonical element order. The EPSEM is written
// as given. AC is written as A2{A0{A1{80 key-id, 81 iv}}} with the fields present.
// `epsem_tail` zero bytes are appended inside the EPSEM octet string (room for a MAC).
Result<Bytes> encode(const Message& m, EncodedLayout* layout = nullptr,
                     std::size_t epsem_tail = 0);

// The EPSEM fields after the control byte (PROTOCOL.md §3.2).
struct Epsem {
  std::uint8_t control = kEpsemReserved;
  std::optional<std::array<std::uint8_t, kEdClassSize>> ed_class;  // only when readable
  ByteView body;  // after control (and ED class when readable), before MAC. Mode 2: ciphertext
                  // of ED class + services (ed_class then stays empty).
  std::optional<std::array<std::uint8_t, kMacSize>> mac;  // modes 1 and 2
};
// Splits an EPSEM octet string; `origin` is its offset in the message, for error offsets.
Result<Epsem> split_epsem(ByteView epsem, std::size_t origin = 0);

// The services of a cleartext body (ED class removed): each view is code + data.
// At most kMaxServices, each non-empty; trailing bytes that do not form a service are an error.
inline constexpr std::size_t kMaxServices = 64;
struct ServiceSpan {
  ByteView bytes;        // code + data
  std::size_t offset = 0;  // of the code byte, in the message
};
Result<std::vector<ServiceSpan>> split_services(ByteView body, std::size_t origin = 0);
// Appends a service (length-prefixed) to an EPSEM body being built.
void append_service(Bytes& body, ByteView service);

}  // namespace gs::c1222
