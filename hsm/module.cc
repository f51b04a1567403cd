// Module: dlopen of a PKCS#11 library, C_Initialize/C_Finalize, tokens, CKR_* names and errors.
#include "hsm/module.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>

#include "hsm/p11.h"

namespace gs::hsm {
namespace {

std::mutex g_loaded_mu;
std::set<const void*> g_loaded;  // function lists initialised by a live Module

struct CkrName {
  CK_RV rv;
  const char* name;
};

#define GS_CKR(x) {x, #x}
constexpr CkrName kCkrNames[] = {
    GS_CKR(CKR_OK),
    GS_CKR(CKR_CANCEL),
    GS_CKR(CKR_HOST_MEMORY),
    GS_CKR(CKR_SLOT_ID_INVALID),
    GS_CKR(CKR_GENERAL_ERROR),
    GS_CKR(CKR_FUNCTION_FAILED),
    GS_CKR(CKR_ARGUMENTS_BAD),
    GS_CKR(CKR_NO_EVENT),
    GS_CKR(CKR_NEED_TO_CREATE_THREADS),
    GS_CKR(CKR_CANT_LOCK),
    GS_CKR(CKR_ATTRIBUTE_READ_ONLY),
    GS_CKR(CKR_ATTRIBUTE_SENSITIVE),
    GS_CKR(CKR_ATTRIBUTE_TYPE_INVALID),
    GS_CKR(CKR_ATTRIBUTE_VALUE_INVALID),
    GS_CKR(CKR_DATA_INVALID),
    GS_CKR(CKR_DATA_LEN_RANGE),
    GS_CKR(CKR_DEVICE_ERROR),
    GS_CKR(CKR_DEVICE_MEMORY),
    GS_CKR(CKR_DEVICE_REMOVED),
    GS_CKR(CKR_ENCRYPTED_DATA_INVALID),
    GS_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE),
    GS_CKR(CKR_FUNCTION_CANCELED),
    GS_CKR(CKR_FUNCTION_NOT_PARALLEL),
    GS_CKR(CKR_FUNCTION_NOT_SUPPORTED),
    GS_CKR(CKR_KEY_HANDLE_INVALID),
    GS_CKR(CKR_KEY_SIZE_RANGE),
    GS_CKR(CKR_KEY_TYPE_INCONSISTENT),
    GS_CKR(CKR_KEY_NOT_NEEDED),
    GS_CKR(CKR_KEY_CHANGED),
    GS_CKR(CKR_KEY_NEEDED),
    GS_CKR(CKR_KEY_INDIGESTIBLE),
    GS_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED),
    GS_CKR(CKR_KEY_NOT_WRAPPABLE),
    GS_CKR(CKR_KEY_UNEXTRACTABLE),
    GS_CKR(CKR_MECHANISM_INVALID),
    GS_CKR(CKR_MECHANISM_PARAM_INVALID),
    GS_CKR(CKR_OBJECT_HANDLE_INVALID),
    GS_CKR(CKR_OPERATION_ACTIVE),
    GS_CKR(CKR_OPERATION_NOT_INITIALIZED),
    GS_CKR(CKR_PIN_INCORRECT),
    GS_CKR(CKR_PIN_INVALID),
    GS_CKR(CKR_PIN_LEN_RANGE),
    GS_CKR(CKR_PIN_EXPIRED),
    GS_CKR(CKR_PIN_LOCKED),
    GS_CKR(CKR_SESSION_CLOSED),
    GS_CKR(CKR_SESSION_COUNT),
    GS_CKR(CKR_SESSION_HANDLE_INVALID),
    GS_CKR(CKR_SESSION_PARALLEL_NOT_SUPPORTED),
    GS_CKR(CKR_SESSION_READ_ONLY),
    GS_CKR(CKR_SESSION_EXISTS),
    GS_CKR(CKR_SESSION_READ_ONLY_EXISTS),
    GS_CKR(CKR_SESSION_READ_WRITE_SO_EXISTS),
    GS_CKR(CKR_SIGNATURE_INVALID),
    GS_CKR(CKR_SIGNATURE_LEN_RANGE),
    GS_CKR(CKR_TEMPLATE_INCOMPLETE),
    GS_CKR(CKR_TEMPLATE_INCONSISTENT),
    GS_CKR(CKR_TOKEN_NOT_PRESENT),
    GS_CKR(CKR_TOKEN_NOT_RECOGNIZED),
    GS_CKR(CKR_TOKEN_WRITE_PROTECTED),
    GS_CKR(CKR_UNWRAPPING_KEY_HANDLE_INVALID),
    GS_CKR(CKR_UNWRAPPING_KEY_SIZE_RANGE),
    GS_CKR(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT),
    GS_CKR(CKR_USER_ALREADY_LOGGED_IN),
    GS_CKR(CKR_USER_NOT_LOGGED_IN),
    GS_CKR(CKR_USER_PIN_NOT_INITIALIZED),
    GS_CKR(CKR_USER_TYPE_INVALID),
    GS_CKR(CKR_USER_ANOTHER_ALREADY_LOGGED_IN),
    GS_CKR(CKR_USER_TOO_MANY_TYPES),
    GS_CKR(CKR_WRAPPED_KEY_INVALID),
    GS_CKR(CKR_WRAPPED_KEY_LEN_RANGE),
    GS_CKR(CKR_WRAPPING_KEY_HANDLE_INVALID),
    GS_CKR(CKR_WRAPPING_KEY_SIZE_RANGE),
    GS_CKR(CKR_WRAPPING_KEY_TYPE_INCONSISTENT),
    GS_CKR(CKR_RANDOM_SEED_NOT_SUPPORTED),
    GS_CKR(CKR_RANDOM_NO_RNG),
    GS_CKR(CKR_DOMAIN_PARAMS_INVALID),
    GS_CKR(CKR_CURVE_NOT_SUPPORTED),
    GS_CKR(CKR_BUFFER_TOO_SMALL),
    GS_CKR(CKR_SAVED_STATE_INVALID),
    GS_CKR(CKR_INFORMATION_SENSITIVE),
    GS_CKR(CKR_STATE_UNSAVEABLE),
    GS_CKR(CKR_CRYPTOKI_NOT_INITIALIZED),
    GS_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED),
    GS_CKR(CKR_MUTEX_BAD),
    GS_CKR(CKR_MUTEX_NOT_LOCKED),
    GS_CKR(CKR_FUNCTION_REJECTED),
};
#undef GS_CKR

