// EAX' (PROTOCOL §5): CMAC' with EAX' doubling, CTR with the two cleared counter bits, 4-byte MAC.
#include "c1222/eax_prime.h"

#include <algorithm>
#include <cstring>

namespace gs::c1222 {

namespace {
// Messages up to this size are padded on the stack; longer ones use the heap.
constexpr std::size_t kStackBuffer = 1024;
}  // namespace

Block eax_prime_double(const Block& b) noexcept {
  Block out{};
  std::uint8_t carry = 0;
  for (std::size_t i = 0; i < 16; ++i) {
    out[i] = static_cast<std::uint8_t>((b[i] << 1) | carry);
    carry = static_cast<std::uint8_t>(b[i] >> 7);
  }
  if (carry) out[0] ^= 0x87;
  return out;
}

Result<EaxPrime> EaxPrime::make(BlockCipher& cipher) {
  EaxPrime e(cipher);
  Block l{};
  GS_TRY(cipher.encrypt_blocks(l, l));
  e.d_ = eax_prime_double(l);
  e.q_ = eax_prime_double(e.d_);
  secure_zero(l.data(), l.size());
  return e;
}

EaxPrime EaxPrime::with_subkeys(BlockCipher& cipher, const Block& d, const Block& q) {
  EaxPrime e(cipher);
  e.d_ = d;
  e.q_ = q;
  return e;
}

EaxPrime::~EaxPrime() {
  secure_zero(d_.data(), d_.size());
  secure_zero(q_.data(), q_.size());
}

EaxPrime::EaxPrime(EaxPrime&& o) noexcept : cipher_(o.cipher_), d_(o.d_), q_(o.q_) {
  secure_zero(o.d_.data(), o.d_.size());
  secure_zero(o.q_.data(), o.q_.size());
}

EaxPrime& EaxPrime::operator=(EaxPrime&& o) noexcept {
  if (this != &o) {
    cipher_ = o.cipher_;
    d_ = o.d_;
    q_ = o.q_;
    secure_zero(o.d_.data(), o.d_.size());
    secure_zero(o.q_.data(), o.q_.size());
  }
  return *this;
}

namespace {
// CMAC' input of m: m padded to whole blocks (10* when empty or partial) with the last block
// XORed with D (m whole blocks) or Q (padded).
std::size_t cmac_prime_size(ByteView m) { return m.empty() ? 16 : (m.size() + 15) / 16 * 16; }
void cmac_prime_input(ByteView m, const Block& d, const Block& q, std::uint8_t* buf) {
  const std::size_t padded = cmac_prime_size(m);
  if (!m.empty()) std::memcpy(buf, m.data(), m.size());
  const Block* tweak = &d;
  if (m.empty() || m.size() % 16 != 0) {
    buf[m.size()] = 0x80;
    std::memset(buf + m.size() + 1, 0, padded - m.size() - 1);
    tweak = &q;
  }
  std::uint8_t* last = buf + padded - 16;
  for (std::size_t i = 0; i < 16; ++i) last[i] ^= (*tweak)[i];
}
}  // namespace

Result<Block> EaxPrime::cmac_prime(const Block& start, ByteView m) {
  const std::size_t padded = cmac_prime_size(m);
  std::uint8_t stack[kStackBuffer];
  Bytes heap;
  std::uint8_t* buf = stack;
  if (padded > kStackBuffer) {
    heap.resize(padded);
    buf = heap.data();
  }
  cmac_prime_input(m, d_, q_, buf);
  Block out{};
  GS_TRY(cipher_->cbc_mac(start, ByteView(buf, padded), out));
  return out;
}

Result<Block> EaxPrime::nonce_tag(ByteView cleartext) {
  if (cleartext.empty()) return {Errc::invalid_argument, "EAX' needs a non-empty cleartext"};
  return cmac_prime(d_, cleartext);
}

Result<Block> EaxPrime::tag_of(const Block& n, ByteView ciphertext) {
  if (ciphertext.empty()) return n;
  GS_ASSIGN(Block c, cmac_prime(q_, ciphertext));
  for (std::size_t i = 0; i < 16; ++i) c[i] ^= n[i];
  return c;
}

namespace {
Block counter_of(const Block& n) {
  Block ctr = n;
  ctr[12] &= 0x7F;
  ctr[14] &= 0x7F;
  return ctr;
}
Mac mac_of(const Block& t) { return {t[12], t[13], t[14], t[15]}; }
}  // namespace

Result<Mac> EaxPrime::encrypt(ByteView cleartext, MutableByteView data) {
  GS_ASSIGN(Block n, nonce_tag(cleartext));
  if (!data.empty()) GS_TRY(cipher_->ctr_xor(counter_of(n), data, data));
  GS_ASSIGN(Block t, tag_of(n, data));
  return mac_of(t);
}

Status EaxPrime::decrypt(ByteView cleartext, MutableByteView data, const Mac& mac) {
  Block t{};
  Block n{};
  if (data.empty() || cleartext.empty()) {
    GS_ASSIGN(n, nonce_tag(cleartext));
    GS_ASSIGN(t, tag_of(n, data));
  } else {
    // Both CMAC' values are known before anything is decrypted, so they are computed together
    // (BlockCipher::cbc_mac_pair: on a PKCS#11 key one CBC operation instead of two).
    const std::size_t p1 = cmac_prime_size(cleartext);
    const std::size_t p2 = cmac_prime_size(data);
    std::uint8_t stack[kStackBuffer];
    Bytes heap;
    std::uint8_t* buf = stack;
    if (p1 + p2 > kStackBuffer) {
      heap.resize(p1 + p2);
      buf = heap.data();
    }
    cmac_prime_input(cleartext, d_, q_, buf);
    cmac_prime_input(data, d_, q_, buf + p1);
    Block c{};
    GS_TRY(cipher_->cbc_mac_pair(d_, ByteView(buf, p1), q_, ByteView(buf + p1, p2), n, c));
    for (std::size_t i = 0; i < 16; ++i) t[i] = static_cast<std::uint8_t>(c[i] ^ n[i]);
  }
  Mac expect = mac_of(t);
  if (!equal_ct(expect, mac)) return {Errc::bad_mac, "EAX' MAC does not verify"};
  if (!data.empty()) GS_TRY(cipher_->ctr_xor(counter_of(n), data, data));
  return {};
}

}  // namespace gs::c1222
