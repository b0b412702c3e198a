#!/usr/bin/env python3
"""virtio benchmark: vireo vs QEMU, same kernel, same initramfs, same guest
program, in one run.

For each VMM the harness boots the guest kit (Debian's stock kernel + the
kit's busybox initramfs, plus /bin/vbench built from bench/vbench_guest.c
and a small script, appended as a second cpio archive) with one virtio-blk
disk (a fresh copy of a raw image) and one virtio-net NIC on a TAP inside a
private network namespace, and the guest runs, in order:

  seq_write   1 MiB O_DIRECT pwrites of --seq-mib MiB from offset 0, then fsync
  seq_read    1 MiB O_DIRECT preads of the same range
  rand_read   --rand-ops 4 KiB O_DIRECT preads at random 4 KiB-aligned offsets
  rand_write  the same with pwrite (other offsets), then fsync (IOPS without it)
  tcp_tx      guest -> host: --net-mib MiB over TCP to a host listener on the TAP
  tcp_rx      host -> guest: --net-mib MiB from the host to a guest listener
  cpu_user, cpu_syscall   no device: a user-space loop and getppid() calls, to
              tell a slow device from a slow CPU (emulator vs TCG speed)

and prints `bench-result ...` lines timed in the guest (CLOCK_MONOTONIC). The
harness also times each test from the host (serial line arrival) as a check
of the guest clock, and the boot to the kit's `vireo-init: ready` line.

The host baseline reads (and writes) the same image file on the host with
the same request sizes and offsets: cold (after fsync + POSIX_FADV_DONTNEED)
and warm (page cache; both VMMs read the image through the host page cache,
so "warm" is what they can at best reach).

Accelerator: --accel auto (default) compares `vireo --accel kvm` with
`qemu -accel kvm` where KVM can run a stock kernel, and `vireo --accel emu`
with `qemu -accel tcg` otherwise (no usable /dev/kvm, or PVM-only KVM:
kvm_pvm loaded and no vmx/svm in /proc/cpuinfo).

Needs root (network namespaces, TAP), gcc with a static libc, python3
(stdlib only), qemu-system-x86_64. Writes bench/results/virtio-<date>.json.

  python3 bench/virtio.py --vireo /path/to/release/vireo
  python3 bench/virtio.py --seq-mib 32 --rand-ops 500 --net-mib 16   # quicker
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import queue
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MAC = "52:54:00:12:34:56"
HOST_IP, GUEST_IP = "10.0.2.1", "10.0.2.15"
TX_PORT, RX_PORT = 5201, 5202
MIB = 1024 * 1024
BLK = 4096
TESTS = ["seq_write", "seq_read", "rand_read", "rand_write", "tcp_tx", "tcp_rx", "cpu_user", "cpu_syscall"]
READY = "vireo-init: ready"
# Console lines worth reporting (device trouble, guest errors).
SUSPECT = re.compile(
    r"bench-error|error|fail|timed? ?out|warning|bug|call trace|oops|panic|"
    r"i/o error|blk_update|reset|unhandled|not loaded|stuck|watchdog|hung",
    re.I,
)
# ... except these, which every boot of this kernel prints on both VMMs.
BENIGN = re.compile(
    r"command line:|This is not a bug|report a bug|NMI watchdog|Fast TSC calibration failed|"
    r"vireo-init: \d+ modules loaded|Spectre|MDS|MMIO Stale|RETBleed|SRBDS|GDS|Speculative",
    re.I,
)


def log(msg):
    print(f"[virtio.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Host facts and accelerator choice


def kvm_usable():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def pvm_only():
    """Like vireo: PVM KVM (kvm_pvm loaded) on a CPU without VT-x/AMD-V."""
    if not os.path.exists("/sys/module/kvm_pvm"):
        return False
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return not re.search(r"^flags\s*:.*\b(vmx|svm)\b", cpuinfo, re.M)


def choose_accel(want):
    usable, pvm = kvm_usable(), pvm_only()
    if want == "auto":
        accel = "kvm" if usable and not pvm else "emu"
    else:
        accel = want
    why = f"/dev/kvm usable={usable}, PVM-only={pvm}"
    return accel, why


def sh_out(argv, **kw):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"({e})"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Guest side: the vbench binary and a run script in an extra cpio archive


def cpio_newc(entries):
    """entries: (name, mode, data). Returns an uncompressed newc archive."""
    out = bytearray()
    ino = 1000

    def add(name, mode, data):
        nonlocal ino
        ino += 1
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out.extend(hdr.encode() + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for name, mode, data in entries:
        add(name, mode, data)
    add("TRAILER!!!", 0, b"")
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def guest_script(args):
    t = [
        "#!/bin/sh",
        "# written by bench/virtio.py",
        "ip link set lo up",
        f"ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 || echo bench-error net setup",
        "echo bench-uptime $(cut -d' ' -f1 /proc/uptime)",
        "cat /sys/block/vda/queue/max_hw_sectors_kb /sys/block/vda/queue/max_segments 2>/dev/null | tr '\\n' ' ' | sed 's/^/bench-info vda max_hw_sectors_kb,max_segments: /'; echo",
        "run() { name=$1; shift; echo bench-start $name; vbench \"$@\" || echo bench-error $name exit $?; }",
        f"run seq_write seqwrite /dev/vda {args.seq_mib}",
        f"run seq_read seqread /dev/vda {args.seq_mib}",
        f"run rand_read randread /dev/vda {args.rand_span_mib} {args.rand_ops} 12345",
        f"run rand_write randwrite /dev/vda {args.rand_span_mib} {args.rand_ops} 67890",
        f"run tcp_tx tcpsend {HOST_IP} {TX_PORT} {args.net_mib}",
        f"run tcp_rx tcprecv {RX_PORT}",
        f"run cpu_user spin {args.spin_ops}",
        f"run cpu_syscall syscalls {args.syscall_ops}",
        "echo bench-uptime $(cut -d' ' -f1 /proc/uptime)",
        # What the two VMMs offered (feature bits, virtio spec order) and how many interrupts it took.
        "for d in /sys/bus/virtio/devices/*; do echo bench-info virtio $(basename $d) device=$(cat $d/device) "
        "features=$(cat $d/features); done",
        "echo bench-info eth0 mtu=$(cat /sys/class/net/eth0/mtu) $(grep eth0 /proc/net/dev)",
        "grep -i virtio /proc/interrupts | sed 's/^/bench-info irq /'",
        "echo bench-done",
    ]
    return "\n".join(t) + "\n"


def build_initrd(args, work):
    exe = os.path.join(work, "vbench")
    src = os.path.join(HERE, "vbench_guest.c")
    r = subprocess.run([args.cc, "-static", "-O2", "-o", exe, src], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"virtio.py: could not build the guest helper with `{args.cc} -static` "
                 f"(needs a static libc, e.g. libc6-dev):\n{r.stderr}")
    extra = cpio_newc([
        ("bin", 0o40755, b""),
        ("bin/vbench", 0o100755, open(exe, "rb").read()),
        ("bin/vbench-run", 0o100755, guest_script(args).encode()),
    ])
    initrd = os.path.join(work, "initrd.img")
    with open(initrd, "wb") as f:
        base = open(os.path.join(args.kit, "initrd.img"), "rb").read()
        f.write(base)
        f.write(b"\0" * (-len(base) % 4))
        f.write(extra)
    return initrd, sha256(exe)


def read_kit_conf(kit):
    conf = {}
    for line in open(os.path.join(kit, "vireo-kit.conf")):
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            conf[k] = v
    return conf


# --------------------------------------------------------------------------
# The disk image and the host baseline


def make_template(path, mib):
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())


def copy_image(src, dst):
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


class XorShift:
    """The same xorshift64* as vbench_guest.c."""

    def __init__(self, seed):
        self.s = seed or 1

    def next(self):
        x = self.s
        x ^= x >> 12
        x ^= (x << 25) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 27
        self.s = x
        return (x * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF


def offsets(seed, ops, span_mib):
    blocks = span_mib * MIB // BLK
    r = XorShift(seed)
    return [(r.next() % blocks) * BLK for _ in range(ops)]


def drop_cache(fd):
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def host_baseline(args, path, vbench):
    """Reads (and writes) of the image file on the host, same sizes/offsets as the
    guest; the CPU calibration with the same vbench binary, natively."""
    res = {}
    for t, cmd in (("cpu_user", ["spin", str(args.spin_ops)]), ("cpu_syscall", ["syscalls", str(args.syscall_ops)])):
        line = subprocess.run([vbench] + cmd, capture_output=True, text=True).stdout.strip()
        if line.startswith("bench-result "):
            res[t] = parse_result(line)
    fd = os.open(path, os.O_RDWR)
    try:
        buf = b"\x5a" * MIB
        small = b"\x5a" * BLK

        def seq_read(label):
            t0 = time.perf_counter_ns()
            for i in range(args.seq_mib):
                if len(os.pread(fd, MIB, i * MIB)) != MIB:
                    raise RuntimeError("short read")
            res[label] = dict(bytes=args.seq_mib * MIB, ops=args.seq_mib, ns=time.perf_counter_ns() - t0)

        def rand_read(label):
            offs = offsets(12345, args.rand_ops, args.rand_span_mib)
            t0 = time.perf_counter_ns()
            for o in offs:
                os.pread(fd, BLK, o)
            res[label] = dict(bytes=len(offs) * BLK, ops=len(offs), ns=time.perf_counter_ns() - t0)

        drop_cache(fd)
        seq_read("seq_read_cold")
        seq_read("seq_read_warm")
        drop_cache(fd)
        rand_read("rand_read_cold")
        rand_read("rand_read_warm")
        # Writes through the page cache, then fsync (what the VMMs do on the guest's flush).
        t0 = time.perf_counter_ns()
        for i in range(args.seq_mib):
            os.pwrite(fd, buf, i * MIB)
        t1 = time.perf_counter_ns()
        os.fsync(fd)
        t2 = time.perf_counter_ns()
        res["seq_write"] = dict(bytes=args.seq_mib * MIB, ops=args.seq_mib, ns=t2 - t0, flush_ns=t2 - t1)
        offs = offsets(67890, args.rand_ops, args.rand_span_mib)
        t0 = time.perf_counter_ns()
        for o in offs:
            os.pwrite(fd, small, o)
        t1 = time.perf_counter_ns()
        os.fsync(fd)
        t2 = time.perf_counter_ns()
        res["rand_write"] = dict(bytes=len(offs) * BLK, ops=len(offs), ns=t1 - t0, flush_ns=t2 - t1)
    finally:
        os.close(fd)
    return res


# --------------------------------------------------------------------------
# Network namespace and host-side TCP peers

TX_SERVER = r"""
import socket, sys, time, json
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 18)
    if not b: break
    if t0 is None: t0 = time.perf_counter_ns()
    n += len(b)
