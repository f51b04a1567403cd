// BER primitives for C12.22: bounded definite lengths, TLVs with offsets, minimal encodings.
#include "c1222/ber.h"

namespace gs::c1222 {

Result<std::uint8_t> Reader::u8() {
  if (remaining() < 1) return {Errc::truncated, "expected 1 more byte", offset()};
  return data_[pos_++];
}

Result<std::uint16_t> Reader::u16be() {
  if (remaining() < 2) return {Errc::truncated, "expected 2 more bytes", offset()};
  auto v = static_cast<std::uint16_t>((data_[pos_] << 8) | data_[pos_ + 1]);
  pos_ += 2;
  return v;
}

Result<std::uint32_t> Reader::u24be() {
  if (remaining() < 3) return {Errc::truncated, "expected 3 more bytes", offset()};
  std::uint32_t v = (std::uint32_t{data_[pos_]} << 16) | (std::uint32_t{data_[pos_ + 1]} << 8) |
                    data_[pos_ + 2];
  pos_ += 3;
  return v;
}

Result<std::uint32_t> Reader::u32be() {
  if (remaining() < 4) return {Errc::truncated, "expected 4 more bytes", offset()};
  std::uint32_t v = (std::uint32_t{data_[pos_]} << 24) | (std::uint32_t{data_[pos_ + 1]} << 16) |
                    (std::uint32_t{data_[pos_ + 2]} << 8) | data_[pos_ + 3];
  pos_ += 4;
  return v;
}

Result<ByteView> Reader::bytes(std::size_t n) {
  if (remaining() < n) {
    return {Errc::truncated,
            "expected " + std::to_string(n) + " bytes, " + std::to_string(remaining()) + " left",
            offset()};
  }
  ByteView v = data_.subspan(pos_, n);
  pos_ += n;
  return v;
}

namespace {

// Error paths stay out of line so the happy path of length()/tlv() is a few instructions.
[[gnu::cold, gnu::noinline]] Error length_error(std::size_t at, std::uint8_t first,
                                                std::size_t available) {
  if (first == 0x80) return Error(Errc::bad_length, "indefinite length", at);
  std::size_t n = first & 0x7F;
  if (n > kMaxLengthOctets) {
    return Error(Errc::bad_length, "length of " + std::to_string(n) + " octets", at);
  }
  if (available < n) return Error(Errc::truncated, "length octets cut short", at);
  return Error(Errc::too_large, "length above " + std::to_string(kMaxBerLength), at);
}

[[gnu::cold, gnu::noinline]] Error value_error(std::size_t at, std::size_t len,
                                               std::size_t left) {
  return Error(Errc::truncated,
               "element needs " + std::to_string(len) + " bytes, " + std::to_string(left) +
                   " left",
               at);
}

}  // namespace

// Reads a length at data[pos]; on success advances pos. Returns false on any error.
static inline bool read_length(ByteView data, std::size_t& pos, std::size_t& len) noexcept {
  if (pos >= data.size()) return false;
  std::uint8_t first = data[pos];
  if (first < 0x80) {
    len = first;
    ++pos;
    return true;
  }
  std::size_t n = first & 0x7F;
  if (n == 0 || n > kMaxLengthOctets || data.size() - pos - 1 < n) return false;
  std::size_t v = 0;
  for (std::size_t i = 1; i <= n; ++i) v = (v << 8) | data[pos + i];
  if (v > kMaxBerLength) return false;
  len = v;
  pos += 1 + n;
  return true;
}

Result<std::size_t> Reader::length() {
  std::size_t at = pos_;
  std::size_t len = 0;
  if (!read_length(data_, pos_, len)) {
    if (at >= data_.size()) return {Errc::truncated, "expected a length", origin_ + at};
    return length_error(origin_ + at, data_[at], data_.size() - at - 1);
  }
  return len;
}

Result<Tlv> Reader::tlv() {
  Tlv t;
  const std::size_t start = pos_;
  t.offset = origin_ + start;
  if (start >= data_.size()) return {Errc::truncated, "expected 1 more byte", t.offset};
  t.tag = data_[start];
  if ((t.tag & 0x1F) == 0x1F) return {Errc::bad_tag, "multi-byte tags are not used", t.offset};
  std::size_t p = start + 1;
  std::size_t len = 0;
  if (!read_length(data_, p, len)) {
    if (p >= data_.size()) return {Errc::truncated, "expected a length", origin_ + p};
    return length_error(origin_ + p, data_[p], data_.size() - p - 1);
  }
  if (data_.size() - p < len) return value_error(t.offset, len, data_.size() - p);
  t.header_size = p - start;
  t.value = data_.subspan(p, len);
  t.raw = data_.subspan(start, p + len - start);
  pos_ = p + len;
  return t;
}

namespace {
std::string hex_byte(std::uint8_t b) {
  std::uint8_t a[1] = {b};
  return to_hex(a);
}
}  // namespace

Result<Tlv> Reader::tlv(std::uint8_t expected, const char* what) {
  if (empty()) {
    return {Errc::truncated, std::string("expected ") + hex_byte(expected) + " (" + what + ")",
            offset()};
  }
  if (peek() != expected) {
    return {Errc::bad_tag,
            "expected " + hex_byte(expected) + " (" + what + "), found " + hex_byte(peek()),
            offset()};
  }
  return tlv();
}

std::size_t length_size(std::size_t n) noexcept {
  if (n < 0x80) return 1;
  std::size_t octets = 0;
  for (std::size_t v = n; v != 0; v >>= 8) ++octets;
  return 1 + octets;
}

void Writer::u16be(std::uint16_t v) {
  out_.push_back(static_cast<std::uint8_t>(v >> 8));
  out_.push_back(static_cast<std::uint8_t>(v));
}

void Writer::u24be(std::uint32_t v) {
  out_.push_back(static_cast<std::uint8_t>(v >> 16));
  out_.push_back(static_cast<std::uint8_t>(v >> 8));
  out_.push_back(static_cast<std::uint8_t>(v));
}

void Writer::u32be(std::uint32_t v) {
  out_.push_back(static_cast<std::uint8_t>(v >> 24));
  u24be(v & 0xFFFFFF);
}

void Writer::long_length(std::size_t n) {
  std::size_t octets = length_size(n) - 1;
  out_.push_back(static_cast<std::uint8_t>(0x80 | octets));
  for (std::size_t i = octets; i-- > 0;) out_.push_back(static_cast<std::uint8_t>(n >> (8 * i)));
}

void Writer::widen(std::size_t mark, std::size_t len) {
  std::size_t extra = length_size(len) - 1;
  out_.insert(out_.begin() + static_cast<std::ptrdiff_t>(mark), extra, 0);
  out_[mark - 1] = static_cast<std::uint8_t>(0x80 | extra);
  for (std::size_t i = 0; i < extra; ++i) {
    out_[mark + i] = static_cast<std::uint8_t>(len >> (8 * (extra - 1 - i)));
  }
}

Result<std::int64_t> integer_value(ByteView content) {
  if (content.empty()) return {Errc::bad_value, "empty INTEGER"};
  if (content.size() > 8) return {Errc::too_large, "INTEGER longer than 8 bytes"};
  std::uint64_t v = (content[0] & 0x80) ? ~std::uint64_t{0} : 0;
  for (std::uint8_t b : content) v = (v << 8) | b;
  return static_cast<std::int64_t>(v);
}

Bytes integer_content(std::int64_t v) {
  Bytes out;
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<std::uint8_t>(static_cast<std::uint64_t>(v) >> (8 * i)));
  // Drop leading bytes that only repeat the sign.
  std::size_t skip = 0;
  while (skip < 7) {
    std::uint8_t b = out[skip];
    std::uint8_t next = out[skip + 1];
    if ((b == 0x00 && !(next & 0x80)) || (b == 0xFF && (next & 0x80))) {
      ++skip;
    } else {
      break;
    }
  }
  out.erase(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(skip));
  return out;
}

std::uint8_t c1219_checksum(ByteView data) noexcept {
  std::uint8_t sum = 0;
  for (std::uint8_t b : data) sum = static_cast<std::uint8_t>(sum + b);
  return static_cast<std::uint8_t>(-sum);
}

}  // namespace gs::c1222
