# gridseal top-level commands. Every target works on a fresh Debian 12 machine as root.
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
JOBS       ?= $(shell nproc)
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := framer_fuzz acse_decode_fuzz epsem_decode_fuzz open_fuzz profile_fuzz policy_fuzz fleet_csv_fuzz operator_request_fuzz metersim_fuzz
CMAKE_GEN  := $(shell command -v ninja >/dev/null 2>&1 && echo "-G Ninja")

.PHONY: all deps build test test-asan fuzz fuzz-build bench clean

all: build

deps:
	./tools/install-deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=Release

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: deps
	$(MAKE) build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# Debug info of the clang builds (ASan, fuzz): line tables are all a sanitizer or libFuzzer report
# needs for file:line frames (inlined ones too), for ~20% less compile CPU than -g and objects half
# the size. ASAN_DEBUG=-g for a build to step through in gdb.
ASAN_DEBUG ?= -gline-tables-only
ASAN_FLAGS := -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 $(ASAN_DEBUG) -DNDEBUG"

# ASan + UBSan with clang, every test.
test-asan: deps
	CC=clang CXX=clang++ cmake -S . -B $(ASAN_BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  $(ASAN_FLAGS) -DGS_SANITIZE=ON -DGS_BENCH=OFF
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -j $(JOBS)

fuzz-build: deps
	CC=clang CXX=clang++ cmake -S . -B $(FUZZ_BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  $(ASAN_FLAGS) -DGS_FUZZ=ON -DGS_BENCH=OFF -DGS_TESTS=ON
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target $(FUZZ_TARGETS)

# Runs every libFuzzer target for FUZZ_SECONDS each, starting from the checked-in corpus, JOBS
# targets at a time (run-all.sh, FUZZ_JOBS).
fuzz: fuzz-build
	FUZZ_JOBS=$(JOBS) ./tests/fuzz/run-all.sh $(FUZZ_BUILD)/bin $(FUZZ_SECONDS)

# Google Benchmark micro-benchmarks (JSON copy in $(BUILD)/bench/gs_bench.json), then every row
# of the README Performance table against the daemons on loopback (bench/run-all.sh; state in
# $(BUILD)/bench/state/, results in $(BUILD)/bench/results.{md,json}). BENCH_QUICK=1: a smoke run.
bench: deps
	$(MAKE) build
	mkdir -p $(BUILD)/bench
	$(BUILD)/bin/gs_bench --benchmark_min_time=0.2 --benchmark_out=$(BUILD)/bench/gs_bench.json \
	  --benchmark_out_format=json $(if $(filter 1,$(BENCH_QUICK)),--benchmark_filter='BM_Decode|BM_Seal|BM_Open')
	BUILD=$(BUILD) ./bench/run-all.sh

# End to end on this machine: deps, build, a 10,000-meter simulated fleet, the three daemons over
# TLS, the bench scenarios, a summary (tools/demo/demo.sh; state in $(BUILD)/demo/).
.PHONY: demo
demo:
	BUILD=$(BUILD) ./tools/demo/demo.sh

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)
