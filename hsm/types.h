// Plain PKCS#11 handle aliases and the zeroizing secret buffer shared by the hsm/ headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::hsm {

// The same width as CK_ULONG on the LP64 platforms gridseal runs on (checked in module.cc).
using SlotId = unsigned long;
using SessionHandle = unsigned long;
using ObjectHandle = unsigned long;
using ReturnValue = unsigned long;  // a CK_RV

inline constexpr ObjectHandle kNoObject = 0;

// Bytes that held a secret (a PIN, key material): wiped when destroyed or reassigned, never
// copied implicitly, never printed.
class Secret {
 public:
  Secret() = default;
  explicit Secret(ByteView data) : data_(data.begin(), data.end()) {}
  explicit Secret(std::string_view text) : Secret(as_bytes(text)) {}
  Secret(const Secret&) = delete;
  Secret& operator=(const Secret&) = delete;
  Secret(Secret&& o) noexcept : data_(std::move(o.data_)) { o.data_.clear(); }
  Secret& operator=(Secret&& o) noexcept {
    if (this != &o) {
      wipe();
      data_ = std::move(o.data_);
      o.data_.clear();
    }
    return *this;
  }
  ~Secret() { wipe(); }

  ByteView view() const noexcept { return data_; }
  std::size_t size() const noexcept { return data_.size(); }
  bool empty() const noexcept { return data_.empty(); }
  Secret clone() const { return Secret(view()); }

 private:
  void wipe() noexcept {
    if (!data_.empty()) {
      secure_zero(data_.data(), data_.size());
    }
    data_.clear();
  }
  Bytes data_;
};

// Reads a PIN from a file (first line, trailing CR/LF stripped; the file must not be readable
// by group or others) or from an environment variable. Empty or > 255-byte PINs are refused.
// Error details name the file or variable, never the PIN.
Result<Secret> read_pin_file(const std::string& path);
Result<Secret> read_pin_env(const char* variable);

}  // namespace gs::hsm