constexpr std::size_t kMaxSlots = 1024;

}  // namespace

namespace detail {
std::string trim_field(const unsigned char* p, std::size_t n) {
  while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\0')) {
    --n;
  }
  return std::string(reinterpret_cast<const char*>(p), n);
}
}  // namespace detail

std::string ckr_name(ReturnValue rv) {
  for (const auto& e : kCkrNames) {
    if (e.rv == rv) {
      return e.name;
    }
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "CKR_0x%lX", rv);
  return buf;
}

Errc ckr_errc(ReturnValue rv) {
  switch (rv) {
    case CKR_OK:
      return Errc::ok;
    case CKR_SLOT_ID_INVALID:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
    case CKR_WRAPPING_KEY_HANDLE_INVALID:
    case CKR_UNWRAPPING_KEY_HANDLE_INVALID:
      return Errc::not_found;
    case CKR_MECHANISM_INVALID:
    case CKR_FUNCTION_NOT_SUPPORTED:
    case CKR_ATTRIBUTE_TYPE_INVALID:
    case CKR_CURVE_NOT_SUPPORTED:
    case CKR_RANDOM_NO_RNG:
      return Errc::unsupported;
    case CKR_SIGNATURE_INVALID:
    case CKR_SIGNATURE_LEN_RANGE:
      return Errc::bad_signature;
    case CKR_ARGUMENTS_BAD:
    case CKR_DATA_LEN_RANGE:
    case CKR_DATA_INVALID:
    case CKR_ATTRIBUTE_VALUE_INVALID:
    case CKR_TEMPLATE_INCOMPLETE:
    case CKR_TEMPLATE_INCONSISTENT:
    case CKR_MECHANISM_PARAM_INVALID:
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
    case CKR_KEY_SIZE_RANGE:
    case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_WRAPPED_KEY_INVALID:
    case CKR_WRAPPED_KEY_LEN_RANGE:
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_DOMAIN_PARAMS_INVALID:
      return Errc::invalid_argument;
    case CKR_BUFFER_TOO_SMALL:
      return Errc::too_large;
    default:
      return Errc::crypto_failure;
  }
}

Error ckr_error(const char* function, ReturnValue rv) {
  return Error(ckr_errc(rv), std::string(function) + ": " + ckr_name(rv));
}

bool ckr_session_lost(ReturnValue rv) {
  return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED || rv == CKR_DEVICE_ERROR ||
         rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT;
}

