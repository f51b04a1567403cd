// Scheduling policy of the daemons' short-running threads.
#pragma once

#include <sched.h>

namespace gs {

// Puts the calling thread under SCHED_BATCH (Linux; no privilege needed). Such a thread does
// not preempt the running one when it wakes: it waits for that one's time slice to end or for
// it to block. For the event loops and the audit writer, whose work per wake-up is short: the
// SES's handler then finishes its sign or seal instead of being interrupted mid-operation a few
// thousand times a second and resuming with its caches refilled by the other thread. False when
// the kernel refused (the thread keeps its policy).
inline bool use_batch_scheduling() noexcept {
  sched_param p{};
  p.sched_priority = 0;
  return sched_setscheduler(0, SCHED_BATCH, &p) == 0;
}

// Puts the calling thread under SCHED_IDLE: it runs only when a CPU has nothing else to run. For
// long read-only work next to serving daemons (`gridseal audit archive` verifying the trail and
// writing its file); never for a thread that holds a lock the daemons wait for.
inline bool use_idle_scheduling() noexcept {
  sched_param p{};
  p.sched_priority = 0;
  return sched_setscheduler(0, SCHED_IDLE, &p) == 0;
}

}  // namespace gs
