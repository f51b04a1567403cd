// Internal to hsm/*.cc: the PKCS#11 header and helpers for calling through the function list.
#pragma once

#include <p11-kit/pkcs11.h>

#include <type_traits>

#include "hsm/module.h"
#include "hsm/types.h"

namespace gs::hsm::detail {

static_assert(std::is_same_v<CK_ULONG, unsigned long>);
static_assert(std::is_same_v<CK_OBJECT_HANDLE, ObjectHandle>);
static_assert(std::is_same_v<CK_SLOT_ID, SlotId>);
static_assert(std::is_same_v<CK_SESSION_HANDLE, SessionHandle>);
static_assert(std::is_same_v<CK_RV, ReturnValue>);

inline CK_FUNCTION_LIST* fl(const Module& m) {
  return static_cast<CK_FUNCTION_LIST*>(const_cast<void*>(m.function_list()));
}

// CK_BBOOL constants that templates can point at.
inline CK_BBOOL kTrue = CK_TRUE;
inline CK_BBOOL kFalse = CK_FALSE;

inline CK_ATTRIBUTE attr_bool(CK_ATTRIBUTE_TYPE t, bool v) {
  return CK_ATTRIBUTE{t, v ? &kTrue : &kFalse, sizeof(CK_BBOOL)};
}
template <typename T>
inline CK_ATTRIBUTE attr_of(CK_ATTRIBUTE_TYPE t, T* v) {
  return CK_ATTRIBUTE{t, v, sizeof(T)};
}
inline CK_ATTRIBUTE attr_bytes(CK_ATTRIBUTE_TYPE t, const void* p, std::size_t n) {
  return CK_ATTRIBUTE{t, const_cast<void*>(p), static_cast<CK_ULONG>(n)};
}

// Copies a blank-padded PKCS#11 text field, trimming trailing blanks and NULs.
std::string trim_field(const unsigned char* p, std::size_t n);

}  // namespace gs::hsm::detail