Result<std::unique_ptr<Module>> Module::open(const std::string& library_path) {
  if (library_path.empty()) {
    return Error(Errc::invalid_argument, "PKCS#11 module path is empty");
  }
  struct stat st {};
  if (::stat(library_path.c_str(), &st) != 0) {
    return Error(Errc::not_found, "PKCS#11 module not found: " + library_path);
  }
  // RTLD_NODELETE: some modules (SoftHSM2 with OpenSSL 3) register exit handlers that must not
  // outlive their code.
  void* dl = ::dlopen(library_path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (dl == nullptr) {
    const char* why = ::dlerror();
    return Error(Errc::not_found, "cannot load PKCS#11 module " + library_path + ": " +
                                      (why != nullptr ? why : "dlopen failed"));
  }
  auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(dl, "C_GetFunctionList"));
  if (get == nullptr) {
    ::dlclose(dl);
    return Error(Errc::unsupported, "not a PKCS#11 module (no C_GetFunctionList): " + library_path);
  }
  CK_FUNCTION_LIST* fns = nullptr;
  CK_RV rv = get(&fns);
  if (rv != CKR_OK || fns == nullptr) {
    ::dlclose(dl);
    return ckr_error("C_GetFunctionList", rv != CKR_OK ? rv : CKR_GENERAL_ERROR);
  }
  std::unique_ptr<Module> m(new Module());
  m->path_ = library_path;
  m->dl_ = dl;
  m->functions_ = fns;
  {
    std::lock_guard<std::mutex> lock(g_loaded_mu);
    if (g_loaded.count(fns) != 0) {
      m->functions_ = nullptr;  // the destructor must not finalise the other Module's library
      return Error(Errc::bad_value,
                   "PKCS#11 module already opened in this process: " + library_path);
    }
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    rv = fns->C_Initialize(&args);
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
      m->functions_ = nullptr;
      return Error(Errc::bad_value, "PKCS#11 module initialised elsewhere in this process: " +
                                        library_path);
    }
    if (rv != CKR_OK) {
      m->functions_ = nullptr;
      return ckr_error("C_Initialize", rv);
    }
    g_loaded.insert(fns);
  }
  m->initialized_ = true;
  return m;
}

Module::~Module() {
  if (initialized_ && functions_ != nullptr) {
    auto* fns = static_cast<CK_FUNCTION_LIST*>(const_cast<void*>(functions_));
    fns->C_Finalize(nullptr);
    std::lock_guard<std::mutex> lock(g_loaded_mu);
    g_loaded.erase(functions_);
  }
  if (dl_ != nullptr) {
    ::dlclose(dl_);
  }
}

std::string Module::library_description() const {
  CK_INFO info{};
  if (detail::fl(*this)->C_GetInfo(&info) != CKR_OK) {
    return {};
  }
  return detail::trim_field(info.manufacturerID, sizeof info.manufacturerID) + " " +
         detail::trim_field(info.libraryDescription, sizeof info.libraryDescription) + " " +
         std::to_string(info.libraryVersion.major) + "." +
         std::to_string(info.libraryVersion.minor);
}

Result<std::vector<TokenInfo>> Module::tokens() const {
  CK_FUNCTION_LIST* f = detail::fl(*this);
  CK_ULONG count = 0;
  CK_RV rv = f->C_GetSlotList(CK_TRUE, nullptr, &count);
  if (rv != CKR_OK) {
    return ckr_error("C_GetSlotList", rv);
  }
  if (count > kMaxSlots) {
    return Error(Errc::too_large, "PKCS#11 module reports too many slots");
  }
  std::vector<CK_SLOT_ID> slots(count);
  if (count > 0) {
    rv = f->C_GetSlotList(CK_TRUE, slots.data(), &count);
    if (rv != CKR_OK) {
      return ckr_error("C_GetSlotList", rv);
    }
    slots.resize(std::min<CK_ULONG>(count, slots.size()));
  }
  std::vector<TokenInfo> out;
  out.reserve(slots.size());
  for (CK_SLOT_ID s : slots) {
    CK_TOKEN_INFO ti{};
    rv = f->C_GetTokenInfo(s, &ti);
    if (rv == CKR_TOKEN_NOT_PRESENT) {
      continue;
    }
    if (rv != CKR_OK) {
      return ckr_error("C_GetTokenInfo", rv);
    }
    TokenInfo t;
    t.slot = s;
    t.label = detail::trim_field(ti.label, sizeof ti.label);
    t.manufacturer = detail::trim_field(ti.manufacturerID, sizeof ti.manufacturerID);
    t.model = detail::trim_field(ti.model, sizeof ti.model);
    t.serial = detail::trim_field(ti.serialNumber, sizeof ti.serialNumber);
    t.initialized = (ti.flags & CKF_TOKEN_INITIALIZED) != 0;
    t.user_pin_initialized = (ti.flags & CKF_USER_PIN_INITIALIZED) != 0;
    out.push_back(std::move(t));
  }
  return out;
}

Result<SlotId> Module::find_slot(std::string_view token_label) const {
  GS_ASSIGN(auto toks, tokens());
  for (const auto& t : toks) {
    if (t.initialized && t.label == token_label) {
      return t.slot;
    }
  }
  return Error(Errc::not_found, "no PKCS#11 token labelled '" + std::string(token_label) +
                                    "' in " + path_);
}

