#!/usr/bin/env python3
"""Side-by-side startup benchmark: vireo vs QEMU on the same tiny guest.

Each round starts every VMM once (the order rotates from round to round),
on the same dual-entry bzImage written by tiny_guest.py, with the same guest
RAM and one vCPU, and measures for each run:

  first_byte_ms   time from just before spawning the VMM process to the first
                  byte arriving on the pipe that is the VMM's stdout (the
                  guest's COM1 output): process start, dynamic linking, VMM
                  setup, firmware (QEMU only) and the guest's first few
                  instructions.
  rss_kib         the VMM's VmRSS (/proc/PID/status), read --settle-ms after
                  the first byte while the guest sits in `cli; hlt`.
  guest_ram_kib   the resident part of the guest-RAM mapping: the anonymous
                  mapping of exactly --memory MiB in /proc/PID/smaps (both
                  vireo and QEMU map guest RAM as one such mapping).
  overhead_kib    rss_kib - guest_ram_kib: VMM memory beyond guest memory.
  anon_overhead_kib  RssAnon - guest_ram_kib: the same counting only private
                  anonymous memory (leaves out the shared, file-backed pages
                  of the binary and its libraries).

The VMM is then killed (SIGKILL): the guest never exits on its own.

Prints medians (p10/p90) per VMM and the vireo/QEMU ratios, and writes
everything (every sample, the exact commands, host facts) to
bench/results/boot-<date>.json.

Standard library only. Run from anywhere:

  python3 bench/boot.py                    # 20 rounds, vireo vs QEMU microvm
  python3 bench/boot.py --rounds 50 --with-pc
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import tiny_guest  # noqa: E402

MARKER = "!"


# --------------------------------------------------------------------------
# The VMMs under test


def variants(args, kernel):
    """name -> (description, argv). Same kernel, RAM and vCPU count for all."""
    mem, cpus = str(args.memory), str(args.cpus)
    qemu_common = [
        args.qemu, "-accel", "kvm", "-m", mem, "-smp", cpus,
        "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-kernel", kernel,
    ]
    v = {
        "vireo": (
            "vireo run (release build), 64-bit entry of the bzImage",
            [args.vireo_copy, "run", "--kernel", kernel, "--memory", mem,
             "--cpus", cpus, "--accel", "kvm"],
        ),
        "qemu-microvm": (
            "QEMU -M microvm with its defaults: qboot firmware, then the bzImage's real-mode setup code",
            qemu_common[:1] + ["-M", "microvm"] + qemu_common[1:],
        ),
        "qemu-microvm-min": (
            "QEMU -M microvm with option ROMs, PIT, PIC, RTC and ACPI off (QEMU's leanest microvm)",
            qemu_common[:1] + ["-M", "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,acpi=off"] + qemu_common[1:],
        ),
        "qemu-pc": (
            "QEMU -M pc (i440FX): SeaBIOS + linuxboot_dma option ROM, then the real-mode setup code",
            qemu_common[:1] + ["-M", "pc"] + qemu_common[1:],
        ),
    }
    v["spawn-floor"] = (
        "not a VMM: /bin/sh printing the marker, the floor of this harness's process-spawn-to-byte time",
        ["/bin/sh", "-c", f"printf '{MARKER}'; exec sleep 600"],
    )
    for name, path in args.also_copies:
        v[name] = (
            f"another vireo build ({path}), same flags as the vireo row",
            [path] + v["vireo"][1][1:],
        )
    names = ["vireo"] + [n for n, _ in args.also_copies] + ["qemu-microvm"]
    if not args.no_min:
        names.append("qemu-microvm-min")
    if args.with_pc:
        names.append("qemu-pc")
    if not args.no_floor:
        names.append("spawn-floor")
    return {n: v[n] for n in names}


# --------------------------------------------------------------------------
# One measured run


def read_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
            elif k == "Threads":
                out[k] = int(v)
    return out


SMAPS_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\S+)\s*(.*)$")


def guest_ram_rss(pid, mem_bytes):
    """Rss (KiB) of the anonymous mapping(s) of exactly mem_bytes, and how it was found."""
    vmas = []
    cur = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = SMAPS_HEADER.match(line)
            if m:
                cur = {"size": int(m[2], 16) - int(m[1], 16), "perms": m[3],
                       "inode": m[4], "path": m[5], "rss": 0}
                vmas.append(cur)
            elif line.startswith("Rss:") and cur is not None:
                cur["rss"] = int(line.split()[1])
    anon = [v for v in vmas if v["path"] == "" and v["inode"] == "0" and v["perms"].startswith("rw")]
    exact = [v for v in anon if v["size"] == mem_bytes]
    if len(exact) == 1:
        return exact[0]["rss"], "exact"
    # Merged with a neighbour or split: take the largest anonymous mapping
    # at least as big as guest RAM.
    big = sorted((v for v in anon if v["size"] >= mem_bytes), key=lambda v: v["size"])
    if big:
        return big[-1]["rss"], "largest-anon>=mem"
    return 0, "not-found"


def run_once(name, argv, args, stderr_dir, index):
    errpath = os.path.join(stderr_dir, f"{name}-{index}.stderr")
    errf = open(errpath, "wb")
    t0 = time.perf_counter_ns()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=errf, close_fds=True)
    t_first = None
    out = b""
    sample = {"vmm": name, "index": index}
    try:
        fd = p.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        deadline = t0 + int(args.timeout * 1e9)
        while True:
            left_ms = max(0, (deadline - time.perf_counter_ns()) // 1_000_000)
            ev = poller.poll(left_ms)
            now = time.perf_counter_ns()
            if not ev:
                break  # timed out
            chunk = os.read(fd, 4096)
            if not chunk:
                break  # EOF: the VMM exited
            if t_first is None:
                t_first = now
            out += chunk
            if MARKER.encode() in out:
                break
        if t_first is None:
            sample["error"] = "no output before timeout" if p.poll() is None else f"exited {p.returncode} without output"
            return sample
        sample["first_byte_ms"] = (t_first - t0) / 1e6
        sample["first_bytes"] = out[:16].decode("latin-1")
        if not out.startswith(MARKER.encode()):
            sample["warning"] = f"first output was {out[:16]!r}, not the marker"
        if name == "spawn-floor":
            return sample  # no VM, no memory reading
        time.sleep(args.settle_ms / 1000)
        if p.poll() is not None:
            sample["error"] = f"VMM exited ({p.returncode}) before the memory reading"
            return sample
        st = read_status(p.pid)
        gram, how = guest_ram_rss(p.pid, args.memory << 20)
        sample.update({
            "rss_kib": st.get("VmRSS"),
            "hwm_kib": st.get("VmHWM"),
            "rss_anon_kib": st.get("RssAnon"),
            "rss_file_kib": st.get("RssFile"),
            "rss_shmem_kib": st.get("RssShmem"),
            "threads": st.get("Threads"),
            "guest_ram_kib": gram,
            "guest_ram_found": how,
            "overhead_kib": st["VmRSS"] - gram,
            "anon_overhead_kib": st["RssAnon"] - gram,
        })
        return sample
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        errf.close()
        if os.path.getsize(errpath):
            with open(errpath, "rb") as f:
                sample["stderr_head"] = f.read(300).decode("utf-8", "replace")


# --------------------------------------------------------------------------
# Statistics and reporting

METRICS = [
    ("first_byte_ms", "ms", 1.0),
    ("overhead_kib", "MiB", 1 / 1024),
    ("anon_overhead_kib", "MiB", 1 / 1024),
    ("rss_kib", "MiB", 1 / 1024),
    ("guest_ram_kib", "MiB", 1 / 1024),
]


def pct(xs, q):
    """Percentile with linear interpolation (q in 0..100)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(samples):
    s = {}
    for key, _, _ in METRICS:
        xs = [x[key] for x in samples if key in x]
        if xs:
            s[key] = {
                "n": len(xs), "median": statistics.median(xs), "p10": pct(xs, 10),
                "p90": pct(xs, 90), "min": min(xs), "max": max(xs), "mean": statistics.fmean(xs),
            }
    return s


