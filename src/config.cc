// TOML configuration loading and validation.
#include "src/config.h"

#include <filesystem>
#include <set>
#include <toml++/toml.h>

namespace gs::config {

namespace fs = std::filesystem;

namespace {

Error key_error(const std::string& file, const std::string& key, const std::string& what) {
  return Error(Errc::invalid_argument, file + ": " + key + ": " + what);
}

Status check_keys(const toml::table& t, const std::string& file, const std::string& prefix,
                  const std::set<std::string>& allowed) {
  for (const auto& [k, v] : t) {
    (void)v;
    if (!allowed.contains(std::string(k.str()))) {
      return key_error(file, prefix + std::string(k.str()), "unknown key");
    }
  }
  return {};
}

Status get_string(const toml::table& t, const char* key, const std::string& file,
                  const std::string& prefix, std::string& out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return {};
  auto v = n->value<std::string>();
  if (!v) return key_error(file, prefix + key, "must be a string");
  out = *v;
  return {};
}

Status get_u32(const toml::table& t, const char* key, const std::string& file,
               const std::string& prefix, std::uint32_t lo, std::uint32_t hi, std::uint32_t& out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return {};
  auto v = n->value<std::int64_t>();
  if (!v) return key_error(file, prefix + key, "must be an integer");
  if (*v < lo || *v > hi) {
    return key_error(file, prefix + key,
                     "must be between " + std::to_string(lo) + " and " + std::to_string(hi));
  }
  out = static_cast<std::uint32_t>(*v);
  return {};
}

std::string resolve(const fs::path& dir, const std::string& p) {
  if (p.empty() || fs::path(p).is_absolute()) return p;
  return (dir / p).lexically_normal().string();
}

}  // namespace

Result<Config> load(const std::string& path) {
  toml::table root;
  try {
    root = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    return Error(Errc::invalid_argument, path + ":" + std::to_string(where.line) + ":" +
                                             std::to_string(where.column) + ": " +
                                             std::string(e.description()));
  }
  Config c;
  c.source = path;
  const fs::path dir = fs::absolute(path).parent_path();
  GS_TRY(check_keys(root, path, "", {"base_oid", "hsm", "store", "ses", "dkus", "server",
                                     "policy", "metrics", "tls", "log", "relay", "rollover"}));
  GS_TRY(get_string(root, "base_oid", path, "", c.base_oid));
  if (const toml::node* h = root.get("hsm")) {
    const toml::table* t = h->as_table();
    if (t == nullptr) return key_error(path, "hsm", "must be a table");
    GS_TRY(check_keys(*t, path, "hsm.",
                      {"module", "token_label", "pin_file", "pin_env", "so_pin_file",
                       "softhsm_dir", "sessions", "key_cache"}));
    GS_TRY(get_string(*t, "module", path, "hsm.", c.hsm.module));
    GS_TRY(get_string(*t, "token_label", path, "hsm.", c.hsm.token_label));
    GS_TRY(get_string(*t, "pin_file", path, "hsm.", c.hsm.pin_file));
    GS_TRY(get_string(*t, "pin_env", path, "hsm.", c.hsm.pin_env));
    GS_TRY(get_string(*t, "so_pin_file", path, "hsm.", c.hsm.so_pin_file));
    GS_TRY(get_string(*t, "softhsm_dir", path, "hsm.", c.hsm.softhsm_dir));
    GS_TRY(get_u32(*t, "sessions", path, "hsm.", 1, 256, c.hsm.sessions));
    GS_TRY(get_u32(*t, "key_cache", path, "hsm.", 16, 10'000'000, c.hsm.key_cache));
  }
  if (const toml::node* s = root.get("store")) {
    const toml::table* t = s->as_table();
    if (t == nullptr) return key_error(path, "store", "must be a table");
    GS_TRY(check_keys(*t, path, "store.", {"path"}));
    GS_TRY(get_string(*t, "path", path, "store.", c.store.path));
  }
  if (c.hsm.token_label.empty() || c.hsm.token_label.size() > 32) {
    return key_error(path, "hsm.token_label", "must be 1..32 characters");
  }
  if (c.hsm.pin_file.empty() && c.hsm.pin_env.empty()) {
    return key_error(path, "hsm.pin_file", "one of hsm.pin_file or hsm.pin_env is required");
  }
  c.hsm.module = resolve(dir, c.hsm.module);
  c.hsm.pin_file = resolve(dir, c.hsm.pin_file);
  c.hsm.so_pin_file = resolve(dir, c.hsm.so_pin_file);
  c.hsm.softhsm_dir = resolve(dir, c.hsm.softhsm_dir);
  c.store.path = resolve(dir, c.store.path);
  return c;
}

}  // namespace gs::config
