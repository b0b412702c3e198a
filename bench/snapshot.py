#!/usr/bin/env python3
"""Snapshot and restore time of a guest with all of its memory in use.

The guest (a 64-bit ELF written here) writes a pattern into every page of
its RAM above 2 MiB (so every page is real and must be saved), prints '!' on COM1, then
prints '.' every 1000 iterations of a delay loop forever. The script:

  1. boots it under `vireo run --control-socket`, waits for '!';
  2. sends `snapshot DIR` and times it (wall clock, and the VM's own
     `pause_ms`: how long the guest was stopped);
  3. lets it run a little (after filling, it rewrites a working set of
     --dirty-mib MiB, default 64, over and over), then sends `snapshot --diff DIR2` (the pages written since the full
     snapshot) and times that too, with the pages and disk blocks it took;
  4. kills it and restores each snapshot `--rounds` times, full (memory
     file read and checksummed) and lazy (`--restore-lazy`: mapped
     MAP_PRIVATE), timing spawn -> first '.' from the restored guest
     (restore-to-running), and reading vireo's own "restored ... in N ms"
     log line. Restoring the diff reads the full snapshot and the diff.

With --qemu, the same RAM size in qemu-system-x86_64 (no disk: SeaBIOS
idles) is saved with QMP `migrate` to a file and loaded with -incoming
(QEMU's own snapshot to a file; its RAM is mostly zero, which QEMU and
vireo's memory.raw both store cheaply — vireo's full file is sparse only
where the filesystem makes it so).

Results go to bench/results/snapshot-MEMORY-DATE.json. Standard library only.

  python3 bench/snapshot.py [--memory 1024] [--accel kvm|emu] [--rounds 5] [--qemu]
"""

import argparse
import datetime
import json
import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOAD = 0x100000


def fill_pages(memory_mib: int) -> bytes:
    """Write a qword into every page above 2 MiB: every page is then real
    (allocated, non-zero) and must be saved or sent. (One store per page
    rather than `rep stosq` over all of RAM: on this host's PVM KVM every
    guest instruction is emulated, and filling 1 GiB byte by byte took
    100 s; the snapshot and migration costs are the same.)"""
    fill_start = 0x200000
    pages = ((memory_mib << 20) - fill_start) // 4096
    code = b"\x48\xbf" + struct.pack("<Q", fill_start)  # mov rdi, fill_start
    code += b"\x48\xb9" + struct.pack("<Q", pages)  # mov rcx, pages
    code += b"\x48\xb8" + struct.pack("<Q", 0x0123456789ABCDEF)  # mov rax, pattern
    loop = len(code)
    code += b"\x48\x89\x07"  # l: mov [rdi], rax
    code += b"\x48\x81\xc7\x00\x10\x00\x00"  # add rdi, 4096
    code += b"\x48\xff\xc9"  # dec rcx
    code += b"\x75" + struct.pack("<b", loop - (len(code) + 2))  # jnz l
    return code


def guest_code(memory_mib: int, dirty_mib: int = 0) -> bytes:
    code = fill_pages(memory_mib)
    code += b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
    code += b"\xb0\x21\xee"  # mov al, '!'; out dx, al
    loop = len(code)
    code += b"\xb0\x2e\xee"  # loop: mov al, '.'; out dx, al
    if dirty_mib:
        # Rewrite a working set of dirty_mib MiB, one qword per page.
        code += b"\x48\xbf" + struct.pack("<Q", 0x200000)  # mov rdi, 0x200000
        code += b"\xb9" + struct.pack("<I", dirty_mib * 256)  # mov ecx, pages
        inner = len(code)
        code += b"\x48\xff\x07"  # inc qword [rdi]
        code += b"\x48\x81\xc7\x00\x10\x00\x00"  # add rdi, 4096
        code += b"\xff\xc9"  # dec ecx
        code += b"\x75" + struct.pack("<b", inner - (len(code) + 2))  # jnz inner
    else:
        code += b"\xb9" + struct.pack("<I", 1000)  # mov ecx, 1000
        code += b"\xff\xc9"  # l2: dec ecx
        code += b"\x75\xfc"  # jnz l2
    rel = loop - (len(code) + 2)
    code += b"\xeb" + struct.pack("<b", rel)  # jmp loop
    return code


def elf(code: bytes) -> bytes:
    seg = 0x1000
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, LOAD, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, seg, LOAD, LOAD, len(code), len(code), 0x1000)
    f = ehdr + phdr
    return f + bytes(seg - len(f)) + code


def vireo_bin() -> str:
    for cand in (os.environ.get("VIREO"), os.path.join(ROOT, "target/release/vireo")):
        if cand and os.path.exists(cand):
            return cand
    sys.exit("build vireo first: cargo build --release -p vireo (or set VIREO=path)")


def read_until(proc, marker: bytes, timeout: float) -> float:
    """Read stdout until `marker`; the time it arrived."""
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {marker!r} within {timeout} s")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"vireo exited before {marker!r}: {proc.stderr.read().decode(errors='replace')}")
            buf += chunk
    return time.monotonic()


def control(path: str, line: str) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return json.loads(data)


