// Entry point of the `gridseal` operator CLI.
#include <cstdio>
#include <exception>

#include "tools/gridseal/commands.h"
#include "tools/gridseal/operator_gate.h"

namespace gs::cli {

void build_app(CLI::App& app, int& exit_code, Gate& gate) {
  app.require_subcommand(1);
  app.set_version_flag("--version", "gridseal 0.1.0");
  register_c1222(app, exit_code);
  register_hsm(app, exit_code);
  register_meters(app, exit_code);
  register_receipts(app, exit_code);
  register_audit(app, exit_code);
  register_rollover(app, exit_code);
  register_policy(app, exit_code);
  register_grants(app, exit_code);
  register_cmdkeys(app, exit_code);
  register_operators(app, exit_code, gate);
  register_approvals(app, exit_code, gate);
  // Last: it adds the operator options to every state-changing command registered above.
  gate.install(app);
}

}  // namespace gs::cli

int main(int argc, char** argv) {
  CLI::App app{"gridseal: operator tool for the gridseal AMI security appliance"};
  int exit_code = gs::cli::kExitOk;
  gs::cli::Gate gate;
  gs::cli::build_app(app, exit_code, gate);
  try {
    app.parse(argc, argv);
  } catch (const gs::cli::GateStop& e) {
    if (*e.what() != '\0') std::fprintf(stderr, "%s\n", e.what());
    return e.code();
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
    gate.finish(gs::cli::kExitFailed);
    return gs::cli::kExitFailed;
  }
  gate.finish(exit_code);
  return exit_code;
}
