// Host-side P-256 ECDSA/ECDH, SHA-256 and AES-256 block for the signature profile (OpenSSL 3).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

// Used by tests, the meter simulator and by the daemons to verify meter signatures; the
// daemons' own signing keys live in the HSM, not here.
namespace gs {

inline constexpr std::size_t kEcScalarSize = 32;
inline constexpr std::size_t kEcPointSize = 65;      // 04 || X || Y
inline constexpr std::size_t kEcSignatureSize = 64;  // r || s
inline constexpr std::size_t kSha256Size = 32;

using Sha256Digest = std::array<std::uint8_t, kSha256Size>;
using EcSignature = std::array<std::uint8_t, kEcSignatureSize>;
using EcPoint = std::array<std::uint8_t, kEcPointSize>;

Result<Sha256Digest> sha256(ByteView data);

// out = AES-256-ECB_key(in) for one block (the MT-2041 key derivation, DESIGN §3.2).
Status aes256_encrypt_block(ByteView key32, const Block& in, Block& out);

// The MT-2041 context: the first 16 bytes of SHA-256(context input), with the input from
// c1222::key_context_input().
Result<Block> profile_key_context(ByteView context_input);

// A P-256 key: a public point, optionally with its private scalar. Move-only.
class HostEcKey {
 public:
  // A fresh random key pair.
  static Result<HostEcKey> generate();
  // From a 32-byte big-endian scalar in [1, n-1]; the public point is computed.
  static Result<HostEcKey> from_private(ByteView scalar32);
  // From a 65-byte uncompressed point; refused unless it is on the curve (not infinity).
  static Result<HostEcKey> from_public(ByteView point65);

  HostEcKey(HostEcKey&&) noexcept;
  HostEcKey& operator=(HostEcKey&&) noexcept;
  HostEcKey(const HostEcKey&) = delete;
  HostEcKey& operator=(const HostEcKey&) = delete;
  ~HostEcKey();

  bool has_private() const noexcept { return has_private_; }
  const EcPoint& public_point() const noexcept { return public_; }
  // The private scalar (32 bytes) into `out`, which the caller wipes (secure_zero).
  Status export_private(std::span<std::uint8_t, kEcScalarSize> out) const;

  // ECDSA over a 32-byte digest (no further hashing). Signatures are randomized.
  Result<EcSignature> sign(ByteView digest32) const;
  // Errc::bad_signature when it does not verify (including r or s out of range), invalid_argument
  // on wrong sizes. High-S signatures verify (plain ECDSA).
  Status verify(ByteView digest32, ByteView signature64) const;

  // Z = x coordinate of (own private scalar) * (peer point), written to `out`; the caller wipes
  // it. Needs a private key.
  Status ecdh_x(const HostEcKey& peer, std::span<std::uint8_t, kEcScalarSize> out) const;

  // The MT-2041 derivation: key = AES-256_Z(context), Z = ecdh_x(peer). Z is wiped here.
  Status derive_profile_key(const HostEcKey& peer, const Block& context, Block& key_out) const;

 private:
  struct Impl;
  explicit HostEcKey(std::unique_ptr<Impl> impl, const EcPoint& pub, bool has_private);

  std::unique_ptr<Impl> impl_;
  EcPoint public_{};
  bool has_private_ = false;
};

}  // namespace gs
