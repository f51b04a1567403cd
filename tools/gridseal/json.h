// A tiny JSON writer for the CLI's --json output (no external JSON library).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace gs::cli {

// Builds compact JSON text. Calls must nest correctly (object keys via key()); misuse is a
// programming error caught by GS_CHECK. Strings are escaped; bytes >= 0x80 and control
// characters are written as \u00XX so the output is always valid ASCII JSON.
class JsonWriter {
 public:
  JsonWriter& begin_object();
  JsonWriter& end_object();
  JsonWriter& begin_array();
  JsonWriter& end_array();
  JsonWriter& key(std::string_view k);
  JsonWriter& value(std::string_view s);
  JsonWriter& value(const char* s) { return value(std::string_view(s)); }
  JsonWriter& value(std::int64_t v);
  JsonWriter& value(std::uint64_t v);
  JsonWriter& value(int v) { return value(static_cast<std::int64_t>(v)); }
  JsonWriter& value(unsigned v) { return value(static_cast<std::uint64_t>(v)); }
  JsonWriter& value(bool v);
  JsonWriter& null();

  const std::string& str() const noexcept { return out_; }
  // True when every object/array opened was closed and one value was written.
  bool complete() const noexcept { return stack_.empty() && !out_.empty(); }

 private:
  void before_value();

  struct Level {
    bool object = false;
    bool first = true;
    bool key_pending = false;
  };
  std::string out_;
  std::vector<Level> stack_;
};

// The JSON string literal for s, quotes included.
std::string json_quote(std::string_view s);

}  // namespace gs::cli
