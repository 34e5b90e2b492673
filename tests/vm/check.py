#!/usr/bin/env python3
"""Judge the VM suite from the guest's DOVE-VM lines (tests/vm/README.md says what each
criterion proves). usage: check.py RESULTS"""
import re, sys
lines = open(sys.argv[1]).read().splitlines()
failures = []
# A distribution kernel (dove.compat): no DOVE patch, so no KUnit and no kernel mode, and
# no IRQ time accounting, so the task a softirq interrupts is billed for it: A's usage
# includes what B's traffic took from it, and A's share cannot tell fair from stolen.
compat = any(l.startswith("DOVE-VM BOOTED") and "compat=yes" in l for l in lines)
print(f"vm: {'compatibility run (distribution kernel)' if compat else 'patched kernel'}: "
      + next((l[len("DOVE-VM BOOTED "):] for l in lines if l.startswith("DOVE-VM BOOTED")), "no BOOTED line"))
kunit = [l for l in lines if l.startswith("DOVE-VM KUNIT")]
suite = [l for l in kunit if re.search(r"ok \d+ sched_dove$", l)]
if not compat and (not suite or any("not ok" in l for l in kunit)):
    failures.append("KUnit sched_dove: " + ("; ".join(kunit) or "no results in dmesg"))
# The guest says ERROR where a step of the scenario itself went wrong (a runtime refused a
# container, the stream's sender died): whatever the numbers say, the run is not valid.
failures += [f"the guest reported: {l[len('DOVE-VM ERROR '):]}" for l in lines if l.startswith("DOVE-VM ERROR")]
# The patched kernel's clock must stay the TSC from boot to the end: the kernel stops IRQ
# time accounting when it finds the TSC unstable.
clock = next((dict(re.findall(r"(\w+)=(\S*)", l)) for l in lines if l.startswith("DOVE-VM CLOCK")), {})
booted = next((l for l in lines if l.startswith("DOVE-VM BOOTED")), "")
if not compat and ("clocksource=tsc" not in booted or clock.get("clocksource") != "tsc" or clock.get("unstable") != "0"):
    failures.append(f"the guest's clock left the TSC or found it unstable (boot: {booted or 'no BOOTED line'}; end: {clock or 'no CLOCK line'})")
warnings = [l for l in lines if l.startswith("DOVE-VM DMESG-WARNINGS")]
if not warnings or warnings[0].split()[-1] != "0":
    failures.append("kernel warnings during the run: " + "; ".join(l for l in lines if l.startswith("DOVE-VM DMESG ")))

QUOTA_US = 40000
MODES = ("ref", "cpumax") if compat else ("ref", "off", "on", "cpumax")
samples, runs, floods, restores, health = {}, {}, {}, {}, {}
for l in lines:
    kv = dict(re.findall(r"(\w+)=(\S*)", l))
    # A value the guest could not read is empty: None, never a 0 that might pass.
    num = lambda v: int(v) if re.fullmatch(r"-?\d+", v or "") else None
    if l.startswith("DOVE-VM SAMPLE"):
        samples[(kv["mode"], kv["at"])] = {k: num(v) for k, v in kv.items() if k not in ("mode", "at")}
    elif l.startswith("DOVE-VM TRACE"):
        # The kernel's own count over the window: B's refills, NET softirq on CPU 0, and
        # all CPUs' NET softirq over the shortest and longest stretch DOVE's reads span.
        r = runs.setdefault(kv["mode"], {})
        r["refills"], r["ftrace_cpu0"] = num(kv.get("refills")), num(kv.get("cpu0_us"))
        r["timer_runs"] = num(kv.get("timer_runs"))
        r["trace_overrun"] = num(kv.get("overrun"))
        r["net_lo"], r["net_hi"] = num(kv.get("lo_us")), num(kv.get("hi_us"))
    elif l.startswith("DOVE-VM FINAL"):
        final = {k: num(v) for k, v in kv.items() if k != "mode"}
        runs.setdefault(kv["mode"], {})["final"] = final
    elif l.startswith("DOVE-VM CALIBRATE"):
        runs.setdefault(kv["mode"], {}).setdefault("calibration", []).append(
            f"{(num(kv.get('rate_kbit')) or 0)/1000:.1f} Mbit/s ({num(kv.get('pps'))} packets/s) -> {(num(kv.get('cpu0_net_permille')) or 0)/10:.1f}%")
    elif l.startswith("DOVE-VM HOLD"):
        runs.setdefault(kv["mode"], {}).setdefault("hold", []).append(
            f"{(num(kv.get('rate_kbit')) or 0)/1000:.1f} Mbit/s ({num(kv.get('pps'))} packets/s) -> {(num(kv.get('cpu0_net_permille')) or 0)/10:.1f}%")
    elif l.startswith("DOVE-VM FLOOD "):
        floods.setdefault(kv["mode"], {})[kv["at"]] = {k: num(v) for k, v in kv.items() if k not in ("mode", "at")}
    elif l.startswith("DOVE-VM DROPS"):
        floods.setdefault(kv["mode"], {})["drops"] = {k: num(v) for k, v in kv.items() if k != "mode"}
    elif l.startswith("DOVE-VM RESTORE"):
        restores[kv["check"]] = kv
    elif l.startswith("DOVE-VM HEALTH"):
        health.setdefault(kv["mode"], {})[kv["at"]] = {k: num(v) for k, v in kv.items() if k not in ("mode", "at")}
    elif l.startswith("DOVE-VM METRICS"):
        floods.setdefault(kv["mode"], {})["metrics"] = l

