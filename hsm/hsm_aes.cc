// HsmAes: ECB/CBC/CTR through PKCS#11 on a key handle, one Init + one Encrypt per operation.
#include "hsm/hsm_aes.h"

#include <algorithm>
#include <cstring>

#include "hsm/ops.h"
#include "hsm/p11.h"

namespace gs::hsm {
namespace {

bool supports_encrypt(Session& s, CK_MECHANISM_TYPE m) {
  CK_MECHANISM_INFO info{};
  CK_RV rv = detail::fl(s.module())->C_GetMechanismInfo(s.slot(), m, &info);
  return rv == CKR_OK && (info.flags & CKF_ENCRYPT) != 0;
}

void add_to_counter(Block& ctr, std::uint64_t n) noexcept {
  for (int i = 15; i >= 0 && n != 0; --i) {
    std::uint64_t sum = ctr[static_cast<std::size_t>(i)] + (n & 0xff);
    ctr[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(sum);
    n = (n >> 8) + (sum >> 8);
  }
}

}  // namespace

Result<std::unique_ptr<HsmAes>> HsmAes::make(Session& session, ObjectHandle key) {
  if (!session.is_open()) {
    return Error(Errc::invalid_argument, "HSM session is closed");
  }
  if (!supports_encrypt(session, CKM_AES_ECB)) {
    return Error(Errc::unsupported, "token does not offer CKM_AES_ECB encryption");
  }
  return std::unique_ptr<HsmAes>(new HsmAes(session, key, supports_encrypt(session, CKM_AES_CBC),
                                            supports_encrypt(session, CKM_AES_CTR)));
}

Status HsmAes::call(int mode, const Block* iv, ByteView in, MutableByteView out) {
  ++counters_.init_calls;
  ++counters_.op_calls;
  return aes_encrypt(*session_, key_, static_cast<AesMode>(mode), iv, in, out);
}

Status HsmAes::encrypt_blocks(ByteView in, MutableByteView out) {
  if (in.size() != out.size() || in.size() % 16 != 0) {
    return Error(Errc::invalid_argument, "encrypt_blocks: sizes must match and be whole blocks");
  }
  for (std::size_t off = 0; off < in.size(); off += kChunk) {
    std::size_t n = std::min(kChunk, in.size() - off);
    GS_TRY(call(static_cast<int>(AesMode::ecb), nullptr, in.subspan(off, n), out.subspan(off, n)));
  }
  return {};
}

Status HsmAes::cbc_mac(const Block& iv, ByteView data, Block& out) {
  if (data.empty() || data.size() % 16 != 0) {
    return Error(Errc::invalid_argument, "cbc_mac: data must be a non-zero number of blocks");
  }
  if (!has_cbc_) {
    return BlockCipher::cbc_mac(iv, data, out);
  }
  Block chain = iv;
  for (std::size_t off = 0; off < data.size(); off += kChunk) {
    std::size_t n = std::min(kChunk, data.size() - off);
    MutableByteView tmp(scratch_.data(), n);
    GS_TRY(call(static_cast<int>(AesMode::cbc), &chain, data.subspan(off, n), tmp));
    std::memcpy(chain.data(), tmp.data() + n - 16, 16);
  }
  out = chain;
  return {};
}

Status HsmAes::cbc_mac_pair(const Block& iv1, ByteView d1, const Block& iv2, ByteView d2,
                            Block& out1, Block& out2) {
  if (!has_cbc_ || d1.size() > kChunk || d2.size() > kChunk) {
    return BlockCipher::cbc_mac_pair(iv1, d1, iv2, d2, out1, out2);
  }
  ++counters_.init_calls;
  counters_.op_calls += 3;
  return aes_cbc_mac_pair(*session_, key_, iv1, d1, iv2, d2, out1, out2);
}

Status HsmAes::ctr_xor(const Block& ctr, ByteView in, MutableByteView out) {
  if (in.size() != out.size()) {
    return Error(Errc::invalid_argument, "ctr_xor: sizes differ");
  }
  Block counter = ctr;
  for (std::size_t off = 0; off < in.size(); off += kChunk) {
    std::size_t n = std::min(kChunk, in.size() - off);
    if (has_ctr_) {
      GS_TRY(call(static_cast<int>(AesMode::ctr), &counter, in.subspan(off, n),
                  out.subspan(off, n)));
    } else {
      // Keystream from ECB of the counter blocks, one call per chunk.
      std::size_t blocks = (n + 15) / 16;
      Block c = counter;
      for (std::size_t b = 0; b < blocks; ++b) {
        std::memcpy(scratch_.data() + b * 16, c.data(), 16);
        add_to_counter(c, 1);
      }
      MutableByteView ks(scratch_.data(), blocks * 16);
      GS_TRY(call(static_cast<int>(AesMode::ecb), nullptr, ks, ks));
      for (std::size_t i = 0; i < n; ++i) {
        out[off + i] = static_cast<std::uint8_t>(in[off + i] ^ scratch_[i]);
      }
      secure_zero(scratch_.data(), blocks * 16);
    }
    add_to_counter(counter, kChunk / 16);
  }
  return {};
}

}  // namespace gs::hsm
