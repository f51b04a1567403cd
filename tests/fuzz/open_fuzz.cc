// libFuzzer target: open() of arbitrary messages under two known keys; whatever opens must
// re-seal to the same bytes.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "c1222/eax_prime.h"
#include "c1222/security.h"
#include "src/host_aes.h"

namespace {
struct Keys {
  std::unique_ptr<gs::HostAes> aes[2];
  std::optional<gs::c1222::EaxPrime> eax[2];
  Keys() {
    const char* hex[2] = {"6624c7e23034e4036fe5cb3a8b5dab44", "01020304050607080102030405060708"};
    for (int i = 0; i < 2; ++i) {
      aes[i] = std::move(gs::HostAes::make(*gs::from_hex(hex[i]))).value();
      eax[i].emplace(std::move(gs::c1222::EaxPrime::make(*aes[i])).value());
    }
  }
};
Keys& keys() {
  static Keys k;
  return k;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gs::c1222;
  gs::ByteView wire(data, size);
  KeyLookup lookup = [](std::uint8_t id) -> EaxPrime* {
    if (id == 0) return &*keys().eax[0];
    if (id == 2) return &*keys().eax[1];
    return nullptr;
  };
  auto o = open(wire, lookup);
  if (!o.ok()) {
    // Also try to seal it as if it were mode 0 (refused or not, it must not crash).
    (void)seal(wire, SecurityMode::authenticated, *keys().eax[1]);
    return 0;
  }
  // A message that opens re-seals to exactly its input when the input was minimally encoded.
  auto again = seal(gs::ByteView(o->wire), o->mode, *lookup(o->key_id));
  if (!again.ok()) return 0;  // e.g. AC without IV opens (key id 0) but cannot be sealed
  auto back = open(*again, lookup);
  if (!back.ok() || back->wire != o->wire) __builtin_trap();
  return 0;
}
