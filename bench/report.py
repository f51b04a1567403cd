#!/usr/bin/env python3
"""The results of bench/run-all.sh (`make bench`): one figure per README Performance row.

  report.py --one ROW.json --kind KIND
      one line for a row just run (its own JSON only)
  report.py --rows rows.tsv --md results.md --json results.json [--setup-failed 0|1] ...
      the table: row, figure, raw limit (measured in the same run), ratio, load average before
      the row, then the commands; markdown and JSON copies. Exit 1 when a row of the README
      table failed or was not run.

rows.tsv (written by run-all.sh): id, kind, exit code, seconds, load average, what, command.
Each row's JSON is ROW_ID.json next to it: gridseal-bench --json, or gs_bench's JSON.
"""
import argparse
import json
import os
import platform
import subprocess
import sys

# The README table's rows, in its order. Other ids (warm passes) are set-up, reported apart.
ORDER = [
    "ses-raw", "ses-closed", "ses-cached", "ses-open-2000", "ses-open-1500", "ses-tuned-closed",
    "ses-tuned-open-80", "ses-tuned-open-80-wide", "ses-audit-on",
    "ses-audit-off", "read", "rollover",
    "codec", "dkus-raw", "dkus-raw-init", "dkus-echo", "dkus-16x16", "dkus-16x64", "dkus-tls", "dkus-open-2000",
    "dkus-defaults",
]
# Where a row's raw limit comes from when the row does not measure it itself.
RAW_FROM = {"ses": "ses-raw"}
PEAK_FROM = {"ses-open": "ses-closed", "ses-tuned-open": "ses-tuned-closed",
             "dkus-open": "dkus-16x16"}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def lat(d):
    l = d.get("latency_ms", {})
    return "p50 %s ms, p99 %s ms, p999 %s ms" % (ms(l.get("p50")), ms(l.get("p99")),
                                                  ms(l.get("p999")))


def ms(v):
    if v is None:
        return "?"
    return "%.1f" % v if v < 100 else "%.0f" % v


def errs(d):
    n = d.get("errors_total", 0) + d.get("checks_failed", 0)
    return "" if n == 0 else "; %d errors %s" % (n, json.dumps(d.get("errors", {})))


def rate(v):
    return "{:,.0f}".format(v)


def codec_rates(d):
    got = {}
    for b in d.get("benchmarks", []):
        if b.get("name") in ("BM_Decode", "BM_SealMode2", "BM_OpenMode2"):
            got[b["name"]] = b.get("items_per_second", 0)
    return got


def figure(kind, d):
    """The row's figure from its own JSON (no cross-row references)."""
    if kind == "codec":
        r = codec_rates(d)
        if len(r) != 3:
            return None
        return "%.2f M / %.2f M / %.2f M msgs/s per core" % (
            r["BM_Decode"] / 1e6, r["BM_SealMode2"] / 1e6, r["BM_OpenMode2"] / 1e6)
    if kind in ("ses-raw", "dkus-raw"):
        return "%s /s" % rate(d["raw_hsm"]["per_s"])
    if kind == "ses":
        return "%s secured commands/s, %s%s" % (rate(d["secured_per_s"]), lat(d), errs(d))
    if kind == "ses-warm":
        return "%s secured commands/s, %s commands%s" % (rate(d["secured_per_s"]),
                                                        rate(d["count"]), errs(d))
    if kind in ("ses-open", "ses-tuned-open"):
        return "%s (offered %s /s, secured %s /s)%s" % (lat(d), rate(d["rate_offered"]),
                                                       rate(d["secured_per_s"]), errs(d))
    if kind in ("dkus", "warm"):
        return "%s opened/s, %s%s" % (rate(d["opened_per_s"]), lat(d), errs(d))
    if kind == "dkus-echo":
        return "%s echoed/s (generator %.0f %% of a core), %s%s" % (
            rate(d["opened_per_s"]), d.get("generator_cpu_percent", 0), lat(d), errs(d))
    if kind == "dkus-open":
        return "%s (offered %s /s, opened %s /s)%s" % (lat(d), rate(d["rate_offered"]),
                                                      rate(d["opened_per_s"]), errs(d))
    if kind == "chain":
        e = d["stages"]["end_to_end"]
        return "%s verified/s, %s%s" % (rate(d["per_s"]), lat(e), errs(d))
    if kind == "rollover":
        c = d["campaign"]
        ph = d["phases"]
        out = "%d/%d confirmed, %d failed, %.1f s: %.1f meters re-keyed/s" % (
            c["confirmed"], c["total"], c["failed"], c["wall_s"], c["rekeyed_per_s"])
        for key, label in (("baseline", "before"), ("rollover", "during"), ("after", "after")):
            p = ph.get(key)
            if p and p["count"]:
                out += "; reads %s/s (%s) %s" % (rate(p["per_s"]), lat(p), label)
        n = d.get("errors_total", 0) + d.get("checks_failed", 0)
        return out + "; %d read errors" % n
    return None


