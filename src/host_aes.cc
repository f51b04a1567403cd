// OpenSSL implementation of the AES-128 forward cipher used by EAX'.
#include "src/host_aes.h"

#include <openssl/evp.h>

#include <algorithm>

namespace gs {

struct HostAes::Ctx {
  EVP_CIPHER_CTX* ecb = nullptr;
  ~Ctx() { EVP_CIPHER_CTX_free(ecb); }
};

Result<std::unique_ptr<HostAes>> HostAes::make(ByteView key) {
  if (key.size() != 16) return {Errc::invalid_argument, "AES-128 key must be 16 bytes"};
  std::unique_ptr<HostAes> a(new HostAes());
  a->ctx_ = std::make_unique<Ctx>();
  a->ctx_->ecb = EVP_CIPHER_CTX_new();
  if (a->ctx_->ecb == nullptr ||
      EVP_EncryptInit_ex(a->ctx_->ecb, EVP_aes_128_ecb(), nullptr, key.data(), nullptr) != 1 ||
      EVP_CIPHER_CTX_set_padding(a->ctx_->ecb, 0) != 1) {
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
  Block x = iv;
  for (std::size_t off = 0; off < data.size(); off += 16) {
    for (std::size_t i = 0; i < 16; ++i) x[i] ^= data[off + i];
    if (EVP_Cipher(ctx_->ecb, x.data(), x.data(), 16) <= 0) {
      return {Errc::crypto_failure, "OpenSSL AES-128-ECB failed"};
    }
  }
  out = x;
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
    for (std::size_t i = 0; i < n; ++i) out[done + i] = static_cast<std::uint8_t>(in[done + i] ^ ks[i]);
    done += n;
  }
  secure_zero(ks, sizeof ks);
  return {};
}

}  // namespace gs