t1 = time.perf_counter_ns(); c.close()
print(json.dumps({"bytes": n, "ns": (t1 - t0) if t0 else 0}), flush=True)
"""

RX_CLIENT = r"""
import socket, sys, time, json
total = int(sys.argv[3]) * 1024 * 1024; buf = b"\xa5" * (1 << 18)
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=600)
t0 = time.perf_counter_ns(); sent = 0
while sent < total:
    n = min(len(buf), total - sent); c.sendall(buf[:n]); sent += n
c.shutdown(socket.SHUT_WR)
while c.recv(4096): pass
t1 = time.perf_counter_ns(); c.close()
print(json.dumps({"bytes": sent, "ns": t1 - t0}), flush=True)
"""


class NetNs:
    def __init__(self, name, tap):
        self.name, self.tap = name, tap

    def __enter__(self):
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            for cmd in (
                ["tuntap", "add", self.tap, "mode", "tap"],
                ["addr", "add", f"{HOST_IP}/24", "dev", self.tap],
                ["link", "set", self.tap, "up"],
                ["link", "set", "lo", "up"],
            ):
                subprocess.run(["ip", "-n", self.name] + cmd, check=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        subprocess.run(["ip", "netns", "del", self.name], stderr=subprocess.DEVNULL)

    def argv(self, cmd):
        return ["ip", "netns", "exec", self.name] + cmd


# --------------------------------------------------------------------------
# One VM run


def vmm_argv(name, args, kernel, initrd, cmdline, image, tap):
    if name == "vireo":
        return [
            args.vireo_copy, "run", "--kernel", kernel, "--initrd", initrd, "--cmdline", cmdline,
            "--accel", args.accel, "--memory", str(args.memory), "--cpus", str(args.cpus),
            "--disk", f"path={image},format=raw", "--net", f"tap={tap},mac={MAC}",
        ]
    accel = "kvm" if args.accel == "kvm" else "tcg"
    cpu = args.qemu_cpu or ("host" if accel == "kvm" else None)
    argv = [
        args.qemu, "-M", args.qemu_machine, "-accel", accel, "-m", str(args.memory),
        "-smp", str(args.cpus), "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
        "-drive", f"file={image},if=none,id=d0,format=raw,cache=writeback,aio=threads",
        "-device", "virtio-blk-pci,drive=d0",
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
    ]
    if cpu:
        argv[1:1] = ["-cpu", cpu]
    return argv


def vmm_pid(timeout_pid):
    """`timeout` forks once; `ip netns exec` execs the VMM in place."""
    try:
        kids = open(f"/proc/{timeout_pid}/task/{timeout_pid}/children").read().split()
        return int(kids[0]) if kids else None
    except (OSError, ValueError):
        return None


def cpu_seconds(pid):
    """utime + stime of all threads of pid, in seconds."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, TypeError):
        return None


