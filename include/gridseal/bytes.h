// Byte buffers, views and hex conversion shared by every gridseal module.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace gs {

using Bytes = std::vector<std::uint8_t>;
using ByteView = std::span<const std::uint8_t>;
using MutableByteView = std::span<std::uint8_t>;
using Block = std::array<std::uint8_t, 16>;

inline ByteView as_bytes(std::string_view s) {
  return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
}

// Appends v as 4 bytes, big-endian.
void append_u32be(Bytes& out, std::uint32_t v);
// Appends u32be(data.size()) || data: the length-prefixed field of gridseal's signed encodings.
void append_length_prefixed(Bytes& out, ByteView data);

// Lower-case hex without separators.
std::string to_hex(ByteView data);

// The value of one hex digit (either case), -1 for any other character.
int hex_value(char c) noexcept;
// Parses hex; spaces, tabs, ':' and '-' between digit pairs are ignored. nullopt on an odd
// number of digits or a non-hex character.
std::optional<Bytes> from_hex(std::string_view text);

// Length of the well-formed UTF-8 sequence at s[i] (1 for ASCII), 0 when there is none
// (RFC 3629: overlong forms, surrogates and values above U+10FFFF are not). i < s.size().
std::size_t utf8_sequence_length(std::string_view s, std::size_t i) noexcept;

// Overwrites memory in a way the optimiser does not remove.
void secure_zero(void* p, std::size_t n) noexcept;

// Constant-time equality of two equal-length buffers (false when the lengths differ).
bool equal_ct(ByteView a, ByteView b) noexcept;

}  // namespace gs
