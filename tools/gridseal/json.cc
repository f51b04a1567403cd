// A tiny JSON writer: comma placement, nesting checks and string escaping.
#include "tools/gridseal/json.h"

#include "gridseal/result.h"

namespace gs::cli {

std::string json_quote(std::string_view s) {
  static const char* digits = "0123456789abcdef";
  std::string out = "\"";
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c >= 0x7F) {
          out += "\\u00";
          out += digits[c >> 4];
          out += digits[c & 0x0F];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
  return out;
}

void JsonWriter::before_value() {
  if (stack_.empty()) {
    GS_CHECK(out_.empty());  // one top-level value
    return;
  }
  Level& l = stack_.back();
  if (l.object) {
    GS_CHECK(l.key_pending);
    l.key_pending = false;
    return;
  }
  if (!l.first) out_ += ',';
  l.first = false;
}

JsonWriter& JsonWriter::key(std::string_view k) {
  GS_CHECK(!stack_.empty() && stack_.back().object && !stack_.back().key_pending);
  Level& l = stack_.back();
  if (!l.first) out_ += ',';
  l.first = false;
  out_ += json_quote(k);
  out_ += ':';
  l.key_pending = true;
  return *this;
}

JsonWriter& JsonWriter::begin_object() {
  before_value();
  out_ += '{';
  stack_.push_back({true, true, false});
  return *this;
}

JsonWriter& JsonWriter::end_object() {
  GS_CHECK(!stack_.empty() && stack_.back().object && !stack_.back().key_pending);
  stack_.pop_back();
  out_ += '}';
  return *this;
}

JsonWriter& JsonWriter::begin_array() {
  before_value();
  out_ += '[';
  stack_.push_back({false, true, false});
  return *this;
}

JsonWriter& JsonWriter::end_array() {
  GS_CHECK(!stack_.empty() && !stack_.back().object);
  stack_.pop_back();
  out_ += ']';
  return *this;
}

JsonWriter& JsonWriter::value(std::string_view s) {
  before_value();
  out_ += json_quote(s);
  return *this;
}

JsonWriter& JsonWriter::value(std::int64_t v) {
  before_value();
  out_ += std::to_string(v);
  return *this;
}

JsonWriter& JsonWriter::value(std::uint64_t v) {
  before_value();
  out_ += std::to_string(v);
  return *this;
}

JsonWriter& JsonWriter::value(bool v) {
  before_value();
  out_ += v ? "true" : "false";
  return *this;
}

JsonWriter& JsonWriter::null() {
  before_value();
  out_ += "null";
  return *this;
}

}  // namespace gs::cli