def fmt(v, scale):
    return f"{v * scale:8.2f}"


def print_table(summary, names, failures):
    print()
    hdr = f"{'VMM':<20} {'metric':<20} {'median':>8} {'p10':>8} {'p90':>8} {'min':>8} {'max':>8}  n"
    print(hdr)
    print("-" * len(hdr))
    for n in names:
        for key, unit, scale in METRICS:
            st = summary[n].get(key)
            if not st:
                continue
            label = f"{key.replace('_kib', '').replace('_ms', '')} ({unit})"
            print(f"{n:<20} {label:<20} {fmt(st['median'], scale)} {fmt(st['p10'], scale)} "
                  f"{fmt(st['p90'], scale)} {fmt(st['min'], scale)} {fmt(st['max'], scale)}  {st['n']}")
        if failures.get(n):
            print(f"{n:<20} failed runs: {failures[n]}")
        print()


def ratios(summary, base="vireo"):
    r = {}
    for n, s in summary.items():
        if n == base or not n.startswith("qemu"):
            continue
        r[n] = {}
        for key in ("first_byte_ms", "overhead_kib", "anon_overhead_kib", "rss_kib"):
            a, b = summary[base].get(key), s.get(key)
            if a and b and b["median"]:
                r[n][key] = a["median"] / b["median"]
    return r


