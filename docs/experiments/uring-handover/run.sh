#!/bin/bash
# Runs one experiment under the machine lock: saves enable_uring, sets it to Y for the run,
# writes the saved value back (trap, also on error), checks nothing is left behind.
# usage: ./run.sh e1 [watch] | e2 [n] | e3 [n] | e4 a|b|c      (output: stdout)
# Build first: gcc -O2 -Wall -o uexp uexp.c -luring. LOCK: the lock benchmarks on this machine
# share (none runs beside an experiment).
cd "$(dirname "$0")"
exec flock "${LOCK:-/run/lock/zramfs-machine.lock}" bash -c '
P=/sys/module/fuse/parameters/enable_uring
orig=$(cat $P)
restore() {
  echo "$orig" > $P
  # anything of ours left? (mountpoints /tmp/uexp.*, processes named uexp)
  for m in $(awk "\$2 ~ /^\\/tmp\\/uexp\\./ {print \$2}" /proc/mounts); do
    echo "LEFTOVER mount $m: aborting and detaching"
    d=$(grep " $m " /proc/self/mountinfo | awk "{print \$3}" | cut -d: -f2)
    [ -n "$d" ] && [ -e /sys/fs/fuse/connections/$d/abort ] && echo 1 > /sys/fs/fuse/connections/$d/abort
    umount -l "$m"; rmdir "$m"
  done
  for d in /tmp/uexp.*; do [ -d "$d" ] && ! mountpoint -q "$d" && rmdir "$d"; done
  echo "--- enable_uring restored to $(cat $P) (was $orig); uexp processes left: $(pgrep -x uexp | wc -l); uexp mounts left: $(grep -c /tmp/uexp /proc/mounts)"
}
trap restore EXIT
echo Y > $P
echo "--- $(date -Is) enable_uring $orig -> $(cat $P); uname $(uname -r)"
dmesg | tail -n 1 > /tmp/uexp-dmesg-mark.$$ 2>/dev/null
timeout -k 3 50 ./uexp "$@"
echo "--- uexp exit status $?"
echo "--- kernel log lines during the run:"
mark=$(cat /tmp/uexp-dmesg-mark.$$); rm -f /tmp/uexp-dmesg-mark.$$
dmesg | awk -v m="$mark" "f{print} \$0==m{f=1}" | tail -n 30
' _ "$@"
