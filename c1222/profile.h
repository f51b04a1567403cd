// gridseal command-signature profile (DESIGN §3): MT-2040..2043 codecs and signed byte strings.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"

// Sans-I/O: this module builds and parses the bytes that are hashed and signed; hashing,
// signing and key derivation happen in src/ (host_ecdsa.h) or in the HSM.
namespace gs::c1222 {

// Manufacturer tables of the profile (bit 0x0800 set).
inline constexpr std::uint16_t kTableSignedAuthorization = 0x0FF8;  // MT-2040
inline constexpr std::uint16_t kTableKeyUpdate = 0x0FF9;            // MT-2041
inline constexpr std::uint16_t kTableSignedReceipt = 0x0FFA;        // MT-2042
inline constexpr std::uint16_t kTableChallenge = 0x0FFB;            // MT-2043
inline constexpr std::uint16_t kTableCommandKeyReplacement = 0x0FFC;  // MT-2044 (gridseal v1)

inline constexpr std::uint8_t kProfileVersion = 1;
inline constexpr std::size_t kSignatureSize = 64;    // r || s, 32 bytes each
inline constexpr std::size_t kPublicPointSize = 65;  // 04 || X || Y
inline constexpr std::size_t kDigestSize = 32;       // SHA-256
inline constexpr std::size_t kChallengeSize = 16;

// C12.19 service codes used by the profile.
inline constexpr std::uint8_t kServiceFullRead = 0x30;
inline constexpr std::uint8_t kServicePartialWriteOffset = 0x4F;
inline constexpr std::uint8_t kResponseOk = 0x00;

using Signature = std::array<std::uint8_t, kSignatureSize>;
using PublicPoint = std::array<std::uint8_t, kPublicPointSize>;
using Digest = std::array<std::uint8_t, kDigestSize>;
using EdClass = std::array<std::uint8_t, kEdClassSize>;

// ---------------------------------------------------------------------------------------------
// Generic C12.19 table services (service = code + data, as split_services() returns them).

// `4F <table(2)> 000000 <count(2)> <data> <checksum>`. data.size() must be <= 0xFFFF.
Result<Bytes> encode_partial_write(std::uint16_t table, ByteView data);
// Parses a partial write at offset 0 of `table` with exactly `expected_count` data bytes and a
// correct checksum; returns the data. Nothing may follow the checksum.
Result<ByteView> decode_partial_write(ByteView service, std::uint16_t table,
                                      std::size_t expected_count);
// `30 <table(2)>`.
Bytes encode_full_read(std::uint16_t table);
// A read OK response `00 <count(2)> <data> <checksum>` with exactly `expected_count` data bytes.
// A non-zero response code gives Errc::bad_value naming it.
Result<ByteView> decode_read_response(ByteView service, std::size_t expected_count);
// `00 <count(2)> <data> <checksum>`.
Result<Bytes> encode_read_response(ByteView data);

// An invocation id (INTEGER content as received, any valid BER form) as an unsigned value.
// Negative values, empty content and values above 2^64-1 are refused.
Result<std::uint64_t> invocation_id_value(ByteView integer_content);

// ---------------------------------------------------------------------------------------------
// MT-2040 signed authorization (DESIGN §3.1).

enum class CommandClass : std::uint8_t {
  read = 0,
  write = 1,
  connect_disconnect = 2,
  demand_response = 3,
  key_management = 4,
  firmware = 5,
  time = 6,
};
inline constexpr std::uint8_t kMaxCommandClass = 6;
const char* command_class_name(CommandClass c) noexcept;
// Accepts the names command_class_name() returns ("read", "connect_disconnect", ...).
Result<CommandClass> parse_command_class(std::string_view name);

inline constexpr std::size_t kAuthorizationDataSize = 76;
inline constexpr std::size_t kAuthorizationSignedPrefixSize = 12;  // data before the signature
// Code + data: 4F 0FF8 000000 004C <76> <cksum> = 85 bytes (0x55). On the wire, with its
// service-length byte, 86 bytes.
inline constexpr std::size_t kAuthorizationServiceSize = 85;
inline constexpr std::size_t kAuthorizationWireSize = 86;

struct SignedAuthorization {
  std::uint8_t signer_key_id = 0;
  std::uint32_t not_before = 0;
  std::uint32_t not_after = 0;
  CommandClass command_class = CommandClass::read;
  Signature signature{};

