// Incremental TCP framer: bytes in, whole C12.22 PDUs (60 <len> ...) out, with a size cap.
#pragma once

#include <cstddef>
#include <optional>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::c1222 {

class Framer {
 public:
  explicit Framer(std::size_t max_message) : max_(max_message) {}

  // Appends received bytes. Never fails; errors surface from next().
  void feed(ByteView data);
  // The next complete PDU (tag, length, body), nullopt when more bytes are needed, or an
  // error (first byte not 0x60, indefinite/overlong length, PDU above the cap). After an error
  // the stream is unusable: the connection should be closed.
  Result<std::optional<Bytes>> next();
  // Bytes held that do not yet form a PDU.
  std::size_t buffered() const noexcept { return buf_.size() - start_; }

 private:
  std::size_t max_;
  Bytes buf_;
  std::size_t start_ = 0;
  bool failed_ = false;
};

}  // namespace gs::c1222
