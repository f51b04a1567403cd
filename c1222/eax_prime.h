// EAX' (ANSI C12.22 Annex, corrected form) composed from BlockCipher operations (PROTOCOL §5).
#pragma once

#include <array>

#include "gridseal/block_cipher.h"
#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::c1222 {

using Mac = std::array<std::uint8_t, 4>;

// Holds the per-key subkeys D and Q (derived from L = E_K(0)). Construct with make() once per
// key; the object is cheap to keep next to its cipher.
class EaxPrime {
 public:
  static Result<EaxPrime> make(BlockCipher& cipher);
  // With D and Q kept from an earlier make() for the same key (no cipher call).
  static EaxPrime with_subkeys(BlockCipher& cipher, const Block& d, const Block& q);

  // Encrypts `data` in place (may be empty) and returns the MAC over cleartext + ciphertext.
  Result<Mac> encrypt(ByteView cleartext, MutableByteView data);
  // Checks the MAC in constant time; only then decrypts `data` in place. Errc::bad_mac leaves
  // data untouched.
  Status decrypt(ByteView cleartext, MutableByteView data, const Mac& mac);

  // Test hooks: the intermediates of PROTOCOL §5.
  const Block& d() const noexcept { return d_; }
  const Block& q() const noexcept { return q_; }
  Result<Block> cmac_prime(const Block& start, ByteView m);

  ~EaxPrime();
  EaxPrime(EaxPrime&&) noexcept;
  EaxPrime& operator=(EaxPrime&&) noexcept;

 private:
  explicit EaxPrime(BlockCipher& c) : cipher_(&c) {}
  Result<Block> nonce_tag(ByteView cleartext);
  Result<Block> tag_of(const Block& n, ByteView ciphertext);

  BlockCipher* cipher_;
  Block d_{};
  Block q_{};
};

// EAX' doubling (little-endian interpretation, PROTOCOL §5 step 2).
Block eax_prime_double(const Block& b) noexcept;

}  // namespace gs::c1222
