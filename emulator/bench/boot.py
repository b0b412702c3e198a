#!/usr/bin/env python3
"""Boot the guest kit on the emulator (release build), timestamp every serial
line, print the milestones and the CPU time. Env: VIREO (binary), KIT (kit
directory), EXTRA (more kernel command line). Argument: the log file."""
import subprocess, sys, time, os
vireo = os.environ.get("VIREO", "target/release/vireo")
kit = os.environ.get("KIT", "target/tmp/guest-kit")
log = sys.argv[1] if len(sys.argv) > 1 else "boot.log"
args = [vireo, "run", "--accel", "emu", "--image", kit, "--cpus", "1", "--memory", "512",
        "--append", os.environ.get("EXTRA","") + " vireo.run=echo kit-says-hello; grep -c ^processor /proc/cpuinfo; echo data-roundtrip > /tmp/f; cat /tmp/f; ls /sys/module | grep -c virtio"]
t0 = time.time()
r0 = os.times()
p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
marks = {}
first = None
with open(log, "w") as f:
    for line in p.stdout:
        t = time.time() - t0
        s = line.decode(errors="replace").rstrip()
        f.write(f"{t:8.2f} {s}\n"); f.flush()
        if first is None:
            first = t
            print(f"{t:8.2f}s  first output", flush=True)
        for key in ["Decompressing Linux", "Booting the kernel", "Linux version", "Freeing unused kernel", "vireo-init: ready", "kit-says-hello", "reboot: Power down"]:
            hit = (s.strip() == key) if key in ("kit-says-hello", "vireo-init: ready") else (key in s)
            if hit and key not in marks:
                marks[key] = t
                print(f"{t:8.2f}s  {key}", flush=True)
p.wait()
r1 = os.times()
print(f"exit {p.returncode} wall {time.time()-t0:.1f}s child user {r1.children_user-r0.children_user:.1f}s sys {r1.children_system-r0.children_system:.1f}s")
