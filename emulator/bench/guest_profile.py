#!/usr/bin/env python3
"""Map an emulator guest profile (VIREO_EMU_PROFILE=FILE, written as
FILE.vcpuN: `RIP COUNT` lines) to the guest kernel's symbols.

  VIREO_EMU_PROFILE=/tmp/prof vireo run --accel emu --image KIT \
      --cmdline '... nokaslr vireo.run=...'
  vireo run --accel emu --image KIT \
      --cmdline '... nokaslr quiet vireo.run=cat /proc/kallsyms' > kallsyms.txt
  emulator/bench/guest_profile.py /tmp/prof.vcpu0 kallsyms.txt [--top 40]

Both boots need `nokaslr` so the kernel sits at the same address. Lines of
kallsyms.txt that are not symbols (console output) are skipped.
"""
import argparse
import bisect
import collections
import re

SYM = re.compile(r"^([0-9a-f]{16}) ([tTwW]) (\S+)(?:\s+\[(\S+)\])?\s*$")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("kallsyms")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    syms = []
    for line in open(a.kallsyms, errors="replace"):
        m = SYM.match(line.strip())
        if m and int(m.group(1), 16):
            name = m.group(3) + (f" [{m.group(4)}]" if m.group(4) else "")
            syms.append((int(m.group(1), 16), name))
    syms.sort()
    addrs = [s[0] for s in syms]
    per_fn = collections.Counter()
    total = 0
    user = 0
    for line in open(a.profile):
        rip, n = line.split()
        rip, n = int(rip, 16), int(n)
        total += n
        if rip < 0xffff_8000_0000_0000:
            user += n
            per_fn["(user space)"] += n
            continue
        i = bisect.bisect_right(addrs, rip) - 1
        per_fn[syms[i][1] if i >= 0 else "(unknown)"] += n
    print(f"{total} samples ({total * 2048 / 1e6:.0f} M instructions), user space {100 * user / max(total, 1):.1f}%")
    for name, n in per_fn.most_common(a.top):
        print(f"{100 * n / total:6.2f}%  {n:8}  {name}")


if __name__ == "__main__":
    main()
