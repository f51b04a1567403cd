// gridseal-bench: load generator with latency percentiles for the gridseal daemons.
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "tools/bench/chain.h"
#include "tools/bench/scenarios.h"

namespace {

using gs::bench::Subcommand;

const Subcommand kCommands[] = {
    {"ses", "secured commands/s and latency of gridseal-sesd (+ raw HSM composite)",
     gs::bench::run_ses, gs::bench::usage_ses},
    {"dkus", "opened meter messages/s and latency of gridseal-dkusd (+ raw HSM EAX' open)",
     gs::bench::run_dkus, gs::bench::usage_dkus},
    {"make-pki", "write a throw-away TLS test PKI (CA, server and client certificates)",
     gs::bench::run_make_pki, gs::bench::usage_make_pki},
    {"make-fleet", "write a fleet CSV of N meters with plain keys for `gridseal meters import`",
     gs::bench::run_make_fleet, gs::bench::usage_make_fleet},
    {"read", "chain: ST-23/ST-64 reads, SES -> relay/meter -> DKUS, cleartext checked",
     gs::bench::run_chain_read, gs::bench::usage_chain},
    {"disconnect", "chain: SP-26 disconnect + connect with MT-2042 receipts checked",
     gs::bench::run_chain_disconnect, gs::bench::usage_chain},
    {"dr", "chain: one DR broadcast to a group, signed once by the SES, signature checked",
     gs::bench::run_chain_dr, gs::bench::usage_chain},
    {"forged", "chain: tampered commands and meter responses are refused (sme)",
     gs::bench::run_chain_forged, gs::bench::usage_chain},
    {"replay", "chain: replayed commands and meter responses are refused (sme)",
     gs::bench::run_chain_replay, gs::bench::usage_chain},
    {"mixed", "chain: reads with disconnects, forged and replay checks mixed in",
     gs::bench::run_chain_mixed, gs::bench::usage_chain},
    {"rollover", "chain: reads while gridseal-dkusd rekeys meters (gridseal rollover start)",
     gs::bench::run_chain_rollover, gs::bench::usage_rollover},
    {"echo", "a loopback server that writes back what it reads: the ceiling of a measurement",
     gs::bench::run_echo, gs::bench::usage_echo},
};

void usage() {
  std::fprintf(stderr, "usage: gridseal-bench <command> [options]   (gridseal-bench <command> --help)\n\n");
  for (const Subcommand& c : kCommands) std::fprintf(stderr, "  %-11s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc < 2 || std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "--help") == 0) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  for (const Subcommand& c : kCommands) {
    if (std::strcmp(argv[1], c.name) != 0) continue;
    for (int i = 2; i < argc; ++i) {
      if (std::strcmp(argv[i], "-h") == 0 || std::strcmp(argv[i], "--help") == 0) {
        c.usage();
        return 0;
      }
    }
    return c.run(argc - 2, argv + 2);
  }
  std::fprintf(stderr, "gridseal-bench: unknown command '%s'\n", argv[1]);
  usage();
  return 2;
}
