#!/usr/bin/env python3
"""What the jail costs: `vireo run` with and without `--jail`, side by side.

Two numbers per run, on bench/tiny_guest.py's guest (one marker byte on
COM1, then halt), alternating plain and jailed runs:

1. Time to the first serial byte: from just before the harness spawns
   `vireo run` to the first byte of guest output on its stdout. The jailed
   run includes joining the cgroup, the namespaces, the fork of the
   supervisor, the tmpfs root + pivot_root and the privilege drop.
2. Resident memory (VmRSS) once the guest runs: the VMM process, and for a
   jailed run also the supervisor (its parent), reported apart and summed.

Needs root (the jail does) and /dev/kvm (or pass --accel emu). Standard
library only. Usage:

  sudo python3 bench/jail.py [--rounds 10] [--vireo target/debug/vireo] [--accel kvm]

Prints medians and the jailed/plain ratio; writes bench/results/jail-<date>.json.
"""

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARKER = b"!"


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return None


def pss_kib(pid):
    """Proportional set size: shared pages (the supervisor and the VMM
    share their pages copy-on-write after the fork) counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return None


def child_of(pid, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except FileNotFoundError:
            return None
        time.sleep(0.001)
    return None


def run_once(argv, jailed, args):
    t0 = time.perf_counter_ns()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, close_fds=True)
    sample = {"jailed": jailed}
    try:
        poller = select.poll()
        poller.register(p.stdout.fileno(), select.POLLIN | select.POLLHUP)
        out = b""
        t_first = None
        while MARKER not in out:
            left = max(0, args.timeout * 1000 - (time.perf_counter_ns() - t0) / 1e6)
            if not poller.poll(left):
                break
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            if t_first is None:
                t_first = time.perf_counter_ns()
            out += chunk
        if t_first is None:
            p.kill()
            sample["error"] = p.stderr.read(400).decode("utf-8", "replace")
            return sample
        sample["first_byte_ms"] = (t_first - t0) / 1e6
        time.sleep(args.settle_ms / 1000)
        if jailed:
            vmm = child_of(p.pid)
            sample["vmm_rss_kib"] = rss_kib(vmm) if vmm else None
            sample["supervisor_rss_kib"] = rss_kib(p.pid)
            sample["total_rss_kib"] = (sample["vmm_rss_kib"] or 0) + (sample["supervisor_rss_kib"] or 0)
            sample["total_pss_kib"] = (pss_kib(vmm) or 0) + (pss_kib(p.pid) or 0) if vmm else None
        else:
            sample["vmm_rss_kib"] = rss_kib(p.pid)
            sample["total_rss_kib"] = sample["vmm_rss_kib"]
            sample["total_pss_kib"] = pss_kib(p.pid)
        return sample
    finally:
        if p.poll() is None:
            p.kill()  # a jailed VMM follows its supervisor (PR_SET_PDEATHSIG)
        p.wait()
        p.stdout.close()
        p.stderr.close()


def median(samples, key):
    xs = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description="vireo run with and without --jail: first serial byte and RSS.")
    ap.add_argument("--rounds", type=int, default=10, help="runs of each kind (default 10)")
    ap.add_argument("--vireo", default=os.path.join(ROOT, "target/debug/vireo"),
                    help="vireo binary (default target/debug/vireo)")
    ap.add_argument("--accel", default="kvm", help="backend for both (default kvm)")
    ap.add_argument("--memory", type=int, default=128, help="guest MiB (default 128)")
    ap.add_argument("--settle-ms", type=float, default=50, help="wait after the first byte before reading RSS")
    ap.add_argument("--timeout", type=float, default=30, help="seconds to wait for the first byte")
    ap.add_argument("--jail-net", default="own", help="--jail-net of the jailed runs (own or host; default own)")
    ap.add_argument("--out", help="JSON file (default bench/results/jail-<date>.json)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/jail.py: the jail needs root; run it with sudo")

    work = tempfile.mkdtemp(prefix="vireo-jail-bench-")
    vireo = os.path.join(work, "vireo")
    shutil.copy2(args.vireo, vireo)  # a concurrent cargo build cannot swap it
    kernel = os.path.join(work, "bzImage")
    subprocess.run([sys.executable, os.path.join(HERE, "tiny_guest.py"), kernel,
                    "--marker", MARKER.decode(), "--then", "halt"], check=True)
    base = [vireo, "run", "--kernel", kernel, "--memory", str(args.memory), "--accel", args.accel]
    jail = base + ["--jail", "--jail-dir", os.path.join(work, "root"), "--jail-net", args.jail_net]
    # Three kinds: no sandbox at all, the default (seccomp filters), and
    # the daemon's (seccomp and the jail).
    kinds = [("bare", base + ["--no-seccomp"], False), ("plain", base, False), ("jailed", jail, True)]
    samples = []
    # One unrecorded round each (page cache, first-use costs).
    for _, argv, jailed in kinds:
        run_once(argv, jailed, args)
    for i in range(args.rounds):
        order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
        for name, argv, jailed in order:
            s = run_once(argv, jailed, args)
            s["round"] = i
            s["kind"] = name
            samples.append(s)
            time.sleep(0.05)
    shutil.rmtree(work, ignore_errors=True)

    errors = [s for s in samples if "error" in s]
    summary = {}
    for name, _, _ in kinds:
        group = [s for s in samples if s["kind"] == name and "error" not in s]
        summary[name] = {k: median(group, k) for k in
                         ("first_byte_ms", "vmm_rss_kib", "supervisor_rss_kib", "total_rss_kib", "total_pss_kib")}
        summary[name]["runs"] = len(group)
    keys = ("first_byte_ms", "vmm_rss_kib", "total_rss_kib", "total_pss_kib")
    ratio = {k: (summary["jailed"][k] / summary["plain"][k]) if summary["plain"][k] and summary["jailed"][k] else None
             for k in keys}
    ratio_bare = {n: {k: (summary[n][k] / summary["bare"][k]) if summary["bare"][k] and summary[n][k] else None
                      for k in keys} for n in ("plain", "jailed")}

    print(f"vireo run --no-seccomp (bare) vs vireo run (seccomp, plain) vs vireo run --jail (seccomp + jail) "
          f"({args.rounds} runs each, medians; {args.accel}, {args.memory} MiB guest)")
    print(f"{'':10} {'first byte ms':>14} {'VMM RSS MiB':>12} {'supervisor MiB':>15} {'RSS sum MiB':>12} {'PSS sum MiB':>12}")
    for name, _, _ in kinds:
        s = summary[name]
        sup = f"{s['supervisor_rss_kib'] / 1024:.1f}" if s["supervisor_rss_kib"] else "-"
        print(f"{name:10} {s['first_byte_ms']:>14.2f} {s['vmm_rss_kib'] / 1024:>12.1f} {sup:>15} {s['total_rss_kib'] / 1024:>12.1f} {s['total_pss_kib'] / 1024:>12.1f}")
    fmt = lambda r: " ".join(f"{(r[k] or 0):>12.2f}" for k in keys)
    print(f"{'jailed/plain':14} {fmt(ratio)}")
    for n in ("plain", "jailed"):
        print(f"{n + '/bare':14} {fmt(ratio_bare[n])}")
    if errors:
        print(f"{len(errors)} failed run(s): {errors[0].get('error', '')[:200]}")

    out = args.out or os.path.join(HERE, "results", time.strftime("jail-%Y%m%d-%H%M%S.json"))
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open(out, "w") as f:
        json.dump({"args": vars(args), "git": git, "summary": summary, "ratio": ratio, "ratio_vs_bare": ratio_bare, "samples": samples}, f, indent=1)
    print(f"written {out}")


if __name__ == "__main__":
    main()
