#!/usr/bin/env bash
# DOVE's VM end-to-end suite, one command: build the patched kernel (cached by the hash
# of kernel-patch/), build an initramfs with DOVE, runc and iperf3, boot it under QEMU
# with software emulation (KVM refuses ordinary guests on our machines), run the KUnit
# checks and the noisy-neighbour scenario with DOVE off and on, print the table, and exit
# non-zero when a criterion fails.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

command -v qemu-system-x86_64 >/dev/null && command -v iperf3 >/dev/null && command -v ethtool >/dev/null || \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86 iperf3 ethtool cpio >/dev/null

kernel=$(bash tests/vm/build-kernel.sh)
cargo build --release -q -p dove-daemon -p dove-hook
work=$(mktemp -d /tmp/dove-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
bash tests/vm/mkinitramfs.sh "$work/initramfs.cpio" "$repo/target/release"

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

python3 - "$work/results" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
failures = []
kunit = [l for l in lines if l.startswith("DOVE-VM KUNIT")]
suite = [l for l in kunit if re.search(r"ok \d+ sched_dove$", l)]
if not suite or any("not ok" in l for l in kunit):
    failures.append("KUnit sched_dove: " + ("; ".join(kunit) or "no results in dmesg"))
warnings = [l for l in lines if l.startswith("DOVE-VM DMESG-WARNINGS")]
if not warnings or warnings[0].split()[-1] != "0":
    failures.append("kernel warnings during the run: " + "; ".join(l for l in lines if l.startswith("DOVE-VM DMESG ")))
runs = {}
for l in lines:
    if l.startswith("DOVE-VM RESULT"):
        kv = dict(re.findall(r"(\w+)=(\S*)", l))
        runs[kv["mode"]] = kv
if set(runs) != {"off", "on"}:
    failures.append(f"scenario results missing: got {sorted(runs)}")
else:
    print()
    print(f"{'DOVE':<5} {'B usage':>9} {'B softirq':>10} {'B total':>9} {'quota':>7} {'B/quota':>8} {'charged':>8} {'CPU0 sirq':>10} {'A share':>8}  throughput")
    for mode in ("off", "on"):
        r = {k: (int(v) if v.lstrip('-').isdigit() else v) for k, v in runs[mode].items()}
        total = r["b_usage_us"] + r["b_softirq_us"]
        r["total"] = total
        r["ratio"] = total / r["quota_us"]
        r["a_share"] = r["a_usage_us"] / r["window_us"]
        runs[mode] = r
        print(f"{mode:<5} {r['b_usage_us']/1e6:>8.2f}s {r['b_softirq_us']/1e6:>9.2f}s {total/1e6:>8.2f}s {r['quota_us']/1e6:>6.2f}s {r['ratio']:>8.2f} {r['b_charged_us']/1e6:>7.2f}s {r['cpu0_softirq_us']/1e6:>9.2f}s {r['a_share']*100:>7.1f}%  {r['throughput']}")
    for mode in ("off", "on"):
        r = runs[mode]
        share = lambda us: f"{us / r['window_us'] * 100:.1f}%"
        rest = r["window_us"] - r["a_usage_us"] - r["b_usage_us"] - r["cpu0_softirq_us"] - r["cpu0_irq_us"]
        print(f"CPU 0, DOVE {mode}: A {share(r['a_usage_us'])}, B {share(r['b_usage_us'])}, "
              f"softirq {share(r['cpu0_softirq_us'])}, hardirq {share(r['cpu0_irq_us'])}, everything else {share(rest)}")
    off, on = runs["off"], runs["on"]
    # What must hold for DOVE to be doing its job here (the suite fails otherwise):
    if off["ratio"] <= 1.15:
        failures.append(f"with DOVE off B's total is only {off['ratio']:.2f}x its quota: the scenario shows no escape, so it proves nothing")
    if on["b_charged_us"] <= 0:
        failures.append("with DOVE on the scheduler charged B nothing (cpu.stat dove_charged_usec)")
    else:
        # No cost is lost: what was attributed was either charged or is still pending
        # (carried over past the per-period cap).
        accounted = on["b_charged_us"] + on["b_pending_us"]
        print(f"cost conservation (DOVE on): attributed {on['b_softirq_us']/1e6:.3f}s = charged {on['b_charged_us']/1e6:.3f}s + pending change {on['b_pending_us']/1e6:+.3f}s -> {accounted/1e6:.3f}s")
        if abs(accounted / max(on["b_softirq_us"], 1) - 1) > 0.10:
            failures.append(f"charged + pending ({accounted/1e6:.2f}s) does not match the attributed {on['b_softirq_us']/1e6:.2f}s (want within 10%)")
    if abs(on["ratio"] - 1) > 0.10:
        failures.append(f"with DOVE on B's total is {on['ratio']:.2f}x its quota (off: {off['ratio']:.2f}x): want within 10%")
    if on["a_share"] <= off["a_share"]:
        failures.append(f"A's share of CPU 0 did not improve ({off['a_share']*100:.1f}% -> {on['a_share']*100:.1f}%)")
    # A keeps its fair 80% of CPU 0 less at most 2 points (the tick, the RPS IPIs and
    # the per-CPU kernel threads that cannot leave CPU 0).
    if on["a_share"] < 0.78:
        failures.append(f"with DOVE on A got {on['a_share']*100:.1f}% of CPU 0: want at least 78%")
for f in failures:
    print("vm: FAIL:", f)
print("vm:", "1 passed, 0 failed" if not failures else "0 passed, 1 failed")
sys.exit(1 if failures else 0)
PY
