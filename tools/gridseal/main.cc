// Entry point of the `gridseal` operator CLI.
#include <cstdio>
#include <exception>

#include "tools/gridseal/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"gridseal: operator tool for the gridseal AMI security appliance"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "gridseal 0.1.0");
  int exit_code = gs::cli::kExitOk;
  gs::cli::register_c1222(app, exit_code);
  gs::cli::register_hsm(app, exit_code);
  gs::cli::register_meters(app, exit_code);
  gs::cli::register_receipts(app, exit_code);
  gs::cli::register_audit(app, exit_code);
  gs::cli::register_rollover(app, exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return gs::cli::kExitUsage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gridseal: %s\n", e.what());
    return gs::cli::kExitFailed;
  }
  return exit_code;
}
