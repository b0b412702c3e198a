#!/usr/bin/env python3
"""Live migration between two `vireo run` processes on loopback: downtime,
total time, rounds and bytes, for an idle and a busy guest; and, side by
side, QEMU's live migration of an idle guest of the same size.

Guests (64-bit ELF written here, as in bench/snapshot.py):
  idle  writes into every page of its RAM above 2 MiB (every page is real
        and must be sent), prints '!', then only prints '.' now and then;
  busy  does the same, prints '!', then rewrites a 64 MiB working set
        forever (one qword per page, page after page), printing '.' per pass.
  zero  touches nothing (RAM stays zero: what a fresh guest looks like);
        this is the case comparable with QEMU's idle guest below.

For each: boot under `vireo run --control-socket`, wait for '!', start
`vireo run --migrate-from unix:PATH --cpus 1 --memory N` (the target's own
definition; plain TCP is refused, TCP is TLS-only), send `migrate-to` and read
the reply's figures (total_ms, downtime_ms, bytes_sent, rounds,
pages_sent), check the target keeps printing '.'.

QEMU (if qemu-system-x86_64 is installed): a guest with no disk (SeaBIOS
idles at "No bootable device") of the same RAM size migrated to a second
QEMU with -incoming tcp:..., figures from QMP query-migrate (total-time,
downtime, transferred). `--qemu-accel tcg` (default) or kvm.

Results go to bench/results/migrate-DATE.json. Standard library only.

  python3 bench/migrate.py [--memory 1024] [--accel kvm|emu] [--guests idle,busy,zero]
"""

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from snapshot import control, elf, fill_pages, read_until, vireo_bin  # noqa: E402


def guest_code(kind: str, memory_mib: int) -> bytes:
    code = fill_pages(memory_mib) if kind != "zero" else b""
    code += b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
    code += b"\xb0\x21\xee"  # mov al, '!'; out dx, al
    loop = len(code)
    code += b"\xb0\x2e\xee"  # loop: mov al, '.'; out dx, al
    if kind == "busy":
        # mov rdi, 0x200000; mov ecx, 16384 (64 MiB of pages)
        code += b"\x48\xbf" + (0x200000).to_bytes(8, "little")
        code += b"\xb9" + (16384).to_bytes(4, "little")
        inner = len(code)
        code += b"\x48\xff\x07"  # inc qword [rdi]
        code += b"\x48\x81\xc7\x00\x10\x00\x00"  # add rdi, 4096
        code += b"\xff\xc9"  # dec ecx
        rel = inner - (len(code) + 2)
        code += b"\x75" + rel.to_bytes(1, "little", signed=True)  # jnz inner
    else:
        code += b"\xb9" + (200000).to_bytes(4, "little")  # mov ecx, 200000
        code += b"\xff\xc9"  # dec ecx
        code += b"\x75\xfc"  # jnz
    rel = loop - (len(code) + 2)
    code += b"\xeb" + rel.to_bytes(1, "little", signed=True)  # jmp loop
    return code


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def vireo_case(vireo, work, kind, args) -> dict:
    kernel = os.path.join(work, f"{kind}.elf")
    with open(kernel, "wb") as f:
        f.write(elf(guest_code(kind, args.memory)))
    sock = os.path.join(work, f"{kind}.sock")
    src = subprocess.Popen(
        [vireo, "run", "--kernel", kernel, "--memory", str(args.memory),
         "--accel", args.accel, "--control-socket", sock],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        read_until(src, b"!", 1800)
        fill_s = time.monotonic() - t0
        read_until(src, b"..", 600)
        target = os.path.join(work, f"{kind}.mig.sock")
        dst = subprocess.Popen(
            [vireo, "run", "--migrate-from", f"unix:{target}", "--cpus", "1",
             "--memory", str(args.memory), "--accel", args.accel],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            reply = None
            for _ in range(500):
                mode = " --postcopy" if args.postcopy else ""
                reply = control(sock, f"migrate-to unix:{target} --downtime-ms {args.downtime_ms}{mode}")
                if reply.get("ok") or "cannot connect" not in reply.get("error", ""):
                    break
                time.sleep(0.02)
            if not reply.get("ok"):
                raise RuntimeError(f"migration failed: {reply}")
            read_until(dst, b"..", 600)
            src.wait(30)
            m = reply["migration"]
            return {"guest": kind, "mode": "post-copy" if args.postcopy else "pre-copy", "guest_fill_s": round(fill_s, 1), **m,
                    "mib_sent": round(m["bytes_sent"] / (1 << 20), 1),
                    "source_exit": src.returncode}
        finally:
            dst.kill()
            dst.wait()
    finally:
        src.kill()
        src.wait()


def qmp(path: str):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(500):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.02)
    f = s.makefile("rw")
    f.readline()  # greeting

    def cmd(name, **arguments):
        f.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                return msg

    cmd("qmp_capabilities")
    return cmd


def qemu_case(work, args) -> dict:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return {"skipped": "qemu-system-x86_64 not installed"}
    port = free_port()
    base = [qemu, "-accel", args.qemu_accel, "-m", str(args.memory), "-display", "none",
            "-nodefaults", "-serial", "none", "-net", "none"]
    qs, qd = os.path.join(work, "qs.qmp"), os.path.join(work, "qd.qmp")
    dst = subprocess.Popen(base + ["-qmp", f"unix:{qd},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    src = subprocess.Popen(base + ["-qmp", f"unix:{qs},server=on,wait=off"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cmd = qmp(qs)
        time.sleep(2)  # SeaBIOS reaches "No bootable device"
        cmd("migrate-set-parameters", **{"downtime-limit": args.downtime_ms})
        cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            st = cmd("query-migrate")["return"]
            if st.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.05)
        ram = st.get("ram", {})
        return {"accel": args.qemu_accel, "status": st.get("status"),
                "total_ms": st.get("total-time"), "downtime_ms": st.get("downtime"),
                "bytes_sent": ram.get("transferred"),
                "mib_sent": round(ram.get("transferred", 0) / (1 << 20), 1),
                "dirty_sync_count": ram.get("dirty-sync-count"),
                "normal_pages": ram.get("normal"), "zero_pages": ram.get("duplicate")}
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory", type=int, default=1024)
    ap.add_argument("--accel", default="kvm")
    ap.add_argument("--guests", default="idle,busy,zero")
    ap.add_argument("--downtime-ms", type=int, default=300)
    ap.add_argument("--qemu-accel", default="tcg")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--postcopy", action="store_true",
                    help="migrate post-copy: one full copy, then the guest runs on the target "
                         "and fetches what it dirtied since on demand")
    args = ap.parse_args()
    vireo = vireo_bin()
    work = tempfile.mkdtemp(prefix="vireo-migbench-")
    try:
        results = {"memory_mib": args.memory, "accel": args.accel,
                   "downtime_target_ms": args.downtime_ms, "postcopy": args.postcopy,
                   "load_average": os.getloadavg(), "vireo": [], "qemu": None}
        for kind in args.guests.split(","):
            r = vireo_case(vireo, work, kind, args)
            print(json.dumps(r), file=sys.stderr)
            results["vireo"].append(r)
        if not args.no_qemu:
            results["qemu"] = qemu_case(work, args)
            print(json.dumps(results["qemu"]), file=sys.stderr)
        print(json.dumps(results, indent=2))
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(HERE, "results", f"migrate-{stamp}.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"written to {out}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
