// gridseal-bench chain scenarios: the bench plays the collection engine end to end,
// command -> gridseal-sesd -> relay/meter (gridseal-metersim serve) -> response -> gridseal-dkusd
// -> cleartext, and checks every cleartext. Scenarios: read, disconnect, dr, forged, replay,
// mixed, and rollover (reads while a key-rollover campaign started with the `gridseal` CLI is
// run by the DKUS).
#pragma once

namespace gs::bench {

int run_chain_read(int argc, char** argv);
int run_chain_disconnect(int argc, char** argv);
int run_chain_dr(int argc, char** argv);
int run_chain_forged(int argc, char** argv);
int run_chain_replay(int argc, char** argv);
int run_chain_mixed(int argc, char** argv);
int run_chain_rollover(int argc, char** argv);
void usage_chain();
void usage_rollover();

}  // namespace gs::bench
