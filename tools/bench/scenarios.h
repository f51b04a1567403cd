// gridseal-bench subcommands: each takes the arguments after its name and returns an exit code
// (0 ok, 1 the run failed or saw errors, 2 usage). The chain scenarios are in chain.h.
#pragma once

#include <string>

namespace gs::bench {

struct Subcommand {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
  void (*usage)();
};

// SES alone: secured commands/s, latency percentiles, errors by response code, optionally the
// raw HSM composite of the same token.
int run_ses(int argc, char** argv);
void usage_ses();

// DKUS alone: secured meter readings opened/s, latency percentiles, errors by response code,
// optionally the raw HSM EAX' open rate of the same token.
int run_dkus(int argc, char** argv);
void usage_dkus();

// Set-up helpers for measurements: a throw-away test PKI, and a fleet CSV with plain keys.
int run_make_pki(int argc, char** argv);
void usage_make_pki();
int run_make_fleet(int argc, char** argv);
void usage_make_fleet();

// The ceiling of a measurement: a loopback TCP server that writes back every byte it reads
// (run `dkus --echo` against it).
int run_echo(int argc, char** argv);
void usage_echo();

}  // namespace gs::bench
