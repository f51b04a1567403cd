// Reading TOML configuration fields with errors that name the file and the key (shared by the
// CLI's config, the daemons' configs). Missing keys leave the default in `out`.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <toml++/toml.h>

#include "c1222/oid.h"
#include "gridseal/result.h"

namespace gs::toml_fields {

inline Error key_error(const std::string& file, const std::string& key, const std::string& what) {
  return Error(Errc::invalid_argument, file + ": " + key + ": " + what);
}

// Unknown keys are errors: a typo must not pass silently.
inline Status check_keys(const toml::table& t, const std::string& file, const std::string& prefix,
                         const std::set<std::string>& allowed) {
  for (const auto& [k, v] : t) {
    (void)v;
    if (!allowed.contains(std::string(k.str()))) {
      return key_error(file, prefix + std::string(k.str()), "unknown key");
    }
  }
  return {};
}

inline Status get_string(const toml::table& t, const char* key, const std::string& file,
                         const std::string& prefix, std::string& out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return {};
  auto v = n->value<std::string>();
  if (!v) return key_error(file, prefix + key, "must be a string");
  out = *v;
  return {};
}

inline Status get_bool(const toml::table& t, const char* key, const std::string& file,
                       const std::string& prefix, bool& out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return {};
  auto v = n->value_exact<bool>();
  if (!v) return key_error(file, prefix + key, "must be true or false");
  out = *v;
  return {};
}

template <typename T>
Status get_int(const toml::table& t, const char* key, const std::string& file,
               const std::string& prefix, std::int64_t lo, std::int64_t hi, T& out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return {};
  auto v = n->value<std::int64_t>();
  if (!v || !n->is_integer()) return key_error(file, prefix + key, "must be an integer");
  if (*v < lo || *v > hi) {
    return key_error(file, prefix + key,
                     "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  }
  out = static_cast<T>(*v);
  return {};
}

// Milliseconds as an integer key ("..._ms").
inline Status get_ms(const toml::table& t, const char* key, const std::string& file,
                     const std::string& prefix, std::int64_t lo, std::int64_t hi,
                     std::chrono::milliseconds& out) {
  std::int64_t v = out.count();
  GS_TRY(get_int(t, key, file, prefix, lo, hi, v));
  out = std::chrono::milliseconds(v);
  return {};
}

// The sub-table `name` of root, nullptr when absent.
inline Result<const toml::table*> get_table(const toml::table& root, const char* name,
                                            const std::string& file) {
  const toml::node* n = root.get(name);
  if (n == nullptr) return static_cast<const toml::table*>(nullptr);
  const toml::table* t = n->as_table();
  if (t == nullptr) return key_error(file, name, "must be a table");
  return t;
}

// An AP title (relative ".n.m" or absolute dotted); empty is refused when required.
inline Status get_title(const toml::table& t, const char* key, const std::string& file,
                        const std::string& prefix, c1222::OwnedApTitle& out, bool required) {
  std::string s;
  GS_TRY(get_string(t, key, file, prefix, s));
  if (s.empty()) {
    if (required) return key_error(file, prefix + key, "is required");
    return {};
  }
  auto title = c1222::OwnedApTitle::parse(s);
  if (!title.ok()) {
    return key_error(file, prefix + key, "not an AP title (" + title.error().message() + ")");
  }
  out = std::move(title).value();
  return {};
}

// A relative path in a config file is relative to the file's directory.
inline std::string resolve_path(const std::filesystem::path& dir, const std::string& p) {
  if (p.empty() || std::filesystem::path(p).is_absolute()) return p;
  return (dir / p).lexically_normal().string();
}

}  // namespace gs::toml_fields
