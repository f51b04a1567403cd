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

Result<Block> EaxPrime::cmac_prime(const Block& start, ByteView m) {
  const std::size_t padded = m.empty() ? 16 : (m.size() + 15) / 16 * 16;
  std::uint8_t stack[kStackBuffer];
  Bytes heap;
  std::uint8_t* buf = stack;
  if (padded > kStackBuffer) {
    heap.resize(padded);
    buf = heap.data();
  }
  if (!m.empty()) std::memcpy(buf, m.data(), m.size());
  const Block* tweak = &d_;
  if (m.empty() || m.size() % 16 != 0) {
    buf[m.size()] = 0x80;
    std::memset(buf + m.size() + 1, 0, padded - m.size() - 1);
    tweak = &q_;
  }
  std::uint8_t* last = buf + padded - 16;
  for (std::size_t i = 0; i < 16; ++i) last[i] ^= (*tweak)[i];
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
  GS_ASSIGN(Block n, nonce_tag(cleartext));
  GS_ASSIGN(Block t, tag_of(n, data));
  Mac expect = mac_of(t);
  if (!equal_ct(expect, mac)) return {Errc::bad_mac, "EAX' MAC does not verify"};
  if (!data.empty()) GS_TRY(cipher_->ctr_xor(counter_of(n), data, data));
  return {};
}

}  // namespace gs::c1222