def parse_result(line):
    parts = line.split()
    d = {"name": parts[1]}
    for p in parts[2:]:
        k, _, v = p.partition("=")
        d[k] = int(v)
    return d


def run_vm(name, args, work, kernel, initrd, cmdline, template, ns_name):
    image = os.path.join(work, f"disk-{name}.raw")
    copy_image(template, image)
    tap = "tapb0"
    out = {"vmm": name, "console": [], "results": {}, "host_seen_ns": {}, "errors": []}
    with NetNs(ns_name, tap) as ns:
        argv = vmm_argv(name, args, kernel, initrd, cmdline, image, tap)
        out["argv"] = argv
        # Host listener for guest -> host before the VM starts.
        txs = subprocess.Popen(ns.argv([sys.executable, "-c", TX_SERVER, HOST_IP, str(TX_PORT)]),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if txs.stdout.readline().strip() != "listening":
            raise RuntimeError("host TCP listener did not start: " + txs.stderr.read())
        errf = open(os.path.join(work, f"{name}.stderr"), "w+")
        full = ["timeout", "--kill-after=10", str(args.timeout)] + ns.argv(argv)
        log(f"{name}: starting ({' '.join(argv[:3])} ...)")
        t_start = time.perf_counter_ns()
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf)
        lines = queue.Queue()

        def reader():
            buf = b""
            while True:
                chunk = p.stdout.read1(4096) if hasattr(p.stdout, "read1") else p.stdout.read(1)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    ln, buf = buf.split(b"\n", 1)
                    lines.put((time.perf_counter_ns(), ln.decode("utf-8", "replace").rstrip("\r")))
            if buf:
                lines.put((time.perf_counter_ns(), buf.decode("utf-8", "replace")))
            lines.put(None)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        rxc = None
        started = {}
        cpu0 = {}
        out["vmm_cpu_s"] = {}
        pid = None
        while True:
            item = lines.get()
            if item is None:
                break
            t, ln = item
            rel = (t - t_start) / 1e9
            out["console"].append(f"{rel:9.3f} {ln}")
            if READY in ln and "ready_s" not in out:
                out["ready_s"] = rel
                log(f"{name}: guest ready after {rel:.1f} s")
            if ln.startswith("bench-start "):
                started[ln.split()[1]] = t
                pid = pid or vmm_pid(p.pid)
                cpu0[ln.split()[1]] = cpu_seconds(pid)
            elif ln.startswith("bench-result "):
                r = parse_result(ln)
                out["results"][r["name"]] = r
                if r["name"] in started:
                    out["host_seen_ns"][r["name"]] = t - started[r["name"]]
                    c1 = cpu_seconds(pid)
                    if c1 is not None and cpu0.get(r["name"]) is not None:
                        # VMM CPU time per wall second of the test (1.0 = one host core busy).
                        out["vmm_cpu_s"][r["name"]] = c1 - cpu0[r["name"]]
                log(f"{name}: {ln}")
            elif ln.startswith("bench-listening "):
                rxc = subprocess.Popen(
                    ns.argv([sys.executable, "-c", RX_CLIENT, GUEST_IP, str(RX_PORT), str(args.net_mib)]),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            elif ln.startswith("bench-info "):
                out.setdefault("info", []).append(ln)
            elif ln.startswith("bench-uptime "):
                try:
                    out.setdefault("uptimes", []).append((t - t_start, float(ln.split()[1])))
                except ValueError:
                    pass
            if SUSPECT.search(ln) and not BENIGN.search(ln) and not ln.startswith("bench-result"):
                out["errors"].append(ln)
                if ln.startswith("bench-error"):
                    log(f"{name}: {ln}")
        rc = p.wait()
        out["exit_status"] = rc
        ups = out.get("uptimes", [])
        if len(ups) >= 2 and ups[-1][1] > ups[0][1]:
            # > 1: the guest clock runs slow against the host's over the benchmark.
            out["host_over_guest_clock"] = (ups[-1][0] - ups[0][0]) / 1e9 / (ups[-1][1] - ups[0][1])
        out["wall_s"] = (time.perf_counter_ns() - t_start) / 1e9
        if rc == 124 or rc == 137:
            out["errors"].append(f"(harness) {name} killed by timeout after {args.timeout} s")
        errf.seek(0)
        out["stderr"] = errf.read()[-4000:]
        errf.close()
        for proc, key in ((txs, "tcp_tx_host"), (rxc, "tcp_rx_host")):
            if proc is None:
                continue
            try:
                so, se = proc.communicate(timeout=10)
                if so.strip():
                    out[key] = json.loads(so.strip().splitlines()[-1])
                elif se.strip():
                    out["errors"].append(f"(harness) {key}: {se.strip()[-300:]}")
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
        log(f"{name}: exited {rc} after {out['wall_s']:.1f} s")
    os.unlink(image)
    return out


# --------------------------------------------------------------------------
# Report


def mbps(r):
    return r["bytes"] / (r["ns"] / 1e9) / 1e6 if r and r.get("ns") else None


def iops(r):
    return r["ops"] / (r["ns"] / 1e9) if r and r.get("ns") else None


def fmt(v, digits=1):
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}" if v >= 1 else f"{v:.3g}"