# The guest kernel accounts IRQ time (its config requires it for the patch) and B's traffic
# interrupts A's busy loop: doved must say so, from the running kernel, not its config.
for l in lines:
    if not l.startswith("DOVE-VM STATUS") or "mode=ref" in l:
        continue
    if not compat and "irq time accounting: active" not in l:
        failures.append(f"doved does not report IRQ time accounting as active in a guest that runs it: {l}")
    if compat and "irq time accounting: not built" not in l:
        failures.append(f"doved does not report that this kernel has no IRQ time accounting: {l}")
for mode in MODES:
    if (mode, "begin") not in samples or (mode, "end") not in samples or "refills" not in runs.get(mode, {}):
        failures.append(f"scenario {mode}: no complete results")
        continue
    b, e = samples[(mode, "begin")], samples[(mode, "end")]
    r = runs[mode]
    unread = sorted({k for k in set(b) | set(e) if b.get(k) is None or e.get(k) is None}
                    | {k for k in ("refills", "timer_runs", "ftrace_cpu0", "net_lo", "net_hi", "trace_overrun") if r.get(k) is None})
    if unread:
        failures.append(f"scenario {mode}: the guest could not read {', '.join(unread)}")
        runs.pop(mode)
        continue
    r.update({k: e[k] - b[k] for k in e})
    if r["trace_overrun"]:
        failures.append(f"scenario {mode}: the trace buffer lost {r['trace_overrun']} events: its refills and NET "
                        "time are undercounted (raise buffer_size_kb in guest-init.sh)")
    r["window"] = r.pop("t")
    # A write of cpu.max refills B's runtime too (tg_set_cfs_bandwidth), and the kprobe
    # counts it: only the period timer's refills grant B its base quota.
    r["quota"] = (r["refills"] - r["b_writes"]) * QUOTA_US
    if mode == "cpumax" and b["b_writes"] < 1:
        failures.append("cpumax: doved reported no quota writes before the window, though it had lowered B's quota: "
                        "its refills cannot be told from the period timer's")
    elif mode == "cpumax" and r["b_writes"] < 0:
        failures.append(f"cpumax: doved's quota writes went from {b['b_writes']} to {e['b_writes']} "
                        "over the window (unreadable at its end?)")
    if compat:
        # The period timer's refill is inlined in this kernel: the refill kprobe sees only
        # writes of cpu.max. B's quota is counted from the timer's runs (each refills once;
        # B's is the only pool with a quota), not nr_periods, which counts every period a
        # late timer skipped.
        r["quota"] = r["timer_runs"] * QUOTA_US
    r["b_total"] = r["b_usage"] + r["b_attr"]
    r["ratio"] = r["b_total"] / max(r["quota"], 1)
    r["a_share"] = r["a_usage"] / r["window"]

