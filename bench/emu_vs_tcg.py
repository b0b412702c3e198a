#!/usr/bin/env python3
"""vireo's emulator (--accel emu) vs QEMU's TCG on the same guest kit.

Boots the kit's kernel and initrd with the same command line on both, in
alternating rounds, and times (from spawning the VMM) the first line the
kit's /init prints and the guest's power-off (the VMM's exit), and the
VMM's CPU time (user + system, all threads: on a shared host the fairer
figure). Prints a table with medians and the vireo/QEMU ratios and writes
bench/results/emu-vs-tcg-<date>-<time>.json.

    cargo build --release -p vireo
    vireo image build --out target/tmp/guest-kit    # or KIT=dir
    python3 bench/emu_vs_tcg.py --rounds 3
"""
import argparse, datetime, json, os, resource, shutil, statistics, subprocess, sys, tempfile, time

INIT_FIRST_LINE = "vireo guest kit:"     # the first line /init prints
COMMAND = "echo data-roundtrip > /tmp/f; cat /tmp/f"


def kit_config(kit):
    conf = {}
    with open(os.path.join(kit, "vireo-kit.conf")) as f:
        for line in f:
            if "=" in line and not line.startswith("#"):
                k, v = line.rstrip("\n").split("=", 1)
                conf[k] = v
    return conf


def run(cmd, timeout):
    """Spawn `cmd`, return (seconds to the /init line, seconds to exit, ok,
    CPU seconds)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    first = None
    ok = False
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            if first is None and INIT_FIRST_LINE in line:
                first = time.monotonic() - t0
            if line.strip() == "data-roundtrip":
                ok = True
            if time.monotonic() - t0 > timeout:
                break
        p.wait(timeout=max(1, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        ok = False
    total = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return first, total, ok and p.returncode == 0, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kit", default=os.environ.get("KIT", "target/tmp/guest-kit"))
    ap.add_argument("--vireo", default="target/release/vireo")
    ap.add_argument("--baseline", metavar="BIN",
                    help="also run this vireo binary (e.g. the build before a change) in the same rounds, "
                         "for a side-by-side comparison on the same host load")
    ap.add_argument("--no-qemu", action="store_true", help="skip QEMU (with --baseline: vireo vs baseline only)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--timeout", type=int, default=1200)
    a = ap.parse_args()
    if not a.no_qemu and not shutil.which(a.qemu):
        sys.exit(f"{a.qemu} not found: apt-get install qemu-system-x86 (it is only the reference)")
    conf = kit_config(a.kit)
    kernel = os.path.join(a.kit, conf["kernel"])
    initrd = os.path.join(a.kit, conf["initrd"])
    cmdline = f"{conf['cmdline']} vireo.run={COMMAND}"
    # A private copy, so a concurrent build cannot swap the binary mid-run.
    tmp = tempfile.mkdtemp(prefix="vireo-bench-")
    vireo = os.path.join(tmp, "vireo")
    shutil.copy2(a.vireo, vireo)
    emu_args = lambda binary: [binary, "run", "--accel", "emu", "--kernel", kernel, "--initrd", initrd,
                               "--cmdline", cmdline, "--memory", str(a.memory)]
    vmms = {
        "vireo --accel emu": emu_args(vireo),
        "qemu -accel tcg": [a.qemu, "-accel", "tcg", "-M", "q35", "-cpu", "max", "-m", str(a.memory),
                            "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
                            "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nodefaults"],
    }
    if a.no_qemu:
        del vmms["qemu -accel tcg"]
    if a.baseline:
        base = os.path.join(tmp, "vireo-baseline")
        shutil.copy2(a.baseline, base)
        vmms["vireo baseline"] = emu_args(base)
    load_start = os.getloadavg()
    results = {name: [] for name in vmms}
    names = list(vmms)
    n = len(names)
    for r in range(a.rounds):
        for name in names[r % n:] + names[:r % n]:
            first, total, ok, cpu = run(vmms[name], a.timeout)
            results[name].append({"init_line_s": first, "power_off_s": total, "cpu_s": cpu, "ok": ok})
            print(f"round {r + 1}: {name:20} /init line {first if first is None else round(first, 2)} s, "
                  f"power-off {total:.2f} s, CPU {cpu:.2f} s{'' if ok else '  (FAILED)'}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    def med(name, key):
        vals = [x[key] for x in results[name] if x["ok"] and x[key] is not None]
        return statistics.median(vals) if vals else None

    print(f"\n{'':22}{'/init line (median)':>22}{'power-off (median)':>22}{'CPU time (median)':>22}")
    for name in names:
        print(f"{name:22}{med(name, 'init_line_s') or float('nan'):>21.2f}s{med(name, 'power_off_s') or float('nan'):>21.2f}s"
              f"{med(name, 'cpu_s') or float('nan'):>21.2f}s")
    v = names[0]
    ratios = {}
    for other, label in (("qemu -accel tcg", "QEMU"), ("vireo baseline", "baseline")):
        if other not in results:
            continue
        rs = {}
        for key in ("init_line_s", "power_off_s", "cpu_s"):
            if med(v, key) and med(other, key):
                rs[key] = med(v, key) / med(other, key)
        print(f"ratio vireo/{label}: " + ", ".join(f"{k} {r:.2f}" for k, r in rs.items()))
        ratios[label] = rs
    out = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "qemu": None if a.no_qemu else subprocess.run([a.qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        "vireo": a.vireo, "baseline": a.baseline,
        "kernel": conf.get("kernel_version"), "cmdline": cmdline, "memory_mib": a.memory,
        "results": results, "ratios": ratios,
        "load_average": os.getloadavg(), "load_average_start": load_start,
    }
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/emu-vs-tcg-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
