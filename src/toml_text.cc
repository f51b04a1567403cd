// TOML text checked before toml++ parses it (src/toml_text.h).
#include "src/toml_text.h"

#include <fstream>
#include <vector>

#include "gridseal/bytes.h"

namespace gs::toml_text {

namespace {

bool starts(std::string_view t, std::size_t i, std::string_view what) {
  return t.substr(i, what.size()) == what;
}

bool toml_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

}  // namespace

Status check(std::string_view t, const std::string& source) {
  std::size_t line = 1, line_start = 0;
  const auto fail = [&](std::size_t at, const char* what) {
    return Error(Errc::invalid_argument, source + ":" + std::to_string(line) + ":" +
                                             std::to_string(at - line_start + 1) + ": " + what);
  };
  for (std::size_t i = 0; i < t.size();) {
    const std::size_t n = utf8_sequence_length(t, i);
    if (n == 0) return fail(i, "not UTF-8");
    if (t[i] == '\n') {
      ++line;
      line_start = i + 1;
    }
    i += n;
  }

  enum class In { text, comment, basic, multi_basic, literal, multi_literal };
  In in = In::text;
  // A quote opens a string only where TOML lets one start: a value after '=' (or after '[', ','
  // or a line break inside an array), a key at the start of a line or after '[', '.', '{' or ','.
  // A bare value (a number, a date, true...) runs to a value terminator, and toml++ tests each of
  // its characters for whitespace on the way, quotes included: inside one nothing opens.
  char last = '\n';  // the last character of the text state other than a space or tab
  std::vector<char> nest;  // '[' array, 'h' table header, '{' inline table
  bool bare = false;
  const auto opens = [&] {
    return last == '\n' || last == '=' || last == '[' || last == ',' || last == '{' ||
           last == '.';
  };
  const auto value_position = [&] {
    const bool in_array = !nest.empty() && nest.back() == '[';
    return last == '=' || (in_array && (last == '[' || last == ',' || last == '\n'));
  };
  line = 1;
  line_start = 0;
  std::size_t i = 0;
  const auto newline = [&](std::size_t at) {
    ++line;
    line_start = at + 1;
  };
  while (i < t.size()) {
    const char c = t[i];
    const bool ascii = static_cast<unsigned char>(c) < 0x80;
    if (c == '\n') {
      newline(i);
      // Comments and single-line strings end at the line (an unterminated string is toml++'s
      // error to report).
      if (in == In::comment || in == In::basic || in == In::literal) in = In::text;
      if (in == In::text) {
        last = '\n';
        bare = false;
      }
      ++i;
      continue;
    }
    switch (in) {
      case In::text:
        if (!ascii) return fail(i, "a non-ASCII character outside a string or comment");
        if (bare) {
          if (c == ' ' || c == '\t' || c == '\r' || c == ']' || c == '}' || c == ',' ||
              c == '#') {
            bare = false;
          } else {
            last = c;
            ++i;
            break;
          }
        }
        if (c == '#') {
          in = In::comment;
        } else if ((c == '"' || c == '\'') && opens()) {
          const bool multi = starts(t, i, c == '"' ? "\"\"\"" : "'''");
          in = c == '"' ? (multi ? In::multi_basic : In::basic)
                        : (multi ? In::multi_literal : In::literal);
          last = c;
          i += multi ? 3 : 1;
          continue;
        } else if (c == '[') {
          nest.push_back(value_position() ? '[' : 'h');
        } else if (c == '{') {
          nest.push_back('{');
        } else if (c == ']' || c == '}') {
          if (!nest.empty()) nest.pop_back();
        } else if (c != ' ' && c != '\t' && c != '\r' && c != ',' && c != '.' && c != '=' &&
                   value_position()) {
          bare = true;
        }
        if (c != ' ' && c != '\t' && c != '\r') last = c;
        ++i;
        break;
      case In::comment:
        ++i;
        break;
      case In::basic:
        if (c == '\\' && i + 1 < t.size() && t[i + 1] != '\n') {
          i += 2;  // an escaped quote or backslash does not end the string
          continue;
        }
        if (c == '"') in = In::text;
        ++i;
        break;
      case In::literal:
        if (c == '\'') in = In::text;
        ++i;
        break;
      case In::multi_basic:
        if (c == '\\') {
          std::size_t j = i + 1;
          if (j < t.size() && toml_space(t[j])) {
            // A line-ending backslash: the whitespace and line breaks after it are trimmed.
            for (; j < t.size() && toml_space(t[j]); ++j) {
              if (t[j] == '\n') newline(j);
            }
            if (j < t.size() && static_cast<unsigned char>(t[j]) >= 0x80) {
              return fail(j, "a non-ASCII character after a line-ending backslash");
            }
            i = j;
            continue;
          }
          if (j < t.size() && static_cast<unsigned char>(t[j]) >= 0x80) {
            return fail(j, "a non-ASCII character after a backslash");
          }
          i = j + 1;
          continue;
        }
        [[fallthrough]];
      case In::multi_literal: {
        const char q = in == In::multi_basic ? '"' : '\'';
        if (starts(t, i, q == '"' ? "\"\"\"" : "'''")) {
          // The closing delimiter, with up to two quotes of content before it.
          while (i < t.size() && t[i] == q) ++i;
          in = In::text;
          continue;
        }
        ++i;
        break;
      }
    }
  }
  return {};
}

Result<toml::table> parse(std::string_view text, const std::string& source) {
  GS_TRY(check(text, source));
  try {
    return toml::parse(text, source);
  } catch (const toml::parse_error& e) {
    const auto& at = e.source().begin;
    return Error(Errc::invalid_argument, source + ":" + std::to_string(at.line) + ":" +
                                             std::to_string(at.column) + ": " +
                                             std::string(e.description()));
  }
}

Result<std::string> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error(Errc::not_found, path + ": cannot be read");
  std::string text;
  char buf[65536];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    text.append(buf, static_cast<std::size_t>(in.gcount()));
    if (text.size() > kMaxFileBytes) {
      return Error(Errc::too_large, path + ": larger than " +
                                        std::to_string(kMaxFileBytes >> 20) + " MiB");
    }
  }
  if (in.bad()) return Error(Errc::not_found, path + ": cannot be read");
  return text;
}

Result<toml::table> parse_file(const std::string& path) {
  GS_ASSIGN(std::string text, read_file(path));
  return parse(text, path);
}

}  // namespace gs::toml_text
