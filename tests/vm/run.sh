#!/usr/bin/env bash
# DOVE's VM end-to-end suite, one command: build the patched kernel (cached by the hash
# of kernel-patch/) and fetch Debian's 6.1 and 6.12 cloud kernels (cached by version), build an
# initramfs with DOVE, runc and a traffic tool, boot each under QEMU with software emulation (KVM
# refuses ordinary guests on our machines), run the KUnit checks and the scenarios
# (noisy neighbour with DOVE off, kernel-enforced and cpumax; a flood without and with
# early drop), print the tables, and exit non-zero when a criterion fails.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

command -v qemu-system-x86_64 >/dev/null && command -v cpio >/dev/null || \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 cpio >/dev/null

kernel=$(bash tests/vm/build-kernel.sh)
# A Debian kernel that cannot be fetched fails the suite, after the patched boot has run.
debian=$(bash tests/vm/debian-kernel.sh 6.1) || debian=
debian612=$(bash tests/vm/debian-kernel.sh 6.12) || debian612=
# bookworm's QEMU cannot run Debian's 6.12 (tests/vm/qemu.sh says why): backports' can.
qemu612=$(bash tests/vm/qemu.sh) || qemu612=
# Built for the whole workspace, as install.sh and test.sh build it: packages picked
# with -p unify other dependency features and would compile tokio and the rest again.
cargo build --release -q --workspace --bins
# The streams' senders and B's receiver (a debug build: the host suites already made it).
cargo build -q --workspace --bins
traffic="$repo/target/debug/dove-traffic"
work=$(mktemp -d /tmp/dove-vm.XXXXXX)
# Interrupted: stop the emulators (timeout passes the signal on to QEMU) and show what
# the lanes had printed before their files go.
cleanup() {
    local pid
    for pid in "$work"/*.pid; do
        [ -e "$pid" ] && kill -TERM "$(cat "$pid")" 2>/dev/null
    done
    [ -z "${lanes_printed:-}" ] && cat "$work"/lane-*.out 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

boot() { # boot NAME KERNEL INITRAMFS [APPEND [QEMU]]: the guest's DOVE-VM lines in $work/NAME
    local log="${DOVE_VM_LOG:-$work/console}.$1" qemu="${5:-qemu-system-x86_64}"
    echo "vm: booting $2 (TCG, 2 vCPUs); console log: $log"
    local start=$(date +%s)
    # Single-threaded TCG: with one host thread per vCPU, the kernel's live text
    # patching (static keys flipped when programs attach and detach) raced with
    # translated code on the other vCPU and oopsed on a stale int3.
    ${pin:-} timeout 1200 "$qemu" -accel tcg,thread=single -cpu max -smp 2 -m 1536M \
        -kernel "$2" -initrd "$3" \
        -append "console=ttyS0 panic=-1 loglevel=4 irqaffinity=1 ${4:-}" \
        -nographic -no-reboot -nic none > "$log" 2>&1 &
    echo $! > "$work/$1.pid"
    wait $! || true
    rm -f "$work/$1.pid"
    echo "vm: guest ran $(( $(date +%s) - start )) s"
    # (A line may follow the firmware's escape sequences without a newline.)
    tr -d '\r' < "$log" | grep -ao 'DOVE-VM .*' > "$work/$1" || true
    cat "$work/$1"
    if ! grep -q '^DOVE-VM END' "$work/$1"; then
        echo "vm: the guest did not finish; last console lines:" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
}

# Each boot's emulator is one host thread (single-threaded TCG, above), and every
# criterion compares numbers of one boot with each other: with two host cores, two
# lanes, each emulator pinned to a core of its own. The patched kernel runs on one;
# Debian's 6.1 then 6.12 on the other (together about as long as the patched run).
# Each lane's output is printed when both are done. DOVE_VM_LANES=1 boots one after
# another.
patched_lane() {
    # The patched 6.12 built with the harness's config (IRQ time accounting on): every
    # scenario, kernel enforcement included.
    boot patched "$kernel" "$work/initramfs.cpio" && python3 tests/vm/check.py "$work/patched"
}
debian_lane() {
    local status=0
    # Debian's own 6.1 cloud kernel: no patch, no IRQ time accounting, no tcx, veth and
    # the tc modules loaded from the package.
    if [ -z "$debian" ]; then
        echo "vm: FAIL: Debian's cloud kernel could not be fetched, or its initramfs not built (above)" >&2
        status=1
    else
        boot debian "$debian/vmlinuz" "$work/initramfs-debian.cpio" "dove.compat" &&
            python3 tests/vm/check.py "$work/debian" || status=1
    fi
    # Debian's 6.12 from bookworm-backports, the series most hosts move to next: tcx for
    # early drop, still no IRQ time accounting.
    if [ -z "$debian612" ] || [ -z "$qemu612" ]; then
        echo "vm: FAIL: Debian's 6.12 cloud kernel or backports' QEMU could not be fetched, or its initramfs not built (above)" >&2
        status=1
    else
        boot debian612 "$debian612/vmlinuz" "$work/initramfs-debian612.cpio" "dove.compat" "$qemu612" &&
            python3 tests/vm/check.py "$work/debian612" || status=1
    fi
    return $status
}

bash tests/vm/mkinitramfs.sh "$work/initramfs.cpio" "$repo/target/release" "$traffic"
# A Debian kernel whose initramfs cannot be built fails the suite, after the patched boot.
[ -z "$debian" ] ||
    bash tests/vm/mkinitramfs.sh "$work/initramfs-debian.cpio" "$repo/target/release" "$traffic" "$debian/modules" ||
    debian=
[ -z "$debian612" ] ||
    bash tests/vm/mkinitramfs.sh "$work/initramfs-debian612.cpio" "$repo/target/release" "$traffic" "$debian612/modules" ||
    debian612=
started=$(date +%s)
status=0
if [ "${DOVE_VM_LANES:-2}" -ge 2 ] && [ "$(nproc)" -ge 2 ]; then
    pin="taskset -c 0" patched_lane > "$work/lane-patched.out" 2>&1 &
    patched_pid=$!
    pin="taskset -c 1" debian_lane > "$work/lane-debian.out" 2>&1 &
    debian_pid=$!
    wait $patched_pid || status=1
    wait $debian_pid || status=1
    cat "$work/lane-patched.out" "$work/lane-debian.out"
    lanes_printed=yes
else
    patched_lane || status=1
    debian_lane || status=1
fi
echo "vm: the boots took $(( $(date +%s) - started )) s"
exit $status
