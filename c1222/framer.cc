// Incremental TCP framer for C12.22 PDUs.
#include "c1222/framer.h"

#include "c1222/ber.h"

namespace gs::c1222 {

void Framer::feed(ByteView data) {
  if (failed_) return;
  // Compact before growing so a long-lived connection does not keep consumed bytes.
  if (start_ > 0 && start_ == buf_.size()) {
    buf_.clear();
    start_ = 0;
  } else if (start_ > 4096 && start_ * 2 > buf_.size()) {
    buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(start_));
    start_ = 0;
  }
  buf_.insert(buf_.end(), data.begin(), data.end());
}

Result<std::optional<Bytes>> Framer::next() {
  if (failed_) return {Errc::invalid_argument, "stream already failed"};
  std::size_t avail = buf_.size() - start_;
  if (avail == 0) return std::optional<Bytes>{};
  const std::uint8_t* p = buf_.data() + start_;
  if (p[0] != 0x60) {
    failed_ = true;
    std::uint8_t b[1] = {p[0]};
    return {Errc::bad_tag, "stream does not start a C12.22 message (60), found " + to_hex(b),
            0};
  }
  if (avail < 2) return std::optional<Bytes>{};
  std::size_t len = 0;
  std::size_t hdr = 2;
  if (p[1] < 0x80) {
    len = p[1];
  } else {
    std::size_t n = p[1] & 0x7F;
    if (n == 0 || n > kMaxLengthOctets) {
      failed_ = true;
      return {Errc::bad_length, n == 0 ? "indefinite length" : "length of too many octets", 1};
    }
    if (avail < 2 + n) return std::optional<Bytes>{};
    for (std::size_t i = 0; i < n; ++i) len = (len << 8) | p[2 + i];
    hdr = 2 + n;
  }
  if (len + hdr > max_) {
    failed_ = true;
    return {Errc::too_large,
            "message of " + std::to_string(len + hdr) + " bytes exceeds the cap of " +
                std::to_string(max_),
            1};
  }
  if (avail < hdr + len) return std::optional<Bytes>{};
  Bytes msg(p, p + hdr + len);
  start_ += hdr + len;
  return std::optional<Bytes>(std::move(msg));
}

}  // namespace gs::c1222
