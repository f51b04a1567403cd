// TOML text as gridseal reads it (the configs, the policy): checked before toml++ sees it, then
// parsed with errors that name the file, line and column.
//
// Why the check: toml++ 3.3.0 (Debian 12's libtomlplusplus) reaches __builtin_unreachable(),
// undefined behaviour, when it tests certain non-ASCII characters for whitespace: a character
// such as U+00A7 or U+00E9 where a key, a value or whitespace may stand (upstream issue
// marzer/tomlplusplus#295, fixed upstream after 3.3.0), or right after a backslash in a
// multi-line basic string (#190). The policy fuzz target found it within seconds. gridseal's
// files need non-ASCII text only inside strings and comments, so check() refuses any other,
// with the position, and text that is not UTF-8. Nothing else changes: what passes is parsed by
// toml++ as before.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <toml++/toml.h>

#include "gridseal/result.h"

namespace gs::toml_text {

inline constexpr std::size_t kMaxFileBytes = std::size_t{16} << 20;

// Errc::invalid_argument naming source:line:column: invalid UTF-8; a non-ASCII character
// outside strings and comments; one right after a backslash (or after a line-ending backslash
// and the whitespace it trims) in a multi-line basic string.
Status check(std::string_view text, const std::string& source);

// check(), then toml::parse; syntax errors name source:line:column.
Result<toml::table> parse(std::string_view text, const std::string& source);

// The file's text: Errc::not_found when it cannot be read, Errc::too_large beyond
// kMaxFileBytes.
Result<std::string> read_file(const std::string& path);

// read_file(), then parse().
Result<toml::table> parse_file(const std::string& path);

}  // namespace gs::toml_text
