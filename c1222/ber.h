// BER reader and writer for the subset C12.22 uses: definite lengths, bounded, with offsets.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gridseal/bytes.h"
#include "gridseal/result.h"

namespace gs::c1222 {

// Largest length any C12.22 element may claim (the wire cap is far below this).
inline constexpr std::size_t kMaxBerLength = 16u * 1024u * 1024u;
// Length-of-length above this is refused (4 bytes covers kMaxBerLength).
inline constexpr std::size_t kMaxLengthOctets = 4;

// A tag-length-value seen by the reader. `value` points into the input.
struct Tlv {
  std::uint8_t tag = 0;
  ByteView value;
  std::size_t offset = 0;         // offset of the tag byte, relative to the reader's origin
  std::size_t header_size = 0;    // tag + length bytes
  ByteView raw;                   // tag, length and value as received
};

// A forward cursor over a byte span. Offsets reported in errors are relative to `origin`, so a
// reader for a nested element still names positions in the whole message.
class Reader {
 public:
  explicit Reader(ByteView data, std::size_t origin = 0) : data_(data), origin_(origin) {}

  bool empty() const noexcept { return pos_ == data_.size(); }
  std::size_t remaining() const noexcept { return data_.size() - pos_; }
  std::size_t offset() const noexcept { return origin_ + pos_; }  // absolute offset of next byte
  ByteView rest() const noexcept { return data_.subspan(pos_); }
  // The next byte without consuming it; only when !empty().
  std::uint8_t peek() const noexcept { return data_[pos_]; }

  Result<std::uint8_t> u8();
  Result<std::uint16_t> u16be();
  Result<std::uint32_t> u24be();
  Result<std::uint32_t> u32be();
  Result<ByteView> bytes(std::size_t n);
  // A BER definite length (short or long form, at most kMaxLengthOctets octets, at most
  // kMaxBerLength). Non-minimal long forms are accepted (valid BER); indefinite is refused.
  Result<std::size_t> length();
  // A single-byte tag followed by a length and that many bytes.
  Result<Tlv> tlv();
  // Like tlv() but fails with bad_tag unless the tag is `expected`.
  Result<Tlv> tlv(std::uint8_t expected, const char* what);
  // A sub-reader over a TLV's value that reports absolute offsets.
  Reader sub(const Tlv& t) const {
    return Reader(t.value, t.offset + t.header_size);
  }

 private:
  ByteView data_;
  std::size_t origin_;
  std::size_t pos_ = 0;
};

// Number of bytes the minimal encoding of length n takes.
std::size_t length_size(std::size_t n) noexcept;

// Appends to a byte vector; every encoding it produces is minimal.
class Writer {
 public:
  explicit Writer(Bytes& out) : out_(out) {}

  void u8(std::uint8_t v) { out_.push_back(v); }
  void u16be(std::uint16_t v);
  void u24be(std::uint32_t v);
  void u32be(std::uint32_t v);
  void bytes(ByteView b) { out_.insert(out_.end(), b.begin(), b.end()); }
  void length(std::size_t n) {
    if (n < 0x80) {
      out_.push_back(static_cast<std::uint8_t>(n));
    } else {
      long_length(n);
    }
  }
  void tlv(std::uint8_t tag, ByteView value) {
    out_.push_back(tag);
    length(value.size());
    bytes(value);
  }
  // Opens a constructed element whose length is patched by close(); nest freely.
  std::size_t open(std::uint8_t tag) {
    out_.push_back(tag);
    out_.push_back(0);  // one-byte placeholder, widened by close() when needed
    return out_.size();
  }
  void close(std::size_t mark) {
    std::size_t len = out_.size() - mark;
    if (len < 0x80) {
      out_[mark - 1] = static_cast<std::uint8_t>(len);
    } else {
      widen(mark, len);
    }
  }
  std::size_t size() const noexcept { return out_.size(); }
  Bytes& buffer() noexcept { return out_; }

 private:
  void long_length(std::size_t n);
  void widen(std::size_t mark, std::size_t len);
  Bytes& out_;
};

// INTEGER content helpers. Content is kept as received so that it can be echoed byte for byte.
// Returns the value of a two's complement INTEGER content of 1..8 bytes.
Result<std::int64_t> integer_value(ByteView content);
// Minimal two's complement content for v.
Bytes integer_content(std::int64_t v);

// The C12.19 table checksum: two's complement of the 8-bit sum.
std::uint8_t c1219_checksum(ByteView data) noexcept;

}  // namespace gs::c1222
