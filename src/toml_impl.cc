// toml++ compiled once for the whole program. Every target that links gridseal_core builds with
// TOML_HEADER_ONLY=0 (CMakeLists.txt), so the parser and printers are not compiled again, at
// -O3 or under ASan, in each of the dozen files that read a config (~7 s of CPU each).
#define TOML_IMPLEMENTATION
#include <toml++/toml.h>