Result<SlotId> Module::init_token(std::string_view label, const Secret& so_pin,
                                  const Secret& user_pin) {
  if (label.empty() || label.size() > 32) {
    return Error(Errc::invalid_argument, "token label must be 1..32 characters");
  }
  if (so_pin.empty() || user_pin.empty()) {
    return Error(Errc::invalid_argument, "empty PIN");
  }
  GS_ASSIGN(auto toks, tokens());
  const TokenInfo* free_slot = nullptr;
  for (const auto& t : toks) {
    if (t.initialized && t.label == label) {
      return Error(Errc::bad_value, "a token labelled '" + std::string(label) + "' already exists");
    }
    if (!t.initialized && free_slot == nullptr) {
      free_slot = &t;
    }
  }
  if (free_slot == nullptr) {
    return Error(Errc::not_found, "no free slot to initialise a token in " + path_);
  }
  CK_FUNCTION_LIST* f = detail::fl(*this);
  unsigned char padded[32];
  std::memset(padded, ' ', sizeof padded);
  std::memcpy(padded, label.data(), label.size());
  CK_RV rv = f->C_InitToken(free_slot->slot, const_cast<CK_UTF8CHAR*>(so_pin.view().data()),
                            so_pin.size(), padded);
  if (rv != CKR_OK) {
    return ckr_error("C_InitToken", rv);
  }
  GS_ASSIGN(SlotId slot, find_slot(label));
  CK_SESSION_HANDLE h = 0;
  rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h);
  if (rv != CKR_OK) {
    return ckr_error("C_OpenSession", rv);
  }
  rv = f->C_Login(h, CKU_SO, const_cast<CK_UTF8CHAR*>(so_pin.view().data()), so_pin.size());
  if (rv == CKR_OK) {
    rv = f->C_InitPIN(h, const_cast<CK_UTF8CHAR*>(user_pin.view().data()), user_pin.size());
    f->C_Logout(h);
    f->C_CloseSession(h);
    if (rv != CKR_OK) {
      return ckr_error("C_InitPIN", rv);
    }
    return slot;
  }
  f->C_CloseSession(h);
  return ckr_error("C_Login(SO)", rv);
}

Status Module::close_all_sessions(SlotId slot) {
  CK_RV rv = detail::fl(*this)->C_CloseAllSessions(slot);
  if (rv != CKR_OK) {
    return ckr_error("C_CloseAllSessions", rv);
  }
  return {};
}

namespace {
constexpr std::size_t kMaxPin = 255;

Result<Secret> finish_pin(std::string& text, const std::string& where) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) {
    text.pop_back();
  }
  if (text.empty()) {
    secure_zero(text.data(), text.size());
    return Error(Errc::bad_value, "empty PIN in " + where);
  }
  if (text.size() > kMaxPin) {
    secure_zero(text.data(), text.size());
    return Error(Errc::too_large, "PIN too long in " + where);
  }
  Secret s{std::string_view(text)};
  secure_zero(text.data(), text.size());
  return s;
}
}  // namespace

Result<Secret> read_pin_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return Error(Errc::not_found, "PIN file not found: " + path);
  }
  if (!S_ISREG(st.st_mode)) {
    return Error(Errc::bad_value, "PIN file is not a regular file: " + path);
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    return Error(Errc::bad_value, "PIN file is accessible by group or others (chmod 600): " + path);
  }
  if (st.st_size > static_cast<off_t>(kMaxPin + 2)) {
    return Error(Errc::too_large, "PIN file too large: " + path);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return Error(Errc::not_found, "cannot read PIN file: " + path);
  }
  std::string text;
  text.reserve(kMaxPin + 3);
  char buf[kMaxPin + 3];
  in.read(buf, sizeof buf);
  std::size_t n = static_cast<std::size_t>(in.gcount());
  // Only the first line.
  std::size_t end = 0;
  while (end < n && buf[end] != '\n') {
    ++end;
  }
  text.assign(buf, end);
  secure_zero(buf, sizeof buf);
  return finish_pin(text, "file " + path);
}

Result<Secret> read_pin_env(const char* variable) {
  if (variable == nullptr || *variable == '\0') {
    return Error(Errc::invalid_argument, "no PIN environment variable named");
  }
  const char* v = std::getenv(variable);
  if (v == nullptr) {
    return Error(Errc::not_found, std::string("PIN environment variable not set: ") + variable);
  }
  std::string text(v, ::strnlen(v, kMaxPin + 1));
  return finish_pin(text, std::string("environment variable ") + variable);
}

}  // namespace gs::hsm
