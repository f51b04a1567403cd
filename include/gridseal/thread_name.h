// Names the calling thread as `top -H`, `ps -L`, perf and gdb show it. Every long-lived thread
// of the daemons has a name starting "gs-", so that an operator sees which part is busy.
#pragma once

#include <pthread.h>

namespace gs {

// `name`: at most 15 characters (longer names are refused by the kernel and the thread keeps
// its inherited name).
inline void name_this_thread(const char* name) noexcept {
  pthread_setname_np(pthread_self(), name);
}

}  // namespace gs
