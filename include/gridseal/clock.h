// The two clocks gridseal uses: UTC seconds (IVs, validity windows, receipts) and a monotonic
// nanosecond count (rate limits, shared by processes: CLOCK_MONOTONIC is system-wide).
#pragma once

#include <chrono>
#include <cstdint>

namespace gs {

inline std::uint32_t utc_now() {
  return static_cast<std::uint32_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

inline std::int64_t mono_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace gs
