// Fuzz target: the meter simulator's two parsers of outside input. First byte even: the rest is
// a fleet state file (Fleet::parse must refuse anything malformed without crashing). Odd: the
// rest is a C12.22 message handed to a two-meter fleet as the relay would (decode, route by
// called title, Meter::handle).
#include <cstddef>
#include <cstdint>
#include <memory>

#include "c1222/message.h"
#include "c1222/oid.h"
#include "tools/metersim/fleet.h"

namespace {

gs::metersim::Fleet& fleet() {
  static std::unique_ptr<gs::metersim::Fleet> f = [] {
    gs::metersim::ExportOptions opt;
    opt.meters = 2;
    opt.seed = 1;
    opt.now = 1700000000;
    return gs::metersim::Fleet::generate(opt, nullptr).value();
  }();
  return *f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const gs::ByteView rest(data + 1, size - 1);
  if ((data[0] & 1) == 0) {
    (void)gs::metersim::Fleet::parse(rest);
    return 0;
  }
  auto m = gs::c1222::decode(rest);
  if (!m.ok() || !m->called_ap_title) return 0;
  const gs::Bytes title = m->called_ap_title->absolute(gs::c1222::default_base_oid());
  if (auto index = fleet().find(title)) {
    (void)fleet().handle(*index, *m, 1700000100);
  }
  return 0;
}
