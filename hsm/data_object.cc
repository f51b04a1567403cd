// Token data objects: see data_object.h.
#include "hsm/data_object.h"

#include <algorithm>

#include "hsm/p11.h"

namespace gs::hsm {
namespace {

using detail::attr_bool;
using detail::attr_bytes;
using detail::attr_of;

constexpr std::size_t kMaxApplication = 64;
constexpr std::size_t kMaxFound = 64;

CK_FUNCTION_LIST* F(Session& s) { return detail::fl(s.module()); }

Status need_open(Session& s) {
  if (!s.is_open()) return Error(Errc::invalid_argument, "HSM session is closed");
  return {};
}

Status check_application(std::string_view a) {
  if (a.empty() || a.size() > kMaxApplication) {
    return Error(Errc::invalid_argument, "data object application must be 1..64 characters");
  }
  return {};
}

Status check_text(std::string_view t) {
  if (t.empty() || t.size() > kMaxDataText) {
    return Error(Errc::invalid_argument, "data object text must be 1..256 bytes");
  }
  return {};
}

}  // namespace

Result<std::vector<ObjectHandle>> find_data_objects(Session& s, std::string_view application) {
  GS_TRY(need_open(s));
  GS_TRY(check_application(application));
  CK_OBJECT_CLASS c = CKO_DATA;
  CK_ATTRIBUTE t[] = {attr_of(CKA_CLASS, &c),
                      attr_bytes(CKA_APPLICATION, application.data(), application.size()),
                      attr_bool(CKA_TOKEN, true)};
  GS_TRY(s.check("C_FindObjectsInit", F(s)->C_FindObjectsInit(s.handle(), t, 3)));
  std::vector<ObjectHandle> found;
  CK_OBJECT_HANDLE batch[16];
  Status st;
  for (;;) {
    CK_ULONG n = 0;
    st = s.check("C_FindObjects", F(s)->C_FindObjects(s.handle(), batch, 16, &n));
    if (!st.ok() || n == 0) break;
    n = std::min<CK_ULONG>(n, 16);
    found.insert(found.end(), batch, batch + n);
    if (found.size() > kMaxFound) {
      st = Error(Errc::too_large,
                 "too many data objects of application '" + std::string(application) + "'");
      break;
    }
  }
  Status fin = s.check("C_FindObjectsFinal", F(s)->C_FindObjectsFinal(s.handle()));
  GS_TRY(st);
  GS_TRY(fin);
  return found;
}

Result<ObjectHandle> create_data_object(Session& s, std::string_view application,
                                        std::string_view text) {
  GS_TRY(need_open(s));
  GS_TRY(check_application(application));
  GS_TRY(check_text(text));
  CK_OBJECT_CLASS c = CKO_DATA;
  CK_ATTRIBUTE t[] = {attr_of(CKA_CLASS, &c),
                      attr_bool(CKA_TOKEN, true),
                      attr_bool(CKA_PRIVATE, true),
                      attr_bytes(CKA_APPLICATION, application.data(), application.size()),
                      attr_bytes(CKA_LABEL, text.data(), text.size()),
                      attr_bool(CKA_MODIFIABLE, true)};
  CK_OBJECT_HANDLE h = 0;
  GS_TRY(s.check("C_CreateObject(CKO_DATA)",
                 F(s)->C_CreateObject(s.handle(), t, sizeof t / sizeof t[0], &h)));
  return h;
}

Result<std::string> read_data_text(Session& s, ObjectHandle h) {
  GS_TRY(need_open(s));
  char buf[kMaxDataText];
  CK_ATTRIBUTE a{CKA_LABEL, buf, sizeof buf};
  const CK_RV rv = F(s)->C_GetAttributeValue(s.handle(), h, &a, 1);
  if (rv == CKR_BUFFER_TOO_SMALL) return Error(Errc::too_large, "data object text too large");
  GS_TRY(s.check("C_GetAttributeValue(CKA_LABEL)", rv));
  if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > sizeof buf) {
    return Error(Errc::too_large, "data object text too large");
  }
  return std::string(buf, a.ulValueLen);
}

Status write_data_text(Session& s, ObjectHandle h, std::string_view text) {
  GS_TRY(need_open(s));
  GS_TRY(check_text(text));
  CK_ATTRIBUTE a = attr_bytes(CKA_LABEL, text.data(), text.size());
  return s.check("C_SetAttributeValue(CKA_LABEL)", F(s)->C_SetAttributeValue(s.handle(), h, &a, 1));
}

}  // namespace gs::hsm