def ratio(a, b):
    return a / b if a is not None and b else None


def summarize(runs, host):
    """metric -> {vmm: value}; throughput MB/s for seq/tcp, IOPS for random."""
    table = {}
    for t in TESTS:
        unit = "IOPS" if t.startswith("rand") else "Mops/s" if t.startswith("cpu") else "MB/s"
        f = iops if unit == "IOPS" else mbps if unit == "MB/s" else (lambda r: iops(r) / 1e6 if iops(r) else None)
        row = {"unit": unit}
        for name, run in runs.items():
            row[name] = f(run["results"].get(t))
        if t in ("seq_read", "rand_read"):
            row["host_cold"] = f(host.get(t + "_cold"))
            row["host_warm"] = f(host.get(t + "_warm"))
        elif t in host:
            row["host"] = f(host[t])
        if t == "tcp_tx":
            for name, run in runs.items():
                row[name + "_hostside"] = mbps(run.get("tcp_tx_host"))
        if t == "tcp_rx":
            for name, run in runs.items():
                row[name + "_hostside"] = mbps(run.get("tcp_rx_host"))
        table[t] = row
    return table


def diagnostics(runs):
    """Per VMM and test: latency per request, guest idle share, VMM host CPU use."""
    d = {}
    for n, run in runs.items():
        for t in TESTS:
            r = run["results"].get(t)
            if not r:
                continue
            ticks = r.get("busy_ticks", 0) + r.get("idle_ticks", 0)
            seen = run["host_seen_ns"].get(t)
            cpu = run["vmm_cpu_s"].get(t)
            d.setdefault(t, {})[n] = {
                "us_per_op": r["ns"] / r["ops"] / 1e3 if r.get("ops") else None,
                "guest_idle": r.get("idle_ticks", 0) / ticks if ticks else None,
                "vmm_host_cores": cpu / (seen / 1e9) if cpu is not None and seen else None,
            }
    return d


