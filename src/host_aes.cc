// OpenSSL implementation of the AES-128 forward cipher used by EAX'.
#include "src/host_aes.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>

namespace gs {

// Two contexts on one key schedule each: ECB for independent blocks, CBC for CBC-MACs. The CBC
// context is never re-initialised (that costs more than the MAC itself): OpenSSL keeps the
// last ciphertext block as the next chaining value, so a MAC that must start from `iv` folds
// (iv XOR chain) into its first block instead.
struct HostAes::Ctx {
  EVP_CIPHER_CTX* ecb = nullptr;
  EVP_CIPHER_CTX* cbc = nullptr;
  Block chain{};  // the CBC context's current chaining value
  ~Ctx() {
    EVP_CIPHER_CTX_free(ecb);
    EVP_CIPHER_CTX_free(cbc);
    secure_zero(chain.data(), chain.size());
  }
};

Result<std::unique_ptr<HostAes>> HostAes::make(ByteView key) {
  if (key.size() != 16) return {Errc::invalid_argument, "AES-128 key must be 16 bytes"};
  std::unique_ptr<HostAes> a(new HostAes());
  a->ctx_ = std::make_unique<Ctx>();
  a->ctx_->ecb = EVP_CIPHER_CTX_new();
  a->ctx_->cbc = EVP_CIPHER_CTX_new();
  if (a->ctx_->ecb == nullptr || a->ctx_->cbc == nullptr ||
      EVP_EncryptInit_ex(a->ctx_->ecb, EVP_aes_128_ecb(), nullptr, key.data(), nullptr) != 1 ||
      EVP_CIPHER_CTX_set_padding(a->ctx_->ecb, 0) != 1 ||
      EVP_EncryptInit_ex(a->ctx_->cbc, EVP_aes_128_cbc(), nullptr, key.data(),
                         a->ctx_->chain.data()) != 1 ||
      EVP_CIPHER_CTX_set_padding(a->ctx_->cbc, 0) != 1) {
    return {Errc::crypto_failure, "OpenSSL AES-128-ECB setup failed"};
  }
  return a;
}

HostAes::~HostAes() = default;

Status HostAes::encrypt_blocks(ByteView in, MutableByteView out) {
  if (in.size() != out.size() || in.size() % 16 != 0) {
    return {Errc::invalid_argument, "ECB input must be whole blocks"};
  }
  if (in.empty()) return {};
  if (in.size() > 0x7FFFFFF0) return {Errc::too_large, "ECB input too large"};
  if (EVP_Cipher(ctx_->ecb, out.data(), in.data(), static_cast<unsigned>(in.size())) <= 0) {
    return {Errc::crypto_failure, "OpenSSL AES-128-ECB failed"};
  }
  return {};
}

Status HostAes::cbc_mac(const Block& iv, ByteView data, Block& out) {
  if (data.empty() || data.size() % 16 != 0) {
    return {Errc::invalid_argument, "CBC-MAC input must be whole blocks"};
  }
  constexpr std::size_t kChunk = 1024;
  alignas(16) std::uint8_t in[kChunk];
  alignas(16) std::uint8_t ct[kChunk];
  for (std::size_t off = 0; off < data.size(); off += kChunk) {
    std::size_t n = std::min(kChunk, data.size() - off);
    std::copy(data.begin() + static_cast<std::ptrdiff_t>(off),
              data.begin() + static_cast<std::ptrdiff_t>(off + n), in);
    if (off == 0) {
      for (std::size_t i = 0; i < 16; ++i) in[i] ^= static_cast<std::uint8_t>(iv[i] ^ ctx_->chain[i]);
    }
    if (EVP_Cipher(ctx_->cbc, ct, in, static_cast<unsigned>(n)) <= 0) {
      return {Errc::crypto_failure, "OpenSSL AES-128-CBC failed"};
    }
    std::copy(ct + n - 16, ct + n, ctx_->chain.begin());
  }
  out = ctx_->chain;
  return {};
}

Status HostAes::ctr_xor(const Block& ctr, ByteView in, MutableByteView out) {
  if (in.size() != out.size()) return {Errc::invalid_argument, "CTR sizes differ"};
  constexpr std::size_t kBatch = 64;  // keystream blocks per OpenSSL call
  alignas(16) std::uint8_t ks[kBatch * 16];
  Block c = ctr;
  std::size_t done = 0;
  while (done < in.size()) {
    std::size_t n = std::min(in.size() - done, sizeof ks);
    std::size_t blocks = (n + 15) / 16;
    for (std::size_t b = 0; b < blocks; ++b) {
      std::copy(c.begin(), c.end(), ks + b * 16);
      for (int i = 15; i >= 0; --i) {
        if (++c[static_cast<std::size_t>(i)] != 0) break;
      }
    }
    if (EVP_Cipher(ctx_->ecb, ks, ks, static_cast<unsigned>(blocks * 16)) <= 0) {
      return {Errc::crypto_failure, "OpenSSL AES-128-ECB failed"};
    }
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      std::uint64_t a;
      std::uint64_t k;
      std::memcpy(&a, in.data() + done + i, 8);
      std::memcpy(&k, ks + i, 8);
      a ^= k;
      std::memcpy(out.data() + done + i, &a, 8);
    }
    for (; i < n; ++i) out[done + i] = static_cast<std::uint8_t>(in[done + i] ^ ks[i]);
    done += n;
  }
  secure_zero(ks, sizeof ks);
  return {};
}

}  // namespace gs