# --------------------------------------------------------------------------
# Host facts for the record


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"<{e}>"


def host_facts():
    cpu = ""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    thp = ""
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "loadavg_at_end": open("/proc/loadavg").read().split()[:3],
        "cpu": cpu,
        "cpus_online": os.cpu_count(),
        "hardware_virt": bool(flags & {"vmx", "svm"}),
        "hypervisor_flag": "hypervisor" in flags,
        "kvm_pvm": os.path.exists("/sys/module/kvm_pvm"),
        "kvm_intel": os.path.exists("/sys/module/kvm_intel"),
        "kvm_amd": os.path.exists("/sys/module/kvm_amd"),
        "transparent_hugepage": thp,
        "python": platform.python_version(),
    }


def vireo_facts(path):
    h = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return {
        "binary": path,
        "sha256": h,
        "git_head": sh(["git", "-C", REPO, "rev-parse", "HEAD"]),
        "git_dirty_files": subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True).stdout.splitlines(),
        "version": sh([path, "--version"]),
    }


def ensure_vireo(args):
    if args.vireo:
        return args.vireo
    path = os.path.join(REPO, "target", "release", "vireo")
    if not os.path.exists(path) or args.build:
        print("building vireo: cargo build --release -p vireo", file=sys.stderr)
        r = subprocess.run(["cargo", "build", "--release", "-p", "vireo"], cwd=REPO)
        if r.returncode != 0:
            sys.exit("cargo build --release -p vireo failed")
    return path


