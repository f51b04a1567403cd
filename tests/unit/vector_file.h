// Reader for tests/vectors/*.txt: `Name = hex` blocks, blank-line separated, that tracks use.
#pragma once

#include <cstddef>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gridseal/bytes.h"

namespace gs::test {

// One block of `Name = value` lines. get() marks a field used; a harness then asserts that
// VectorFile::unused() is empty, so a vector file cannot carry a value nobody checks.
class VectorSection {
 public:
  struct Field {
    std::string name;
    std::string value;
    int line = 0;
    mutable bool used = false;
  };

  int line() const noexcept { return line_; }
  bool has(std::string_view name) const { return find(name) != nullptr; }

  // The value parsed as hex (empty when the field is absent or not hex; see ok()).
  Bytes get(std::string_view name) const {
    const Field* f = find(name);
    if (f == nullptr) {
      return {};
    }
    f->used = true;
    auto b = from_hex(f->value);
    return b ? *b : Bytes{};
  }
  // The raw text of the value, also marks it used.
  std::string get_text(std::string_view name) const {
    const Field* f = find(name);
    if (f == nullptr) {
      return {};
    }
    f->used = true;
    return f->value;
  }
  // Whether the field exists and is valid hex (does not mark it used).
  bool is_hex(std::string_view name) const {
    const Field* f = find(name);
    return f != nullptr && from_hex(f->value).has_value();
  }

  const std::vector<Field>& fields() const noexcept { return fields_; }
  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (const auto& f : fields_) {
      if (!f.used) {
        out.push_back("line " + std::to_string(f.line) + ": " + f.name);
      }
    }
    return out;
  }

 private:
  friend class VectorFile;
  const Field* find(std::string_view name) const {
    for (const auto& f : fields_) {
      if (f.name == name) {
        return &f;
      }
    }
    return nullptr;
  }

  int line_ = 0;
  std::vector<Field> fields_;
};

// Parses a whole vector file. `#` starts a comment line; a blank line ends a section; a value
// may continue on following lines that start with whitespace (concatenated).
class VectorFile {
 public:
  explicit VectorFile(const std::string& path) {
    std::ifstream in(path);
    if (!in) {
      error_ = "cannot open " + path;
      return;
    }
    std::string text;
    int n = 0;
    VectorSection cur;
    auto flush = [&] {
      if (!cur.fields_.empty()) {
        sections_.push_back(std::move(cur));
      }
      cur = VectorSection{};
    };
    while (std::getline(in, text)) {
      ++n;
      std::string_view line = trim(text);
      if (!line.empty() && line.front() == '#') {
        continue;
      }
      if (line.empty()) {
        flush();
        continue;
      }
      if ((text[0] == ' ' || text[0] == '\t') && !cur.fields_.empty()) {
        cur.fields_.back().value += std::string(line);
        continue;
      }
      auto eq = line.find('=');
      if (eq == std::string_view::npos) {
        error_ = path + ":" + std::to_string(n) + ": expected `Name = value`";
        return;
      }
      VectorSection::Field f;
      f.name = std::string(trim(line.substr(0, eq)));
      f.value = std::string(trim(line.substr(eq + 1)));
      f.line = n;
      if (f.name.empty() || cur.has(f.name)) {
        error_ = path + ":" + std::to_string(n) + ": empty or duplicated name";
        return;
      }
      if (cur.fields_.empty()) {
        cur.line_ = n;
      }
      cur.fields_.push_back(std::move(f));
    }
    flush();
  }

  bool ok() const noexcept { return error_.empty(); }
  const std::string& error() const noexcept { return error_; }
  const std::vector<VectorSection>& sections() const noexcept { return sections_; }
  std::size_t size() const noexcept { return sections_.size(); }
  const VectorSection& operator[](std::size_t i) const { return sections_[i]; }
  auto begin() const { return sections_.begin(); }
  auto end() const { return sections_.end(); }

  // Every field of every section that no get() has read, as "line N: Name".
  std::vector<std::string> unused() const {
    std::vector<std::string> out;
    for (const auto& s : sections_) {
      auto u = s.unused();
      out.insert(out.end(), u.begin(), u.end());
    }
    return out;
  }

 private:
  static std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) {
      s.remove_prefix(1);
    }
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
      s.remove_suffix(1);
    }
    return s;
  }

  std::string error_;
  std::vector<VectorSection> sections_;
};

}  // namespace gs::test