def qemu_save_load(work: str, args) -> dict:
    """QEMU: migrate an idle guest of the same RAM size to a file, load it."""
    import shutil as _sh
    qemu = _sh.which("qemu-system-x86_64")
    if not qemu:
        return {"skipped": "qemu-system-x86_64 not installed"}
    from migrate import qmp  # noqa: E402
    state = os.path.join(work, "qemu.state")
    base = [qemu, "-accel", args.qemu_accel, "-m", str(args.memory), "-display", "none",
            "-nodefaults", "-serial", "none", "-net", "none"]
    qs = os.path.join(work, "qs.qmp")
    src = subprocess.Popen(base + ["-qmp", f"unix:{qs},server=on,wait=off"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cmd = qmp(qs)
        time.sleep(2)
        t = time.monotonic()
        cmd("migrate", uri=f"exec:cat > {state}")
        while True:
            st = cmd("query-migrate")["return"]
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        save_ms = (time.monotonic() - t) * 1000
        save_downtime = st.get("downtime")
    finally:
        src.kill()
        src.wait()
    qd = os.path.join(work, "qd.qmp")
    t = time.monotonic()
    dst = subprocess.Popen(base + ["-qmp", f"unix:{qd},server=on,wait=off", "-incoming", f"exec:cat {state}"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cmd = qmp(qd)
        while True:
            st = cmd("query-status")["return"]
            if st.get("status") != "inmigrate":
                break
            time.sleep(0.01)
        load_ms = (time.monotonic() - t) * 1000
    finally:
        dst.kill()
        dst.wait()
    return {"accel": args.qemu_accel, "save_ms": round(save_ms, 1),
            "save_downtime_ms": save_downtime, "load_to_running_ms": round(load_ms, 1),
            "file_bytes": os.path.getsize(state)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--accel", default="kvm")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dirty-mib", type=int, default=64,
                    help="after filling, the guest rewrites this many MiB over and over (what a diff holds)")
    ap.add_argument("--qemu", action="store_true", help="also time QEMU's save/load of the same RAM size")
    ap.add_argument("--qemu-accel", default="tcg")
    args = ap.parse_args()
    vireo = vireo_bin()
    work = tempfile.mkdtemp(prefix="vireo-snapbench-")
    try:
        kernel = os.path.join(work, "vmlinux")
        with open(kernel, "wb") as f:
            f.write(elf(guest_code(args.memory, args.dirty_mib)))
        sock = os.path.join(work, "ctl.sock")
        snap = os.path.join(work, "snap")
        vm = subprocess.Popen(
            [vireo, "run", "--kernel", kernel, "--memory", str(args.memory),
             "--accel", args.accel, "--control-socket", sock],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        t0 = time.monotonic()
        read_until(vm, b"!", 600)
        fill_s = time.monotonic() - t0
        t = time.monotonic()
        reply = control(sock, f"snapshot {snap}")
        snapshot_s = time.monotonic() - t
        if not reply.get("ok"):
            sys.exit(f"snapshot failed: {reply}")
        read_until(vm, b"..........", 600)
        diff = os.path.join(work, "diff")
        t = time.monotonic()
        dreply = control(sock, f"snapshot --diff {diff}")
        diff_s = time.monotonic() - t
        vm.kill()
        vm.wait()
        if not dreply.get("ok"):
            sys.exit(f"diff snapshot failed: {dreply}")
        sizes = {n: os.path.getsize(os.path.join(snap, n)) for n in os.listdir(snap)}
        allocated = {n: os.stat(os.path.join(diff, n)).st_blocks * 512 for n in os.listdir(diff)}
        results = {"memory_mib": args.memory, "accel": args.accel, "dirty_mib": args.dirty_mib,
                   "load_average": os.getloadavg(),
                   "guest_fill_s": round(fill_s, 3),
                   "snapshot_wall_ms": round(snapshot_s * 1000, 1),
                   "snapshot_pause_ms": reply["snapshot"]["pause_ms"],
                   "files": sizes,
                   "diff": {"wall_ms": round(diff_s * 1000, 1),
                            "pause_ms": dreply["snapshot"]["pause_ms"],
                            "pages": dreply["snapshot"].get("pages"),
                            "bytes_on_disk": allocated},
                   "restore": {}}
        for mode, extra, src in (("full", [], snap), ("lazy", ["--restore-lazy"], snap),
                                 ("diff_full", [], diff), ("diff_lazy", ["--restore-lazy"], diff)):
            to_running, in_vmm = [], []
            for _ in range(args.rounds):
                # Drop the page cache's copy? Not without root everywhere;
                # rounds after the first read the file from the cache.
                t = time.monotonic()
                p = subprocess.Popen([vireo, "-v", "run", "--restore", src, "--accel", args.accel] + extra,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                first = read_until(p, b".", 600)
                to_running.append((first - t) * 1000)
                p.kill()
                _, err = p.communicate()
                m = re.search(r"in (\d+) ms", err.decode(errors="replace"))
                if m:
                    in_vmm.append(int(m.group(1)))
            results["restore"][mode] = {
                "to_running_ms_median": round(statistics.median(to_running), 1),
                "to_running_ms": [round(x, 1) for x in to_running],
                "vmm_restore_ms": in_vmm,
            }
        if args.qemu:
            results["qemu"] = qemu_save_load(work, args)
        print(json.dumps(results, indent=2))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(HERE, "results", f"snapshot-{args.memory}-{stamp}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"written to {out}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