if all(m in runs and "window" in runs[m] for m in MODES):
    ref, cpumax = runs["ref"], runs["cpumax"]
    absent = {"b_attr": 0, "cpu0_sirq": 0, "ratio": 0.0, "a_share": 0.0}
    off = runs["off"] if "window" in runs.get("off", {}) else absent
    on = runs["on"] if "window" in runs.get("on", {}) else absent
    s = lambda us: f"{us / 1e6:.2f}s"
    print()
    print(f"{'DOVE':<5} {'window':>7} {'refills':>7} {'periods':>7} {'quota':>7} {'B usage':>8} {'B sirq':>7} "
          f"{'B/quota':>7} {'charged':>8} {'pending':>8} {'A share':>7}  stream")
    for mode in MODES:
        r = runs[mode]
        print(f"{mode:<5} {s(r['window']):>7} {r['refills']:>7} {r['periods']:>7} {s(r['quota']):>7} {s(r['b_usage']):>8} "
              f"{s(r['b_attr']):>7} {r['ratio']:>7.2f} {s(r.get('b_charged', 0)):>8} {r['b_pending']/1e6:>+7.2f}s "
              f"{r['a_share']*100:>6.1f}%  " + (f"{r['rx'] / r['window'] * 1e6:.0f} packets/s "
              f"({r['rx'] / r['window'] * 1e6 * 1400 * 8 / 1e6:.1f} Mbit/s)" if r.get("rx", 0) > 0 else "-"))
    print(f"{'DOVE':<5} {'NET traced':>17} {'B attr':>7} {'A attr':>7} {'unattr':>7} {'DOVE':>7} {'DOVE/NET':>8}   "
          f"{'/proc/stat sirq':>15} {'ksoftirqd':>9} {'baseline':>8} {'less base':>9}")
    # /proc/stat's softirq time on all CPUs, printed beside the criterion: exact with
    # IRQ_TIME_ACCOUNTING for softirq run on interrupt exit, but for ksoftirqd it books
    # every tick the thread is running (its scheduling, and TIMER/RCU work, included).
    base_rate = ref["sirq"] / ref["window"]
    for mode in MODES:
        r = runs[mode]
        r["dove_sirq"] = r["b_attr"] + r["a_attr"] + r["unattr"]
        # DOVE's counters were read between two markers at each end of the window: the
        # kernel's NET time over the same stretch lies between these two.
        lo, hi = r.get("net_lo", 0), r.get("net_hi", 0)
        r["dove_vs_kernel"] = 1.0 if lo <= r["dove_sirq"] <= hi else r["dove_sirq"] / max(lo if r["dove_sirq"] < lo else hi, 1)
        r["baseline"] = base_rate * r["window"]
        print(f"{mode:<5} {s(r.get('net_lo', 0)) + '-' + s(r.get('net_hi', 0)):>17} {s(r['b_attr']):>7} {s(r['a_attr']):>7} {s(r['unattr']):>7} "
              f"{s(r['dove_sirq']):>7} {r['dove_vs_kernel']:>8.2f}   {s(r['sirq']):>15} {s(r['ksoftirqd']):>9} "
              f"{s(r['baseline']):>8} {s(r['sirq'] - r['baseline']):>9}")
    for mode in MODES:
        r = runs[mode]
        share = lambda us: f"{us / r['window'] * 100:.1f}%"
        rest = r["window"] - r["a_usage"] - r["b_usage"] - r["cpu0_sirq"] - r["cpu0_irq"]
        print(f"CPU 0, {mode}: A {share(r['a_usage'])}, B {share(r['b_usage'])}, softirq {share(r['cpu0_sirq'])}, "
              f"hardirq {share(r['cpu0_irq'])}, everything else {share(rest)}")

    # Not judged: where the unattributed time comes from.
    for mode in MODES[1:]:
        h = health.get(mode, {})
        if "begin" in h and "end" in h:
            d = {k: (h["end"].get(k) or 0) - (v or 0) for k, v in h["begin"].items()}
            print(f"observer, {mode}: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    print("the stream (its rate -> CPU 0's softirq in /proc/stat, less the reference's): passes before the window; "
          "held through it; the window's NET softirq on CPU 0 as the trace counts it")
    for m in MODES[1:]:
        print(f"  {m}: " + ", ".join(runs[m].get("calibration", ["-"])) + "; held: " + ", ".join(runs[m].get("hold", ["-"])) +
              f"; traced {runs[m].get('ftrace_cpu0', 0) / max(runs[m]['window'], 1) * 100:.1f}%")
    print(f"CPU 0 NET softirq traced: off {s(off.get('ftrace_cpu0', 0))} (B attributed {s(off['b_attr'])}), "
          f"on {s(on.get('ftrace_cpu0', 0))} (B attributed {s(on['b_attr'])}); /proc/stat CPU 0 softirq: "
          f"off {s(off['cpu0_sirq'])}, on {s(on['cpu0_sirq'])}")
    # What must hold for DOVE to be doing its job here (the suite fails otherwise).
    # IRQ time accounting really on through every window (the kernel turns it off when
    # the TSC turns unstable, and then B's usage would include the softirq time DOVE also
    # attributes): CPU 0's softirq in /proc/stat covers the NET softirq the kernel traced
    # there, plus the other vectors' (timers, RCU: 1.05-1.10x measured), and not the
    # several times more that booking by the tick gives (Debian's 6.1: 8.7x).
    for mode in MODES[1:]:
        r = runs[mode]
        if not compat and not 0.9 <= r["cpu0_sirq"] / max(r["ftrace_cpu0"], 1) <= 1.4:
            failures.append(f"DOVE {mode}: /proc/stat booked {s(r['cpu0_sirq'])} of softirq on CPU 0 where the kernel traced "
                            f"{s(r['ftrace_cpu0'])} of NET softirq (want 0.9-1.4x): IRQ time accounting is not what it should be")
    # The reference: B alone on its quota burns what the refills granted it.
    if abs(ref["ratio"] - 1) > 0.10:
        failures.append(f"reference: B used {ref['ratio']:.2f}x the {ref['refills']} refills' quota with no traffic: "
                        "the refill count does not describe what CFS granted (want within 10%)")
    if not compat and off["ratio"] <= 1.15:
        failures.append(f"with DOVE off B's total is only {off['ratio']:.2f}x its quota: the scenario shows no escape, so it proves nothing")
    if not compat and ref["a_share"] - off["a_share"] <= 0.10:
        failures.append(f"with DOVE off A got {off['a_share']*100:.1f}% of CPU 0, not more than 10 points below the "
                        f"reference {ref['a_share']*100:.1f}%: B's traffic takes nothing from A here, so the scenario proves nothing")
    for mode in MODES[1:]:
        r = runs[mode]
        if r.get("net_lo", 0) <= 0:
            failures.append(f"DOVE {mode}: the trace holds no NET softirq in the window: nothing to compare DOVE with")
        # On Debian's 6.1 DOVE read 1.08, 1.08 and 1.10x the traced NET time in three
        # boots (the patched 6.12: 1.01-1.06). Not explained yet (an open item of the
        # attribution work); until it is, that kernel gets 15%, the patched one keeps 10%.
        limit = 0.15 if compat else 0.10
        if abs(r["dove_vs_kernel"] - 1) > limit:
            failures.append(f"DOVE {mode}: DOVE's attributed + unattributed softirq {s(r['dove_sirq'])} is {r['dove_vs_kernel']:.2f}x "
                            f"the NET softirq time the kernel traced over the same stretch ({s(r.get('net_lo', 0))}-"
                            f"{s(r.get('net_hi', 0))}): want within {limit:.0%}")
    final = on.get("final")
    if compat:
        pass
    elif on["b_charged"] <= 0:
        failures.append("with DOVE on the scheduler charged B nothing in the window (cpu.stat dove_charged_usec)")
    if compat:
        pass
    elif not final:
        failures.append("with DOVE on: no FINAL line (B's totals once the traffic was over)")
    elif None in final.values():
        failures.append("with DOVE on: the guest could not read B's final "
                        + ", ".join(k for k, v in final.items() if v is None))
    else:
        # No cost is lost: over B's whole life, what DOVE attributed was either charged by
        # the scheduler (its own counter in cpu.stat) or is still pending. Read once
        # nothing moves: a refill between the two reads of charged would skew it.
        accounted = final["b_charged"] + final["b_pending"]
        print(f"cost conservation (DOVE on, B's whole life): attributed {final['b_attr']/1e6:.3f}s = charged "
              f"{final['b_charged']/1e6:.3f}s (cpu.stat; {final['b_charged_after']/1e6:.3f}s read after) + pending "
              f"{final['b_pending']/1e6:.3f}s -> {accounted/1e6:.3f}s ({accounted / max(final['b_attr'], 1):.4f}x)")
        if final["b_charged"] != final["b_charged_after"]:
            failures.append("B was still being charged while its totals were read: the conservation check read a moving target")
        if final["b_attr"] <= 0 or abs(accounted / final["b_attr"] - 1) > 0.02:
            failures.append(f"charged + pending ({accounted/1e6:.3f}s) does not match the attributed {final['b_attr']/1e6:.3f}s (want within 2%)")
    if not compat and abs(on["ratio"] - 1) > 0.10:
        failures.append(f"with DOVE on B's total is {on['ratio']:.2f}x its quota (off: {off['ratio']:.2f}x): want within 10%")
    if not compat and abs(on["a_share"] - ref["a_share"]) > 0.05:
        failures.append(f"with DOVE on A got {on['a_share']*100:.1f}% of CPU 0: want within 5 points of the reference {ref['a_share']*100:.1f}%")
    # cpumax: doved lowers B's quota by its softirq cost; the kernel charges nothing.
    # B's own CPU plus its softirq against the quota the real refills granted (the base).
    # Without IRQ time accounting B's usage also holds the softirq that interrupted B,
    # which DOVE attributes too: the total counts that part twice, hence the wider band.
    limit = 0.20 if compat else 0.15
    if abs(cpumax["ratio"] - 1) > limit:
        failures.append(f"cpumax: B's total is {cpumax['ratio']:.2f}x its quota (off: {off['ratio']:.2f}x): want within {limit:.0%}")
    if not compat and abs(cpumax["a_share"] - ref["a_share"]) > 0.05:
        failures.append(f"cpumax: A got {cpumax['a_share']*100:.1f}% of CPU 0: want within 5 points of the reference {ref['a_share']*100:.1f}%")
    if cpumax.get("b_charged", 0) != 0:
        failures.append(f"cpumax: the scheduler charged B {s(cpumax['b_charged'])}: no maps were handed to it, so cpumax is not what held B")