  friend bool operator==(const SignedAuthorization&, const SignedAuthorization&) = default;
};

// The first 12 data bytes (version .. reserved): what the signature covers of the service.
std::array<std::uint8_t, kAuthorizationSignedPrefixSize> authorization_signed_prefix(
    const SignedAuthorization& a);
std::array<std::uint8_t, kAuthorizationDataSize> encode_authorization_data(
    const SignedAuthorization& a);
// Strict: 76 bytes, version 1, a known command class, reserved 0.
Result<SignedAuthorization> decode_authorization_data(ByteView data);
// Code + data (85 bytes), for append_service().
Bytes encode_authorization_service(const SignedAuthorization& a);
// The 86 wire bytes `55 4F 0F F8 ...` (service-length byte included).
Bytes encode_authorization_service_wire(const SignedAuthorization& a);
// From code + data (a ServiceSpan's bytes): exactly 85 bytes, 4F, table 0x0FF8, offset 0,
// count 76, checksum, then the data rules above.
Result<SignedAuthorization> decode_authorization_service(ByteView service);

// The fields the signing input binds, with AP titles already absolute (OID content).
struct SigningHeader {
  ByteView called_title;   // absolute OID content, 1..255 bytes
  ByteView calling_title;  // absolute OID content, 1..255 bytes
  std::uint64_t invocation_id = 0;
  std::optional<EdClass> ed_class;
};

// "GSA1" | L1 | called | L2 | calling | invocation id (8) | [ED class (4)] | first 12 data bytes |
// `following`: every plaintext EPSEM byte after the MT-2040 service (services with their
// length prefixes, as they are on the wire).
Result<Bytes> authorization_signing_input(const SigningHeader& h, const SignedAuthorization& a,
                                          ByteView following);

// For a command being constructed: titles as on the wire (relative ones converted with `base`,
// empty = default_base_oid()).
Result<Bytes> authorization_signing_input(const ApTitle& called, const ApTitle& calling,
                                          std::uint64_t invocation_id,
                                          const std::optional<EdClass>& ed_class,
                                          const SignedAuthorization& a, ByteView following,
                                          ByteView base = {});

// A cleartext EPSEM octet string `control [ED class] 55 <MT-2040> following` (mode 0, no MAC).
// The ED-class bit of `control` follows ed_class; its security bits are cleared.
Bytes build_authorized_epsem(std::uint8_t control, const std::optional<EdClass>& ed_class,
                             const SignedAuthorization& a, ByteView following);

// A command found in a cleartext message (mode 0, or the result of open()).
struct AuthorizedCommand {
  SignedAuthorization authorization;
  Bytes signing_input;
  ByteView following;  // the EPSEM bytes after the MT-2040 service (views into the message)
  std::uint64_t invocation_id = 0;
  std::optional<EdClass> ed_class;
  std::size_t service_offset = 0;  // of the 4F code byte, in the message
};

// Locates MT-2040 as the first service of a decoded mode-0 message and rebuilds its signing
// input. Requires the called and calling AP titles and A8. Errors: unsupported (not mode 0),
// missing_element (no title/A8, first service not MT-2040), bad_value (a second MT-2040, bad
// fields), bad_checksum, bad_length.
Result<AuthorizedCommand> extract_authorization(const Message& m, ByteView base = {});

// ---------------------------------------------------------------------------------------------
// MT-2041 key update (DESIGN §3.2).

inline constexpr std::size_t kKeyUpdateDataSize = 72;
inline constexpr std::uint8_t kKeyTypeAes128EaxPrime = 0;
inline constexpr std::size_t kKeyContextSize = 16;

struct KeyUpdate {
  std::uint8_t target_slot = 0;
  std::uint8_t key_type = kKeyTypeAes128EaxPrime;
  std::uint32_t key_version = 0;
  PublicPoint ephemeral_public{};

  friend bool operator==(const KeyUpdate&, const KeyUpdate&) = default;
};

std::array<std::uint8_t, kKeyUpdateDataSize> encode_key_update_data(const KeyUpdate& k);
// Strict: 72 bytes, version 1, key type 0 (others: unsupported), point prefix 04 (the point
// itself is validated by the ECDH code).
Result<KeyUpdate> decode_key_update_data(ByteView data);
// Code + data: 4F 0FF9 000000 0048 <72> <cksum> (81 bytes).
Bytes encode_key_update_service(const KeyUpdate& k);
Result<KeyUpdate> decode_key_update_service(ByteView service);

// "GSK1" | L | meter AP title (absolute OID content) | slot | key version (4). The context is
// the first 16 bytes of its SHA-256 (computed by the caller: this module has no hash).
Result<Bytes> key_context_input(ByteView meter_title_abs, std::uint8_t slot,
                                std::uint32_t key_version);

// ---------------------------------------------------------------------------------------------
// MT-2042 signed receipt (DESIGN §3.3).

inline constexpr std::size_t kReceiptDataSize = 110;
inline constexpr std::size_t kReceiptSignedDataSize = 46;

struct SignedReceipt {
  std::uint64_t invocation_id = 0;
  std::uint8_t result = 0;
  std::uint32_t executed_at = 0;
  Digest command_digest{};  // SHA-256 of the command's signing input
  Signature signature{};

