// Default CBC-MAC and CTR compositions of BlockCipher::encrypt_blocks.
#include "gridseal/block_cipher.h"

#include <algorithm>

namespace gs {

Status BlockCipher::cbc_mac(const Block& iv, ByteView data, Block& out) {
  if (data.empty() || data.size() % 16 != 0) {
    return {Errc::invalid_argument, "CBC-MAC input must be whole blocks"};
  }
  Block x = iv;
  for (std::size_t off = 0; off < data.size(); off += 16) {
    for (std::size_t i = 0; i < 16; ++i) x[i] ^= data[off + i];
    GS_TRY(encrypt_blocks(x, x));
  }
  out = x;
  return {};
}

Status BlockCipher::cbc_mac_pair(const Block& iv1, ByteView d1, const Block& iv2, ByteView d2,
                                 Block& out1, Block& out2) {
  GS_TRY(cbc_mac(iv1, d1, out1));
  return cbc_mac(iv2, d2, out2);
}

Status BlockCipher::ctr_xor(const Block& ctr, ByteView in, MutableByteView out) {
  if (in.size() != out.size()) return {Errc::invalid_argument, "CTR sizes differ"};
  constexpr std::size_t kBatch = 32;  // blocks of keystream per call
  std::array<std::uint8_t, kBatch * 16> ks{};
  Block c = ctr;
  std::size_t done = 0;
  while (done < in.size()) {
    std::size_t n = std::min(in.size() - done, ks.size());
    std::size_t blocks = (n + 15) / 16;
    for (std::size_t b = 0; b < blocks; ++b) {
      std::copy(c.begin(), c.end(), ks.begin() + static_cast<std::ptrdiff_t>(b * 16));
      for (int i = 15; i >= 0; --i) {
        if (++c[static_cast<std::size_t>(i)] != 0) break;
      }
    }
    MutableByteView k(ks.data(), blocks * 16);
    GS_TRY(encrypt_blocks(k, k));
    for (std::size_t i = 0; i < n; ++i) out[done + i] = static_cast<std::uint8_t>(in[done + i] ^ ks[i]);
    done += n;
  }
  secure_zero(ks.data(), ks.size());
  return {};
}

}  // namespace gs