# The 64-byte flood at B in its own network namespace: B alone at the flood runs' quota
# (A's fair share), then cpumax without and with early drop; on a distribution kernel
# only the last, whose drops are judged.
FLOOD_MODES = ("flood-on",) if compat else ("flood-ref", "flood-off", "flood-on")
FLOOD_QUOTA_SHARE = 10000 / 100000  # guest-init.sh's FLOOD_QUOTA over its period
for mode in FLOOD_MODES:
    f = floods.get(mode, {})
    if "begin" not in f or "end" not in f:
        failures.append(f"scenario {mode}: no complete results")
        continue
    b, e = f["begin"], f["end"]
    unread = sorted(k for k in set(b) | set(e) if b.get(k) is None or e.get(k) is None)
    if unread:
        failures.append(f"scenario {mode}: the guest could not read {', '.join(unread)}")
        continue
    f.update({k: e[k] - b[k] for k in e})
    f["a_share"] = f["a_usage"] / max(f["t"], 1)
    f["b_share"] = f["b_usage"] / max(f["t"], 1)
drops = lambda f: f.get("drops", {})
if all("a_share" in floods.get(m, {}) for m in FLOOD_MODES):
    # Drops over the whole run, read once the sender stopped: DOVE's against the kernel's
    # failed sends (less the veth's own drops: on kernels before 6.6 a veth drop may not
    # fail the send, so either reading of the kernel's count is accepted).
    print(f"{'flood':<10} {'window':>7} {'B usage':>8} {'B sirq':>7} {'A share':>7}  {'DOVE dropped':>12} {'failed sends':>12} {'veth drops':>10}")
    for mode in FLOOD_MODES:
        f, d = floods[mode], drops(floods[mode])
        shown = lambda k: "-" if d.get(k) is None else d[k]
        print(f"{mode:<10} {f['t']/1e6:>6.2f}s {f['b_usage']/1e6:>7.2f}s {f['b_attr']/1e6:>6.2f}s {f['a_share']*100:>6.1f}%  "
              f"{shown('dropped'):>12} {shown('sndbuf'):>12} {shown('vethdrop'):>10}")
    on = floods["flood-on"]
    if not compat:
        ref_share, off = floods["flood-ref"]["a_share"], floods["flood-off"]
        # The reference is what the other two are judged against: B must really have run
        # at its quota there (FLOOD_QUOTA of 100 ms, 10% of CPU 0). Under emulation a
        # late period timer grants fewer periods than the window holds, so below that is
        # allowed down to half; above it, the quota did not hold.
        b_share = floods["flood-ref"]["b_share"]
        print(f"flood reference: B used {b_share*100:.1f}% of CPU 0 on a quota of {FLOOD_QUOTA_SHARE*100:.0f}%")
        if not 0.5 * FLOOD_QUOTA_SHARE <= b_share <= 1.1 * FLOOD_QUOTA_SHARE:
            failures.append(f"flood reference: B used {b_share*100:.1f}% of CPU 0 on a quota of {FLOOD_QUOTA_SHARE*100:.0f}% "
                            "(want 50-110% of it): the reference is not B at its quota")
        # As in the stream scenario, the harm without early drop must be at least twice
        # what early drop is allowed to leave, here with a tighter tolerance (3 points;
        # measured 0.1-1.1): the flood's cost, and so A's loss, depends on how fast the
        # sender on CPU 1 runs under this machine's emulation (8.6-14.9 points seen).
        if ref_share - off["a_share"] <= 0.06:
            failures.append(f"flood without early drop: A got {off['a_share']*100:.1f}% of CPU 0, not more than 6 points below "
                            f"the flood reference {ref_share*100:.1f}%: the flood harms nobody here, so early drop proves nothing")
        d = drops(off)
        # DOVE reports no early drop for B at all (it is off), and the kernel failed no
        # sends beyond the veth's own drops.
        if not d or d.get("sndbuf") is None or d.get("vethdrop") is None or d["sndbuf"] - d["vethdrop"] > 10:
            failures.append(f"flood without early drop: the kernel failed {d.get('sndbuf')} sends beyond the veth's own drops "
                            f"({d.get('vethdrop')}): something dropped")
        if d.get("dropped") not in (None, 0):
            failures.append(f"flood without early drop: DOVE reports {d['dropped']} early drops with early drop off")
        if abs(on["a_share"] - ref_share) > 0.03:
            failures.append(f"flood with early drop: A got {on['a_share']*100:.1f}% of CPU 0: want within 3 points of the flood reference {ref_share*100:.1f}%")
    d = drops(on)
    if not d or None in (d.get("dropped"), d.get("sndbuf"), d.get("vethdrop")) or d["dropped"] <= 0:
        failures.append(f"flood with early drop: nothing dropped ({d or 'no DROPS line'})")
    elif min(abs(d["dropped"] - d["sndbuf"]), abs(d["dropped"] - (d["sndbuf"] - d["vethdrop"]))) > 0.02 * d["sndbuf"] + 10:
        failures.append(f"flood with early drop: DOVE counted {d['dropped']} drops, the kernel {d['sndbuf']} failed sends "
                        f"({d['vethdrop']} of them the veth's own): want within 2%")
    if not re.search(r'dove_early_drop_packets_total\{[^}]*container_id="dove-b"[^}]*\} [1-9]', on.get("metrics", "")):
        failures.append(f"flood with early drop: /metrics exports no drops for dove-b: {on.get('metrics', '(no METRICS line)')}")
