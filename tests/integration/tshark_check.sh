#!/usr/bin/env bash
# Has Wireshark (tshark, via shared/tools/c1222-tshark-check) verify messages sealed by gridseal:
# all must dissect cleanly and verify; tampered ones must be refused. Exit 77 = tshark missing.
set -euo pipefail

GEN=${1:?usage: tshark_check.sh GEN_SEALED_BIN SHARED_DIR}
SHARED=${2:?usage: tshark_check.sh GEN_SEALED_BIN SHARED_DIR}
CHECK="$SHARED/tools/c1222-tshark-check"
KEY=2:01020304050607080102030405060708

if [ ! -x "$CHECK" ] && [ ! -f "$CHECK" ]; then
  echo "FAIL: $CHECK not found" >&2
  exit 1
fi
if ! command -v tshark >/dev/null 2>&1; then
  # c1222-tshark-check installs tshark itself when it can (root or passwordless sudo).
  echo "tshark not found; trying to install it" >&2
  python3 "$CHECK" --key "$KEY" 6000 >/dev/null 2>&1 || true
  if ! command -v tshark >/dev/null 2>&1; then
    echo "SKIP: tshark is not installed and cannot be installed here" >&2
    exit 77
  fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$GEN" >"$tmp/good.txt"
n=$(wc -l <"$tmp/good.txt")
if [ "$n" -lt 1000 ]; then
  echo "FAIL: generator produced only $n messages" >&2
  exit 1
fi
echo "checking $n gridseal messages (modes 0/1/2) with tshark $(tshark --version | head -1 | awk '{print $3}')"

rc=0
python3 "$CHECK" --key "$KEY" --require-mac --strict-oracle <"$tmp/good.txt" >"$tmp/good.out" || rc=$?
summary=$(tail -1 "$tmp/good.out")
echo "good:     $summary"
if [ "$rc" -ne 0 ] || [ "$summary" != "summary: $n message(s), $n OK, 0 failed" ]; then
  echo "FAIL: tshark did not accept every message (rc=$rc); failures:" >&2
  grep -B12 "RESULT: FAIL" "$tmp/good.out" | head -80 >&2 || true
  exit 1
fi
# Every secured message must be a MAC verified by Wireshark, not merely "not checked".
verified=$(grep -c "MAC VERIFIED by Wireshark" "$tmp/good.out" || true)
secured=$(grep -c " mode[12]-" "$tmp/good.txt" || true)
echo "verified: $verified of $secured secured messages"
if [ "$verified" -ne "$secured" ]; then
  echo "FAIL: only $verified of $secured secured messages verified by Wireshark" >&2
  exit 1
fi

# The oracle must be able to fail: tampered messages are refused one by one.
"$GEN" tampered >"$tmp/bad.txt"
nb=$(wc -l <"$tmp/bad.txt")
rc=0
python3 "$CHECK" --key "$KEY" --require-mac <"$tmp/bad.txt" >"$tmp/bad.out" || rc=$?
bad_summary=$(tail -1 "$tmp/bad.out")
echo "tampered: $bad_summary"
if [ "$rc" -ne 1 ] || [ "$bad_summary" != "summary: $nb message(s), 0 OK, $nb failed" ]; then
  echo "FAIL: tampered messages were not all refused (rc=$rc)" >&2
  exit 1
fi
echo "PASS: tshark verified all $n gridseal messages and refused all $nb tampered ones"