  friend bool operator==(const SignedReceipt&, const SignedReceipt&) = default;
};

std::array<std::uint8_t, kReceiptDataSize> encode_receipt_data(const SignedReceipt& r);
// Strict: 110 bytes, version 1.
Result<SignedReceipt> decode_receipt_data(ByteView data);
// The read-response service `00 006E <110> <cksum>` and its parser.
Bytes encode_receipt_response(const SignedReceipt& r);
Result<SignedReceipt> decode_receipt_response(ByteView service);
// "GSR1" | L | meter AP title (absolute) | the 46 data bytes before the signature.
Result<Bytes> receipt_signed_bytes(ByteView meter_title_abs, const SignedReceipt& r);

// ---------------------------------------------------------------------------------------------
// MT-2043 meter challenge (DESIGN §3.4).

inline constexpr std::size_t kChallengeAnswerDataSize = 85;
using Challenge = std::array<std::uint8_t, kChallengeSize>;

struct ChallengeAnswer {
  Challenge challenge{};
  std::uint32_t meter_time = 0;
  Signature signature{};

  friend bool operator==(const ChallengeAnswer&, const ChallengeAnswer&) = default;
};

// The command's write of the challenge: 4F 0FFB 000000 0010 <16> <cksum>, and its parser.
Bytes encode_challenge_write(const Challenge& c);
Result<Challenge> decode_challenge_write(ByteView service);

std::array<std::uint8_t, kChallengeAnswerDataSize> encode_challenge_answer_data(
    const ChallengeAnswer& a);
// Strict: 85 bytes, version 1.
Result<ChallengeAnswer> decode_challenge_answer_data(ByteView data);
// The read-response service `00 0055 <85> <cksum>` and its parser.
Bytes encode_challenge_answer_response(const ChallengeAnswer& a);
Result<ChallengeAnswer> decode_challenge_answer_response(ByteView service);
// "GSC1" | L | meter AP title (absolute) | challenge | meter time (4).
Result<Bytes> challenge_signed_bytes(ByteView meter_title_abs, const ChallengeAnswer& a);

// ---------------------------------------------------------------------------------------------
// MT-2044 command-key replacement (gridseal profile extension, version 1; README "Command keys").
//
// DESIGN §4 has meters trust two command keys (signer key ids) and a gs-revocation key that
// signs the replacement of command keys, without a wire format; this is gridseal's. A statement
// is signed once by gs-revocation for the whole fleet and written (partial write, offset 0) to
// each meter inside an ordinary class-4 command (MT-2040 under a key the meter still trusts).
// Data (141 bytes): version=1 (1) | trust slot (1, 0 or 1) | new signer key id (1, 1..255) |
// reserved=0 (1) | sequence (4, > 0) | issued at (4, UTC s) | public key (65, 04||X||Y) |
// signature r||s (64) over SHA-256("GSV1" | the 77 bytes before it).
// A meter accepts it only if the signature verifies with its provisioned gs-revocation public
// key, the sequence is above the last one it accepted, and the key id is not the one its other
// trust slot holds; then trust slot <- (key id, public key).

inline constexpr std::size_t kReplacementDataSize = 141;
inline constexpr std::size_t kReplacementSignedDataSize = 77;
inline constexpr std::uint8_t kTrustSlotCount = 2;

struct CommandKeyReplacement {
  std::uint8_t trust_slot = 0;
  std::uint8_t key_id = 0;
  std::uint32_t sequence = 0;
  std::uint32_t issued_at = 0;
  PublicPoint public_key{};
  Signature signature{};

  friend bool operator==(const CommandKeyReplacement&, const CommandKeyReplacement&) = default;
};

std::array<std::uint8_t, kReplacementDataSize> encode_replacement_data(
    const CommandKeyReplacement& r);
// Strict: 141 bytes, version 1, slot 0..1, key id 1..255, reserved 0, sequence > 0, point prefix
// 04 (the point itself is validated where it is used).
Result<CommandKeyReplacement> decode_replacement_data(ByteView data);
// Code + data: 4F 0FFC 000000 008D <141> <cksum> (150 bytes), and its parser.
Bytes encode_replacement_write(const CommandKeyReplacement& r);
Result<CommandKeyReplacement> decode_replacement_write(ByteView service);
// "GSV1" | the 77 data bytes before the signature (what gs-revocation signs, hashed with SHA-256).
Bytes replacement_signed_bytes(const CommandKeyReplacement& r);

}  // namespace gs::c1222