def print_diagnostics(diag, names):
    print("\nwhere the time goes: µs per request (1 MiB seq, 4 KiB random), guest CPU idle share during"
          " the test, VMM process host CPU (cores) during the test")
    hdr = ["test"] + [f"{n} {c}" for n in names for c in ("µs/op", "guest idle", "VMM cores")]
    rows = []
    for t, per in diag.items():
        r = [t]
        for n in names:
            x = per.get(n, {})
            r += [fmt(x.get("us_per_op")) if t[:3] in ("seq", "ran") else "-",
                  fmt(x.get("guest_idle"), 2), fmt(x.get("vmm_host_cores"), 2)]
        rows.append(r)
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    for r in [hdr] + rows:
        print("  ".join(str(x).rjust(w[i]) if i else str(x).ljust(w[i]) for i, x in enumerate(r)))


def print_table(table, runs, accel_pair):
    names = list(runs)
    print()
    print(f"virtio benchmark: {accel_pair}")
    hdr = ["test", "unit"] + names + (["vireo/qemu"] if {"vireo", "qemu"} <= set(names) else []) + \
        ["host warm", "host cold", "vireo/host warm", "qemu/host warm"]
    rows = []
    for t, row in table.items():
        hw = row.get("host_warm", row.get("host"))
        hc = row.get("host_cold")
        r = [t, row["unit"]] + [fmt(row.get(n)) for n in names]
        if "vireo/qemu" in hdr:
            r.append(fmt(ratio(row.get("vireo"), row.get("qemu")), 2))
        r += [fmt(hw), fmt(hc), fmt(ratio(row.get("vireo"), hw), 3), fmt(ratio(row.get("qemu"), hw), 3)]
        rows.append(r)
    for t in ("tcp_tx", "tcp_rx"):
        row = table[t]
        r = [t + " (host-timed)", "MB/s"] + [fmt(row.get(n + "_hostside")) for n in names]
        if "vireo/qemu" in hdr:
            r.append(fmt(ratio(row.get("vireo_hostside"), row.get("qemu_hostside")), 2))
        rows.append(r + ["", "", "", ""])
    rows.append(["boot to ready", "s"] + [fmt(runs[n].get("ready_s")) for n in names] +
                ([fmt(ratio(runs["vireo"].get("ready_s"), runs["qemu"].get("ready_s")), 2)]
                 if "vireo/qemu" in hdr else []) + ["", "", "", ""])
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    for r in [hdr] + rows:
        print("  ".join(str(x).rjust(w[i]) if i > 1 else str(x).ljust(w[i]) for i, x in enumerate(r)))
    print("(vireo/qemu > 1: vireo faster; for boot to ready < 1: vireo faster. host write rows: page cache + fsync)")
    for n in names:
        if runs[n]["errors"]:
            print(f"\n{n}: console lines that look like trouble:")
            for e in runs[n]["errors"][:40]:
                print("   ", e)


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accel", choices=["auto", "kvm", "emu"], default="auto",
                    help="kvm: vireo --accel kvm vs qemu -accel kvm; emu: vireo --accel emu vs qemu -accel tcg")
    ap.add_argument("--vireo", default=os.path.join(REPO, "target", "release", "vireo"))
    ap.add_argument("--build", action="store_true", help="cargo build --release -p vireo first")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--qemu-machine", default="q35")
    ap.add_argument("--qemu-cpu", default=None, help="default: host on kvm, QEMU's default model on tcg")
    ap.add_argument("--kit", default=os.path.join(REPO, "target", "tmp", "guest-kit"),
                    help="guest kit directory (built with `vireo image build` if missing)")
    ap.add_argument("--cc", default="gcc")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--disk-mib", type=int, default=256, help="raw image size")
    ap.add_argument("--seq-mib", type=int, default=128)
    ap.add_argument("--rand-ops", type=int, default=2000)
    ap.add_argument("--rand-span-mib", type=int, default=None, help="default: --disk-mib")
    ap.add_argument("--net-mib", type=int, default=32)
    ap.add_argument("--spin-ops", type=int, default=20_000_000, help="cpu_user calibration rounds")
    ap.add_argument("--syscall-ops", type=int, default=100_000, help="cpu_syscall calibration calls")
    ap.add_argument("--vmms", default="vireo,qemu", help="comma list, run in this order")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per VM run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workdir", default=None, help="keep the work files here")
    args = ap.parse_args()
    args.rand_span_mib = args.rand_span_mib or args.disk_mib
    if args.seq_mib > args.disk_mib or args.rand_span_mib > args.disk_mib:
        sys.exit("virtio.py: --seq-mib and --rand-span-mib must fit in --disk-mib")
    if os.geteuid() != 0:
        sys.exit("virtio.py: needs root (network namespace and TAP)")
    args.accel, accel_why = choose_accel(args.accel)
    vmms = [v.strip() for v in args.vmms.split(",") if v.strip()]
    accel_pair = (f"vireo --accel {args.accel} vs qemu -accel {'kvm' if args.accel == 'kvm' else 'tcg'}"
                  f" ({accel_why})")
    log(accel_pair)

    if args.build:
        subprocess.run(["cargo", "build", "--release", "-p", "vireo"], cwd=REPO, check=True)
    if "qemu" in vmms and not shutil.which(args.qemu):
        sys.exit(f"virtio.py: {args.qemu} not found (apt-get install -y qemu-system-x86)")

    work = args.workdir or tempfile.mkdtemp(prefix="vireo-virtio-bench-")
    os.makedirs(work, exist_ok=True)
    args.vireo_copy = os.path.join(work, "vireo")
    if "vireo" in vmms or not os.path.isdir(args.kit):
        if not os.path.exists(args.vireo):
            sys.exit(f"virtio.py: {args.vireo} missing (cargo build --release -p vireo, or --vireo PATH)")
        shutil.copy2(args.vireo, args.vireo_copy)  # a concurrent build cannot swap it mid-run
    if not os.path.isdir(args.kit):
        args.kit = os.path.join(work, "guest-kit")
        log(f"building a guest kit in {args.kit}")
        subprocess.run(["timeout", "600", args.vireo_copy, "image", "build", "--out", args.kit], check=True)
    conf = read_kit_conf(args.kit)
    kernel = os.path.join(args.kit, conf.get("kernel", "vmlinuz"))
    cmdline = conf.get("cmdline", "console=ttyS0 panic=-1 reboot=k") + " vireo.run=/bin/vbench-run"
    initrd, vbench_sha = build_initrd(args, work)

    template = os.path.join(work, "template.raw")
    log(f"writing a {args.disk_mib} MiB image of random bytes")
    make_template(template, args.disk_mib)
    hostcopy = os.path.join(work, "host.raw")
    copy_image(template, hostcopy)
    host = host_baseline(args, hostcopy, os.path.join(work, "vbench"))
    os.unlink(hostcopy)
    log("host baseline: " + ", ".join(f"{k} {fmt(iops(v) if k[:4] in ('rand', 'cpu_') else mbps(v))}"
                                      for k, v in host.items()))

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    load0 = os.getloadavg()
    runs = {}
    try:
        for name in vmms:
            runs[name] = run_vm(name, args, work, kernel, initrd, cmdline, template,
                                f"vireo-bench-{os.getpid()}-{name}")
    finally:
        if not args.workdir:
            for f in ("template.raw",):
                try:
                    os.unlink(os.path.join(work, f))
                except OSError:
                    pass
    load1 = os.getloadavg()
    table = summarize(runs, host)
    print_table(table, runs, accel_pair)

    diag = diagnostics(runs)
    print_diagnostics(diag, list(runs))
    clock = {n: run.get("host_over_guest_clock") for n, run in runs.items()}
    print("host/guest clock over the benchmark part (1.0 = guest time is host time): " +
          ", ".join(f"{n} {fmt(c, 3)}" for n, c in clock.items()))
    result = {
        "benchmark": "virtio",
        "date": stamp,
        "accel": args.accel,
        "accel_pair": accel_pair,
        "git": {"head": sh_out(["git", "-C", REPO, "rev-parse", "HEAD"]),
                "dirty_files": len(sh_out(["git", "-C", REPO, "status", "--porcelain"]).splitlines())},
        "vireo": {"path": args.vireo,
                  "mtime": datetime.datetime.fromtimestamp(os.path.getmtime(args.vireo)).isoformat()
                  if os.path.exists(args.vireo) else None, "sha256": sha256(args.vireo_copy) if os.path.exists(args.vireo_copy) else None,
                  "version": sh_out([args.vireo_copy, "--version"]) if os.path.exists(args.vireo_copy) else None},
        "qemu": {"path": shutil.which(args.qemu), "version": sh_out([args.qemu, "--version"]).splitlines()[0]
                 if "qemu" in vmms else None},
        "guest": {"kit": args.kit, "kernel_sha256": sha256(kernel),
                  "kit_initrd_sha256": sha256(os.path.join(args.kit, "initrd.img")), "kernel_version": conf.get("kernel_version"), "cmdline": cmdline,
                  "vbench_sha256": vbench_sha, "script": guest_script(args)},
        "params": {k: getattr(args, k) for k in ("memory", "cpus", "disk_mib", "seq_mib", "rand_ops",
                                                  "rand_span_mib", "net_mib", "spin_ops", "syscall_ops", "qemu_machine", "qemu_cpu", "timeout")},
        "host": {"uname": platform.uname()._asdict(), "nproc": os.cpu_count(), "loadavg_before": load0,
                 "loadavg_after": load1, "python": platform.python_version()},
        "host_baseline": host,
        "table": table,
        "diagnostics": diag,
        "host_over_guest_clock": clock,
        "runs": runs,
    }
    out = args.out or os.path.join(HERE, "results", f"virtio-{stamp}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
