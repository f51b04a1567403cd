// TOML configuration loading and validation.
#include "src/config.h"

#include <filesystem>

#include "src/toml_fields.h"
#include "src/toml_text.h"

namespace gs::config {

namespace fs = std::filesystem;

using namespace toml_fields;

Result<Config> load(const std::string& path) {
  GS_ASSIGN(toml::table root, toml_text::parse_file(path));
  Config c;
  c.source = path;
  const fs::path dir = fs::absolute(path).parent_path();
  GS_TRY(check_keys(root, path, "", {"base_oid", "hsm", "store", "ses", "dkus", "server",
                                     "policy", "metrics", "tls", "log", "relay", "rollover",
                                     "audit"}));
  GS_TRY(get_string(root, "base_oid", path, "", c.base_oid));
  GS_TRY(get_string(root, "policy", path, "", c.policy));
  if (const toml::node* h = root.get("hsm")) {
    const toml::table* t = h->as_table();
    if (t == nullptr) return key_error(path, "hsm", "must be a table");
    GS_TRY(check_keys(*t, path, "hsm.",
                      {"module", "token_label", "pin_file", "pin_env", "so_pin_file",
                       "softhsm_dir", "sessions", "key_cache", "command_key_session_copy",
                       "bound_aes", "bound_aes_sessions"}));
    GS_TRY(get_string(*t, "module", path, "hsm.", c.hsm.module));
    GS_TRY(get_string(*t, "token_label", path, "hsm.", c.hsm.token_label));
    GS_TRY(get_string(*t, "pin_file", path, "hsm.", c.hsm.pin_file));
    GS_TRY(get_string(*t, "pin_env", path, "hsm.", c.hsm.pin_env));
    GS_TRY(get_string(*t, "so_pin_file", path, "hsm.", c.hsm.so_pin_file));
    GS_TRY(get_string(*t, "softhsm_dir", path, "hsm.", c.hsm.softhsm_dir));
    GS_TRY(get_int(*t, "sessions", path, "hsm.", 1, 256, c.hsm.sessions));
    GS_TRY(get_int(*t, "key_cache", path, "hsm.", 16, 10'000'000, c.hsm.key_cache));
    GS_TRY(get_bool(*t, "command_key_session_copy", path, "hsm.", c.hsm.command_key_session_copy));
    GS_TRY(get_bool(*t, "bound_aes", path, "hsm.", c.hsm.bound_aes));
    GS_TRY(get_int(*t, "bound_aes_sessions", path, "hsm.", 0, 100'000'000,
                   c.hsm.bound_aes_sessions));
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
  c.hsm.module = resolve_path(dir, c.hsm.module);
  c.hsm.pin_file = resolve_path(dir, c.hsm.pin_file);
  c.hsm.so_pin_file = resolve_path(dir, c.hsm.so_pin_file);
  c.hsm.softhsm_dir = resolve_path(dir, c.hsm.softhsm_dir);
  c.store.path = resolve_path(dir, c.store.path);
  if (!c.policy.empty()) c.policy = resolve_path(dir, c.policy);
  return c;
}

}  // namespace gs::config