def raw_of(kind, d):
    """The raw limit a row measured itself, if any."""
    if kind in ("dkus", "dkus-echo") and "raw_hsm" in d:
        return d["raw_hsm"]["per_s"]
    return None


def one(path, kind):
    d = load(path)
    if d is None:
        print("(no JSON result in %s)" % path)
        return 0
    try:
        f = figure(kind, d)
    except (KeyError, TypeError) as e:
        f = "(unexpected JSON: missing %s)" % e
    raw = raw_of(kind, d)
    if raw and f:
        f += "; raw %s /s, ratio %.0f %%" % (rate(raw), 100.0 * d.get("opened_over_raw", 0))
    print(f)
    return 0


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = sh("git -C '%s' rev-parse --short HEAD" % root)
    if commit and sh("git -C '%s' status --porcelain --untracked-files=no" % root):
        commit += " (with uncommitted changes)"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "uptime": sh("uptime"),
        "softhsm2": sh("dpkg-query -W -f='${Version}' softhsm2"),
        "commit": commit,
    }


def table(a):
    rows = {}
    extra = []
    with open(a.rows) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 7:
                continue
            rid, kind, rc, secs, loadavg, what, cmd = parts
            d = load(os.path.join(os.path.dirname(a.rows), rid + ".json"))
            r = {"id": rid, "kind": kind, "what": what, "exit": int(rc), "seconds": int(secs),
                 "load_before": loadavg, "command": cmd, "result": d, "figure": None,
                 "raw_limit": None, "ratio": None}
            try:
                r["figure"] = figure(kind, d) if d is not None else None
            except (KeyError, TypeError) as e:
                r["figure"] = None
                r["error"] = "unexpected JSON (missing %s)" % e
            r["status"] = "PASS" if r["exit"] == 0 and r["figure"] else "FAIL"
            if r["status"] == "FAIL" and "error" not in r:
                err = os.path.join(os.path.dirname(a.rows), rid + ".err")
                tail = sh("tail -n 2 '%s'" % err).replace("\n", " | ")
                r["error"] = "exit %s%s" % (rc, ": " + tail if tail else "")
            rows[rid] = r
            if rid not in ORDER:
                extra.append(r)

    def ok(rid):
        r = rows.get(rid)
        return r if r and r["result"] is not None and r["figure"] else None

    for rid in ORDER:
        r = rows.get(rid)
        if r is None:
            rows[rid] = {"id": rid, "status": "FAIL", "error": "not run (an earlier step failed)",
                         "figure": None, "raw_limit": None, "ratio": None, "command": "",
                         "load_before": "", "what": rid, "kind": ""}
            continue
        if not r["figure"]:
            continue
        d, kind = r["result"], r["kind"]
        if kind == "ses" and ok(RAW_FROM[kind]):
            raw = rows[RAW_FROM[kind]]["result"]["raw_hsm"]["per_s"]
            r["raw_limit"] = "%s /s (ses-raw)" % rate(raw)
            if raw > 0:
                r["ratio"] = "%.0f %% of raw" % (100.0 * d["secured_per_s"] / raw)
        elif kind in ("dkus", "dkus-echo") and raw_of(kind, d):
            r["raw_limit"] = "%s /s (same run, %dx%d)" % (
                rate(d["raw_hsm"]["per_s"]), d["raw_hsm"]["processes"], d["raw_hsm"]["threads"])
            r["ratio"] = "%.0f %% of raw" % (100.0 * d.get("opened_over_raw", 0))
            # A DKUS row also against the raw open as a plain PKCS#11 client makes it (one
            # C_EncryptInit per step), and against the echo ceiling of the same load.
            if kind == "dkus" and ok("dkus-raw-init"):
                init = rows["dkus-raw-init"]["result"]["raw_hsm"]["per_s"]
                if init > 0:
                    r["ratio"] += "; %.0f %% of dkus-raw-init (%s /s)" % (
                        100.0 * d["opened_per_s"] / init, rate(init))
            if kind == "dkus" and ok("dkus-echo"):
                echo = rows["dkus-echo"]["result"]["opened_per_s"]
                if echo > 0:
                    r["ratio"] += "; %.0f %% of dkus-echo" % (100.0 * d["opened_per_s"] / echo)
        elif kind in PEAK_FROM and ok(PEAK_FROM[kind]):
            p = rows[PEAK_FROM[kind]]["result"]
            peak = p.get("secured_per_s", p.get("opened_per_s", 0))
            r["raw_limit"] = "peak %s /s (%s)" % (rate(peak), PEAK_FROM[kind])
            if peak > 0:
                r["ratio"] = "offered %.0f %% of peak" % (100.0 * d["rate_offered"] / peak)

    # The audit pair: the rate with the audit on against the rate without (issue 7: >= 90 %).
    on, off = ok("ses-audit-on"), ok("ses-audit-off")
    if on and off and off["result"]["secured_per_s"] > 0:
        on["raw_limit"] = "%s /s (ses-audit-off)" % rate(off["result"]["secured_per_s"])
        on["ratio"] = "%.0f %% of audit off" % (
            100.0 * on["result"]["secured_per_s"] / off["result"]["secured_per_s"])

    def shown(r):
        if r["status"] == "PASS":
            return r["figure"]
        return " ".join(x for x in (r["figure"], "[%s]" % r.get("error", "failed")) if x)

    m = machine()
    failed = [rid for rid in ORDER if rows[rid]["status"] != "PASS"]
    ordered = [rows[rid] for rid in ORDER]

    # Terminal.
    print("\n== gridseal benchmarks%s: the README Performance table, measured on this machine"
          % (" (BENCH_QUICK=1: small fleets and durations)" if a.quick == "1" else ""))
    print("  %s, nproc %s, kernel %s, SoftHSM2 %s, commit %s" % (
        m["cpu_model"], m["nproc"], m["kernel"], m["softhsm2"], m["commit"]))
    print("  uptime at the end: %s" % m["uptime"])
    w = max(len(r["id"]) for r in ordered + extra)
    print("  %-*s  %-4s  %-16s  %-22s  %-28s  %s" % (w, "row", "", "load before", "ratio",
                                                    "raw limit", "figure"))
    for r in ordered:
        print("  %-*s  %-4s  %-16s  %-22s  %-28s  %s" % (
            w, r["id"], r["status"], r["load_before"] or "-", r["ratio"] or "-",
            r["raw_limit"] or "-", shown(r)))
    for r in extra:
        print("  %-*s  %-4s  %-16s  %-22s  %-28s  %s" % (
            w, r["id"], r["status"], r["load_before"] or "-", "(set-up)", "-",
            shown(r)))
    print("\n  commands (run in %s; the ports are the ones the daemons got):"
          % os.path.dirname(os.path.dirname(os.path.abspath(a.rows))))
    for r in ordered + extra:
        if r["command"]:
            print("  %-*s  %s" % (w, r["id"], r["command"]))

    # Markdown.
    md = ["# gridseal benchmarks (`make bench`)", ""]
    if a.quick == "1":
        md += ["**BENCH_QUICK=1**: small fleets and durations, a smoke run; not the README "
               "figures.", ""]
    md += ["- CPU: %s, nproc %s, kernel %s, SoftHSM2 %s" % (m["cpu_model"], m["nproc"],
                                                           m["kernel"], m["softhsm2"]),
           "- commit: %s" % m["commit"],
           "- uptime at the end: `%s`" % m["uptime"],
           "- total: %s s; set-up %s" % (a.seconds, "FAILED" if a.setup_failed != "0" else "ok"),
           "",
           "| row | what | status | figure | raw limit | ratio | load before | command |",
           "|---|---|---|---|---|---|---|---|"]
    for r in ordered + extra:
        md.append("| %s | %s | %s | %s | %s | %s | %s | `%s` |" % (
            r["id"], r["what"], r["status"], shown(r).replace("|", "/"),
            r["raw_limit"] or "-", r["ratio"] or ("-" if r["id"] in ORDER else "(set-up)"),
            r["load_before"] or "-", r["command"].replace("|", "\\|")))
    with open(a.md, "w") as f:
        f.write("\n".join(md) + "\n")
    with open(a.json, "w") as f:
        json.dump({"quick": a.quick == "1", "seconds": int(a.seconds),
                   "setup_failed": a.setup_failed != "0", "machine": m, "rows": ordered,
                   "setup_rows": extra, "failed_rows": failed}, f, indent=1)
    print("\n  results: %s, %s" % (a.md, a.json))
    if failed:
        print("  FAILED rows: %s" % ", ".join(failed))
    return 1 if failed or a.setup_failed != "0" else 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--one")
    p.add_argument("--kind")
    p.add_argument("--rows")
    p.add_argument("--md")
    p.add_argument("--json")
    p.add_argument("--setup-failed", default="0")
    p.add_argument("--quick", default="0")
    p.add_argument("--seconds", default="0")
    a = p.parse_args()
    if a.one:
        return one(a.one, a.kind)
    return table(a)


if __name__ == "__main__":
    sys.exit(main())