# --------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description="vireo vs QEMU: time to the guest's first serial byte and VMM memory overhead.")
    ap.add_argument("--rounds", type=int, default=20, help="measured rounds (each runs every VMM once; default 20)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (default 1)")
    ap.add_argument("--memory", type=int, default=128, help="guest RAM in MiB for every VMM (default 128)")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs for every VMM (default 1)")
    ap.add_argument("--settle-ms", type=float, default=50, help="wait after the first byte before reading memory (default 50)")
    ap.add_argument("--gap-ms", type=float, default=100, help="pause between runs (default 100)")
    ap.add_argument("--timeout", type=float, default=30, help="seconds to wait for the first byte (default 30)")
    ap.add_argument("--vireo", help="vireo binary (default: target/release/vireo, built if missing)")
    ap.add_argument("--build", action="store_true", help="run cargo build --release -p vireo first")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=PATH",
                    help="an extra vireo binary to measure in the same rounds (e.g. a patched build); repeatable")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary (default qemu-system-x86_64)")
    ap.add_argument("--no-min", action="store_true", help="leave out the stripped-down QEMU microvm row")
    ap.add_argument("--no-floor", action="store_true", help="leave out the spawn-floor row (sh printing the marker)")
    ap.add_argument("--with-pc", action="store_true", help="add a QEMU -M pc row (SeaBIOS; seconds per run under PVM)")
    ap.add_argument("--out", help="JSON result file (default bench/results/boot-<date>.json)")
    args = ap.parse_args(argv)

    if not shutil.which(args.qemu):
        sys.exit(f"{args.qemu} not found (apt-get install -y qemu-system-x86)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("/dev/kvm is not accessible")

    work = tempfile.mkdtemp(prefix="vireo-bench-")
    # Run a private copy of the vireo binary, so a concurrent `cargo build`
    # cannot swap it in the middle of the run.
    vireo_src = ensure_vireo(args)
    args.vireo_copy = os.path.join(work, "vireo")
    shutil.copy2(vireo_src, args.vireo_copy)
    args.also_copies = []
    for spec in args.also:
        name, sep, path = spec.partition("=")
        if not sep or not os.path.isfile(path) or name in ("vireo", "spawn-floor") or name.startswith("qemu"):
            sys.exit(f"--also {spec}: expected NAME=PATH to an existing vireo binary, NAME not vireo/qemu*/spawn-floor")
        copy = os.path.join(work, f"vireo-{name}")
        shutil.copy2(path, copy)
        args.also_copies.append((name, copy))
    kernel = os.path.join(work, "tiny-bzImage")
    with open(kernel, "wb") as f:
        f.write(tiny_guest.bzimage(ord(MARKER), "halt"))

    load_start = open("/proc/loadavg").read().split()[:3]
    if float(load_start[0]) > 0.5:
        print(f"warning: load average {' '.join(load_start)}: other work on this machine will "
              "inflate and spread the timings (compare the spawn-floor row)", file=sys.stderr)
    vmms = variants(args, kernel)
    names = list(vmms)
    errdir = os.path.join(work, "stderr")
    os.makedirs(errdir)

    samples = {n: [] for n in names}
    failures = {n: 0 for n in names}
    total = args.warmup + args.rounds
    print(f"{args.rounds} rounds (+{args.warmup} warm-up) of {', '.join(names)}; "
          f"{args.memory} MiB, {args.cpus} vCPU; guest: {kernel}", file=sys.stderr)
    for r in range(total):
        order = names[r % len(names):] + names[:r % len(names)]
        line = []
        for n in order:
            s = run_once(n, vmms[n][1], args, errdir, r)
            s["round"] = r - args.warmup
            s["position"] = order.index(n)
            if r >= args.warmup:
                if "error" in s:
                    failures[n] += 1
                samples[n].append(s)
            line.append(f"{n} {s.get('first_byte_ms', float('nan')):.1f}ms"
                        + (f" {s['overhead_kib'] / 1024:.1f}MiB" if "overhead_kib" in s else "")
                        + (f" [{s['error']}]" if "error" in s else ""))
            time.sleep(args.gap_ms / 1000)
        tag = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}/{args.rounds}"
        print(f"{tag:>14}: " + " | ".join(line), file=sys.stderr)

    summary = {n: summarize([s for s in samples[n] if "error" not in s]) for n in names}
    rat = ratios(summary)
    print_table(summary, names, failures)
    print("ratios vireo / QEMU (medians; < 1 means vireo is faster / smaller):")
    for n, r in rat.items():
        parts = [f"{k.replace('_kib', '').replace('_ms', '')} {v:.3f}" for k, v in r.items()]
        print(f"  vs {n:<18} " + ", ".join(parts))

    vs = summary["vireo"]
    goals = {}
    if "first_byte_ms" in vs and "overhead_kib" in vs:
        qm = summary.get("qemu-microvm", {})
        goals = {
            "first_byte_under_10ms": vs["first_byte_ms"]["median"] < 10,
            "overhead_under_5mib": vs["overhead_kib"]["median"] < 5 * 1024,
            "faster_than_qemu_microvm": bool(qm) and vs["first_byte_ms"]["median"] < qm["first_byte_ms"]["median"],
            "smaller_than_qemu_microvm": bool(qm) and vs["overhead_kib"]["median"] < qm["overhead_kib"]["median"],
        }
        print("goals (vireo medians): " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in goals.items()))

    now = datetime.datetime.now().astimezone()
    out = args.out or os.path.join(HERE, "results", f"boot-{now.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    doc = {
        "benchmark": "vireo vs QEMU: spawn-to-first-serial-byte and VMM RSS beyond guest RAM",
        "date": now.isoformat(timespec="seconds"),
        "config": {k: getattr(args, k) for k in ("rounds", "warmup", "memory", "cpus", "settle_ms", "gap_ms", "timeout")},
        "guest": {
            "image": "dual-entry bzImage from bench/tiny_guest.py (out 0x3f8 '!' then cli;hlt)",
            "sha256": hashlib.sha256(open(kernel, "rb").read()).hexdigest(),
        },
        "host": host_facts() | {"loadavg_at_start": load_start},
        "vireo": vireo_facts(args.vireo_copy) | {
            "copied_from": vireo_src,
            "copied_from_mtime": datetime.datetime.fromtimestamp(os.path.getmtime(vireo_src)).astimezone().isoformat(timespec="seconds"),
        },
        "qemu": {"binary": shutil.which(args.qemu), "version": sh([args.qemu, "--version"]).splitlines()[0]},
        "vmms": {n: {"description": d, "argv": a} for n, (d, a) in vmms.items()},
        "summary": summary,
        "ratios_vireo_over": rat,
        "goals": goals,
        "failures": failures,
        "samples": samples,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"\nwrote {os.path.relpath(out)}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not any(failures.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
