#!/usr/bin/env bash
# DOVE's VM end-to-end suite, one command: build the patched kernel (cached by the hash
# of kernel-patch/), build an initramfs with DOVE, runc and a traffic tool, boot it under QEMU
# with software emulation (KVM refuses ordinary guests on our machines), run the KUnit
# checks and the noisy-neighbour scenario with DOVE off and on, print the table, and exit
# non-zero when a criterion fails.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

command -v qemu-system-x86_64 >/dev/null && command -v cpio >/dev/null || \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 cpio >/dev/null

kernel=$(bash tests/vm/build-kernel.sh)
cargo build --release -q -p dove-daemon -p dove-hook -p dove-ctl
# The stream's sender and B's receiver (a debug build: the host suites already made it).
cargo build -q -p dove-tests --bin dove-traffic
work=$(mktemp -d /tmp/dove-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
bash tests/vm/mkinitramfs.sh "$work/initramfs.cpio" "$repo/target/release" "$repo/target/debug/dove-traffic"

log="${DOVE_VM_LOG:-$work/console.log}"
echo "vm: booting $kernel (TCG, 2 vCPUs); console log: $log"
start=$(date +%s)
# Single-threaded TCG: with one host thread per vCPU, the kernel's live text patching
# (static keys flipped when programs attach and detach) raced with translated code on
# the other vCPU and oopsed on a stale int3.
timeout 900 qemu-system-x86_64 -accel tcg,thread=single -cpu max -smp 2 -m 1536M \
    -kernel "$kernel" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 panic=-1 loglevel=4 irqaffinity=1" \
    -nographic -no-reboot -nic none > "$log" 2>&1 || true
echo "vm: guest ran $(( $(date +%s) - start )) s"
tr -d '\r' < "$log" | grep '^DOVE-VM' > "$work/results" || true
cat "$work/results"
if ! grep -q '^DOVE-VM END' "$work/results"; then
    echo "vm: the guest did not finish; last console lines:" >&2
    tail -n 40 "$log" >&2
    exit 1
fi

python3 tests/vm/check.py "$work/results"
