// BoundAes: EAX' steps as C_EncryptUpdate calls on ECB and CBC operations kept open on a key.
#include "hsm/bound_aes.h"

#include <algorithm>
#include <cstring>

#include "hsm/p11.h"

namespace gs::hsm {
namespace {

Error broken_error() {
  return Error(Errc::hsm_failure, "AES operation bound to the meter key failed");
}

}  // namespace

// ---- BoundAesPool -------------------------------------------------------------------------------

BoundAesPool::BoundAesPool(Module& module, SlotId slot, std::size_t max_sessions)
    : module_(&module), slot_(slot), max_sessions_(max_sessions) {}

// The sessions stay open: the module's C_Finalize ends them together (see the header).
BoundAesPool::~BoundAesPool() = default;

bool BoundAesPool::take(SessionHandle& out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!free_.empty()) {
    out = free_.back();
    free_.pop_back();
    ++in_use_;
    return true;
  }
  if (exhausted_ || opened_ >= max_sessions_) return false;
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  const CK_RV rv = detail::fl(*module_)->C_OpenSession(slot_, CKF_SERIAL_SESSION, nullptr,
                                                       nullptr, &h);
  if (rv != CKR_OK) {
    ++open_failures_;
    exhausted_ = true;
    return false;
  }
  ++opened_;
  ++in_use_;
  out = h;
  return true;
}

void BoundAesPool::give_back(SessionHandle s) {
  CK_BYTE tail[16];
  CK_ULONG len = sizeof tail;
  const CK_RV rv = detail::fl(*module_)->C_EncryptFinal(s, tail, &len);
  secure_zero(tail, sizeof tail);
  std::lock_guard<std::mutex> lock(mu_);
  --in_use_;
  if (ckr_session_lost(rv)) {
    --opened_;  // gone with the token's state: nothing to close
    return;
  }
  free_.push_back(s);
}

std::unique_ptr<BoundAes> BoundAesPool::bind(ObjectHandle key) {
  SessionHandle ecb = 0;
  SessionHandle cbc = 0;
  if (!take(ecb)) return nullptr;
  if (!take(cbc)) {
    give_back(ecb);
    return nullptr;
  }
  CK_FUNCTION_LIST* f = detail::fl(*module_);
  CK_MECHANISM m_ecb{CKM_AES_ECB, nullptr, 0};
  CK_BYTE iv[16] = {};
  CK_MECHANISM m_cbc{CKM_AES_CBC, iv, sizeof iv};
  if (f->C_EncryptInit(ecb, &m_ecb, key) != CKR_OK || f->C_EncryptInit(cbc, &m_cbc, key) != CKR_OK) {
    give_back(ecb);
    give_back(cbc);
    return nullptr;
  }
  return std::unique_ptr<BoundAes>(new BoundAes(*this, key, ecb, cbc));
}

void BoundAesPool::forget(std::size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  in_use_ -= n;
  opened_ -= n;
}

BoundAesPool::Stats BoundAesPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return Stats{opened_, in_use_, open_failures_};
}

// ---- BoundAes -----------------------------------------------------------------------------------

BoundAes::~BoundAes() {
  if (abandoned_) {
    pool_->forget(2);
  } else {
    pool_->give_back(ecb_);
    pool_->give_back(cbc_);
  }
  secure_zero(chain_.data(), chain_.size());
}

bool BoundAes::update(SessionHandle s, const std::uint8_t* in, std::size_t n, std::uint8_t* out) {
  ++counters_.updates;
  CK_ULONG len = n;
  const CK_RV rv = detail::fl(pool_->module())
                       ->C_EncryptUpdate(s, const_cast<CK_BYTE*>(in), n, out, &len);
  if (rv != CKR_OK || len != n) {
    broken_ = true;  // the token ended the operation (or holds back output: unusable either way)
    return false;
  }
  return true;
}

bool BoundAes::cbc_mac_bound(const Block& iv, ByteView data, Block& out) {
  std::uint8_t in[kChunk];
  std::uint8_t res[kChunk];
  bool ok = true;
  for (std::size_t off = 0; ok && off < data.size(); off += kChunk) {
    const std::size_t n = std::min(kChunk, data.size() - off);
    const std::uint8_t* src = data.data() + off;
    if (off == 0) {
      // The operation continues from chain_; starting from iv instead means feeding
      // block ^ chain_ ^ iv.
      std::memcpy(in, src, n);
      for (std::size_t i = 0; i < 16; ++i) in[i] ^= static_cast<std::uint8_t>(chain_[i] ^ iv[i]);
      src = in;
    }
    ok = update(cbc_, src, n, res);
    if (ok) std::memcpy(chain_.data(), res + n - 16, 16);
  }
  if (ok) out = chain_;
  secure_zero(in, std::min(kChunk, data.size()));
  secure_zero(res, std::min(kChunk, data.size()));
  return ok;
}

Status BoundAes::encrypt_blocks(ByteView in, MutableByteView out) {
  if (in.size() != out.size() || in.size() % 16 != 0) {
    return Error(Errc::invalid_argument, "encrypt_blocks: sizes must match and be whole blocks");
  }
  for (std::size_t off = 0; off < in.size(); off += kChunk) {
    const std::size_t n = std::min(kChunk, in.size() - off);
    if (!broken_ && update(ecb_, in.data() + off, n, out.data() + off)) continue;
    // From the failed chunk on (the chunks before it are done, and in place they are no longer
    // the input; a failed call writes no output).
    if (fallback_ == nullptr) return broken_error();
    ++counters_.fallbacks;
    return fallback_->encrypt_blocks(in.subspan(off), out.subspan(off));
  }
  return {};
}

Status BoundAes::cbc_mac(const Block& iv, ByteView data, Block& out) {
  if (data.empty() || data.size() % 16 != 0) {
    return Error(Errc::invalid_argument, "cbc_mac: data must be a non-zero number of blocks");
  }
  if (!broken_ && cbc_mac_bound(iv, data, out)) return {};
  if (fallback_ == nullptr) return broken_error();
  ++counters_.fallbacks;
  return fallback_->cbc_mac(iv, data, out);
}

Status BoundAes::cbc_mac_pair(const Block& iv1, ByteView d1, const Block& iv2, ByteView d2,
                              Block& out1, Block& out2) {
  if (d1.empty() || d2.empty() || d1.size() % 16 != 0 || d2.size() % 16 != 0) {
    return Error(Errc::invalid_argument, "CBC-MAC pair: inputs must be non-empty whole blocks");
  }
  if (!broken_ && cbc_mac_bound(iv1, d1, out1) && cbc_mac_bound(iv2, d2, out2)) return {};
  if (fallback_ == nullptr) return broken_error();
  ++counters_.fallbacks;
  return fallback_->cbc_mac_pair(iv1, d1, iv2, d2, out1, out2);
}

}  // namespace gs::hsm
