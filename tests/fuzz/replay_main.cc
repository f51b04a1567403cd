// Replays every file of the given corpus directories (or files) through LLVMFuzzerTestOneInput,
// so the fuzz targets run as ordinary CTest tests with gcc or clang, without libFuzzer.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {
int run_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "replay: cannot read %s\n", p.c_str());
    return 1;
  }
  std::vector<std::uint8_t> data((std::istreambuf_iterator<char>(in)),
                                 std::istreambuf_iterator<char>());
  // A copy in a buffer of exactly the right size, so ASan sees any over-read.
  auto* buf = new std::uint8_t[data.size() + 1];
  std::copy(data.begin(), data.end(), buf);
  LLVMFuzzerTestOneInput(data.empty() ? nullptr : buf, data.size());
  delete[] buf;
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR_OR_FILE...\n", argv[0]);
    return 2;
  }
  std::size_t files = 0;
  int failures = 0;
  for (int i = 1; i < argc; ++i) {
    std::filesystem::path p(argv[i]);
    std::error_code ec;
    if (std::filesystem::is_directory(p, ec)) {
      std::vector<std::filesystem::path> all;
      for (const auto& e : std::filesystem::directory_iterator(p)) {
        if (e.is_regular_file()) all.push_back(e.path());
      }
      std::sort(all.begin(), all.end());
      for (const auto& f : all) {
        failures += run_file(f);
        ++files;
      }
    } else {
      failures += run_file(p);
      ++files;
    }
  }
  std::printf("replay: %zu inputs, %d unreadable\n", files, failures);
  if (files == 0) {
    std::fprintf(stderr, "replay: empty corpus\n");
    return 1;
  }
  return failures == 0 ? 0 : 1;
}
