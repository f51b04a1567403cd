// Token data objects (CKO_DATA) that hold a small mutable text for gridseal, such as the audit
// chain anchor (src/audit.h). Private (found, read and changed only after user login).
// SoftHSM2 2.6 refuses to change a data object's CKA_VALUE after creation
// (CKR_ATTRIBUTE_READ_ONLY: PKCS#11 does not say it may change) but lets CKA_LABEL change, so
// the text is the label and the objects are found by their CKA_APPLICATION.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "gridseal/result.h"
#include "hsm/session.h"
#include "hsm/types.h"

namespace gs::hsm {

inline constexpr std::size_t kMaxDataText = 256;

// Every token data object whose CKA_APPLICATION is `application` (at most 64).
Result<std::vector<ObjectHandle>> find_data_objects(Session& s, std::string_view application);
// A new token data object: CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_APPLICATION, and `text`
// (1..kMaxDataText bytes) as CKA_LABEL.
Result<ObjectHandle> create_data_object(Session& s, std::string_view application,
                                        std::string_view text);
// The object's text (CKA_LABEL); Errc::too_large above kMaxDataText.
Result<std::string> read_data_text(Session& s, ObjectHandle h);
// C_SetAttributeValue(CKA_LABEL).
Status write_data_text(Session& s, ObjectHandle h, std::string_view text);

}  // namespace gs::hsm