# cpumax's ledger (in the cpumax run, the stream still flowing): someone else's change is
# adopted, and after a kill -9 the next doved restores the base before it serves, also
# when B was unregistered while no doved ran.
q = lambda kv, k: int(kv.get(k)) if re.fullmatch(r"\d+", kv.get(k) or "") else 0
adopt, kill9, gone = restores.get("adopt", {}), restores.get("kill9", {}), restores.get("unregistered", {})
print(f"cpumax ledger: adopted base {q(adopt, 'base_us')} us (quota then {q(adopt, 'quota_us')}, "
      f"{q(adopt, 'settled_ms') / 1000:.1f} s after the change"
      f"{', written twice: doved overwrote the first write' if q(adopt, 'retried') else ''}); kill -9 at "
      f"{q(kill9, 'left_us')} us -> {q(kill9, 'served_us')} us when the next doved serves; unregistered while down at "
      f"{q(gone, 'left_us')} us -> {q(gone, 'served_us')} us, {q(gone, 'later_us')} us a second later")
# The stream paused after the change: a controller that kept the old base would settle at it
# (the guest waits up to 15 s for the quota to reach the new base).
if q(adopt, "base_us") != 50000 or q(adopt, "quota_us") != 50000:
    failures.append(f"cpumax: an external change to 50 ms while lowered was not adopted as the base: {adopt or 'no RESTORE line'}")
if not 0 < q(kill9, "left_us") < QUOTA_US or q(kill9, "served_us") != QUOTA_US or q(kill9, "restored_logged") < 1:
    failures.append(f"cpumax: after kill -9 while lowered, the next doved did not restore the base before serving: {kill9 or 'no RESTORE line'}")
if (not 0 < q(gone, "left_us") < QUOTA_US or q(gone, "served_us") != QUOTA_US or q(gone, "later_us") != QUOTA_US
        or "dove-b" in gone.get("registered", "") or gone.get("hook_exit") != "0"):
    failures.append(f"cpumax: B unregistered while doved was down: base not restored, or B still enforced: {gone or 'no RESTORE line'}")
for f in failures:
    print("vm: FAIL:", f)
print("vm:", "1 passed, 0 failed" if not failures else "0 passed, 1 failed")
sys.exit(1 if failures else 0)
