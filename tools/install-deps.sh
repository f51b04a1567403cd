#!/usr/bin/env bash
# Installs every Debian 12 package gridseal needs to build, test, benchmark and run its demo.
# Idempotent and non-interactive; skips apt entirely when everything is already installed.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  clang llvm libclang-rt-14-dev
  libssl-dev openssl
  libgtest-dev libgmock-dev libbenchmark-dev
  libsqlite3-dev sqlite3 libjemalloc-dev
  libspdlog-dev libfmt-dev libtomlplusplus-dev libcli11-dev libboost1.81-dev libsystemd-dev
  softhsm2 opensc libp11-kit-dev
  python3 python3-cryptography tshark
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages (${missing[*]}); run as root or install them" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
