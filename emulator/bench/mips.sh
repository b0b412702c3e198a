#!/bin/bash
# usage: mips.sh BINARY [SECONDS]: boot the kit (KIT, default target/tmp/guest-kit)
# for SECONDS of wall time; print guest instructions per host CPU second.
B=$1; T=${2:-40}
KIT=${KIT:-target/tmp/guest-kit}
VIREO_LOG=vireo_emulator=debug $B run --accel emu --image $KIT --cpus 1 --memory 512 > /tmp/mips.$$.log 2>&1 &
P=$!
sleep $T
read -r UT ST < <(awk '{print $14, $15}' /proc/$P/task/*/stat | awk '{u+=$1; s+=$2} END {print u, s}')
kill $P; wait $P 2>/dev/null
R=$(grep -o 'retired=[0-9]*' /tmp/mips.$$.log | tail -1 | cut -d= -f2)
TK=$(getconf CLK_TCK)
python3 -c "u=$UT/$TK; s=$ST/$TK; r=$R; print(f'{\"$B\".split(\"/\")[-1]}: retired {r/1e6:.0f}M in cpu {u+s:.1f}s (user {u:.1f}) -> {r/(u+s)/1e6:.1f} MIPS')"
grep -o 'rip=0x[0-9a-f]*' /tmp/mips.$$.log | tail -1
rm -f /tmp/mips.$$.log
