//! The eBPF observer on the running kernel: network namespaces joined by veth stand in
//! for containers' networks, cgroups under the unified hierarchy for their cgroups,
//! registered through the real socket protocol. Bounded traffic only. Every test measures
//! host-wide softirq time, so they run one at a time ([`serial`]).

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use dove_proto::Stats;
use dove_tests::*;

#[test]
fn one_owner_is_billed_the_softirq_time_of_its_packets() {
    if !require_root("one_owner_is_billed_the_softirq_time_of_its_packets") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-owner").unwrap();
    daemon.register(&ctr, "owner");
    let udp = format!("{}:5001", net.addr_b);
    let tcp = format!("{}:5002", net.addr_b);
    let udp_sink = net
        .spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "20"], true)
        .unwrap();
    let tcp_sink = net
        .spawn(&net.b, Some(&ctr), &["tcp-sink", &tcp, "20"], true)
        .unwrap();

    let before = settled(&daemon);
    let trace = PacketTrace::start_every_cpu().unwrap();
    finish(
        net.spawn(&net.a, None, &["udp-send", &udp, "20000", "64"], false)
            .unwrap(),
    )
    .unwrap();
    finish(
        net.spawn(&net.a, None, &["tcp-send", &tcp, "30000000"], false)
            .unwrap(),
    )
    .unwrap();
    let received = finish(udp_sink).unwrap();
    let bytes = finish(tcp_sink).unwrap();
    let spans = trace.stop_by_device().unwrap();
    let after = settled(&daemon);

    let (owner_before, owner_after) = (cost(&before, "owner"), cost(&after, "owner"));
    // Receive time only: the owner's transmit callbacks (a delayed-ACK timer) run in
    // TIMER or HRTIMER windows, which this trace does not follow.
    let owner = owner_after.rx_ns - owner_before.rx_ns;
    let owner_rx_packets = owner_after.rx_packets - owner_before.rx_packets;
    let unattributed = after.unattributed.total_ns - before.unattributed.total_ns;
    let traced = spans.total_ns();
    // The owner's packets are those that arrived in its namespace. The sender's (TCP's
    // acknowledgements), and whatever else the host received meanwhile, are not its:
    // their share of the whole varies with scheduling and the host, not with DOVE.
    let (owner_packets, owner_traced) = spans.of_with_prelude(net.dev_b.as_str());
    let (sender_packets, sender_traced) = spans.of_with_prelude(net.dev_a.as_str());
    let not_owners = traced - owner_traced;
    let share = owner as f64 / owner_traced as f64;
    eprintln!(
        "udp datagrams {received}, tcp bytes {bytes}; ftrace NET softirq {:.2} ms: the owner's {owner_packets} packets {:.2} ms, the sender's {sender_packets} {:.2} ms, the rest (other devices, windows without a packet) {:.2} ms, {} packets outside a window; DOVE: owner {owner_rx_packets} packets {:.2} ms ({:.1}% of its packets' time), unattributed {:.2} ms",
        ms(traced),
        ms(owner_traced),
        ms(sender_traced),
        ms(not_owners - sender_traced),
        spans.outside,
        ms(owner),
        share * 100.0,
        ms(unattributed)
    );
    assert!(received > 10_000 && bytes == 30_000_000, "traffic arrived");
    assert!(
        owner_packets >= received && spans.outside == 0,
        "ftrace saw {owner_packets} packets arrive on {} in NET_RX windows and {} outside one",
        net.dev_b,
        spans.outside
    );
    // Packet by packet: a sender's acknowledgement billed to the owner shows here even
    // where its time is too little to show in the share.
    assert!(
        owner_rx_packets.abs_diff(owner_packets) * 100 <= owner_packets,
        "DOVE billed the owner {owner_rx_packets} packets; {owner_packets} arrived on {}",
        net.dev_b
    );
    assert!(
        (0.90..=1.10).contains(&share),
        "the owner was billed {:.2} ms for packets ftrace saw take {:.2} ms ({:.1}%)",
        ms(owner),
        ms(owner_traced),
        share * 100.0
    );
    assert!(
        unattributed as f64 >= 0.8 * not_owners as f64,
        "unattributed {:.2} ms; ftrace saw {:.2} ms of time not the owner's",
        ms(unattributed),
        ms(not_owners)
    );
    // The two measures agree on the whole: DOVE's owner + unattributed ≈ ftrace.
    let dove_total = (owner_after.total_ns - owner_before.total_ns + unattributed) as f64;
    assert!(
        (dove_total / traced as f64 - 1.0).abs() < 0.15,
        "DOVE total {:.2} ms vs ftrace {:.2} ms",
        dove_total / 1e6,
        ms(traced)
    );
    let c = owner_after;
    // Nothing consumes pending in mode none: it must not accrue, or an enforcer started
    // later would throttle the container for this old cost.
    assert_eq!(c.pending_ns, 0, "pending accrued with no enforcer: {c:?}");
}

#[test]
fn two_owners_split_three_to_one() {
    if !require_root("two_owners_split_three_to_one") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let big = TestCgroup::new("dove-test-big").unwrap();
    let small = TestCgroup::new("dove-test-small").unwrap();
    daemon.register(&big, "big");
    daemon.register(&small, "small");
    let (to_big, to_small) = (
        format!("{}:5101", net.addr_b),
        format!("{}:5102", net.addr_b),
    );
    // 8 MiB buffers, serving until killed: nothing is dropped, so sent = delivered.
    let sinks = [(&big, &to_big), (&small, &to_small)].map(|(ctr, to)| {
        KillOnDrop(
            net.spawn(&net.b, Some(ctr), &["udp-sink", to, "120", "0"], true)
                .unwrap(),
        )
    });
    // On veth the receive softirq runs on the sender's CPU: pin it, trace that CPU.
    let cpu = allowed_cpus()[0];
    let send = |rounds: u64| {
        finish(
            net.spawn_on(
                Some(cpu),
                &net.a,
                None,
                &[
                    "udp-send-mix",
                    &rounds.to_string(),
                    &format!("{to_big}:3:64"),
                    &format!("{to_small}:1:72"),
                ],
                false,
            )
            .unwrap(),
        )
        .unwrap()
    };
    // Warm both paths (neighbour resolution, cold sockets) outside the measurement.
    send(100);
    let before = settled(&daemon);
    let trace = PacketTrace::start(cpu).unwrap();
    // Three datagrams to one, then one to the other, in turn, from one sender: whenever
    // softirq work is deferred, windows hold both owners' packets.
    send(10_000);
    let spans = trace.stop().unwrap();
    let after = settled(&daemon);
    assert_eq!(udp_drops(&net.b), 0, "datagrams dropped at the sinks");
    drop(sinks);
    let b = cost(&after, "big").total_ns - cost(&before, "big").total_ns;
    let s = cost(&after, "small").total_ns - cost(&before, "small").total_ns;
    let ratio = b as f64 / s as f64;
    // The kernel's own view: each datagram's span by its length (64 + 28, 72 + 28), with
    // the start of each window it opened. A datagram after three others costs a little
    // more than they do (its sink was asleep and is woken), so the true split is not
    // exactly the delivered 3:1. When the softirq keeps up, every datagram has a window of
    // its own and the window's start is a fifth of the cost (13 of 68 ms on one machine):
    // without it the kernel's split read 1.5 where DOVE's, rightly, read 1.8.
    let ((nb, tb), (ns, ts)) = (spans.of_with_prelude(&92), spans.of_with_prelude(&100));
    let traced = tb as f64 / ts as f64;
    eprintln!(
        "delivered 30000:10000; ftrace saw {nb}:{ns} in {} windows ({} owner changes inside one) taking {:.2} ms : {:.2} ms = {traced:.2}; DOVE attributed {:.2} ms : {:.2} ms = {ratio:.2}",
        spans.windows,
        spans.handovers,
        ms(tb),
        ms(ts),
        ms(b),
        ms(s)
    );
    assert_eq!(
        (nb, ns),
        (30_000, 10_000),
        "ftrace saw every datagram begin"
    );
    // The judge is the kernel's own split, which on one CI machine was 2.07 and 1.8 on
    // another; on a cold CI run, with a kernel build beside it, the small owner's
    // datagrams (each waking its sink) cost 8x the big one's and the split read 0.38.
    // Either way it must be clearly uneven for the test to tell a right split from an
    // even one (1.0, more than 10% off from 1.3 and from 1/1.3), and DOVE's must match it.
    assert!(
        !(1.0 / 1.3..1.3).contains(&traced),
        "the kernel's split {traced:.2} is too even to judge DOVE's by"
    );
    assert!(
        (ratio / traced - 1.0).abs() <= 0.10,
        "split {ratio:.2}, the kernel's {traced:.2}"
    );
}

/// The pending contract, with this test in the scheduler's place (this kernel has no
/// DOVE patch): a consumer that wakes rarely, takes pending with an atomic exchange, keeps
/// at most a cap and gives the rest back, as `sched_dove_take` does at each CFS refill.
/// Whatever doved attributed must end up either taken or still pending, to the nanosecond.
#[test]
fn slow_capped_consumer_loses_no_cost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    if !require_root("slow_capped_consumer_loses_no_cost") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer_config("", "external").unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-consumer").unwrap();
    daemon.register(&ctr, "consumed");
    let costs = MappedCosts::open(
        &daemon
            .pin_dir
            .clone()
            .unwrap()
            .join(dove_ebpf_common::COST_MAP),
    );
    let slot = costs
        .slot_of(ctr.id())
        .expect("doved gave the container a slot in DOVE_COST");
    let pending = costs.field(
        slot,
        std::mem::offset_of!(dove_ebpf_common::GlobalCost, pending_ns),
    );

    let udp = format!("{}:5201", net.addr_b);
    let sink = net
        .spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "20"], true)
        .unwrap();
    let stop = AtomicBool::new(false);
    let (taken, rounds) = std::thread::scope(|s| {
        let consumer = s.spawn(|| {
            // Slower than doved's 50 ms tick and capped well below what arrives per round,
            // so pending carries over from round to round, as on a slow period timer.
            let (mut taken, mut rounds) = (0u64, 0u32);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(170));
                let all = pending.swap(0, Ordering::SeqCst);
                let take = all.min(2_000_000);
                pending.fetch_add(all - take, Ordering::SeqCst);
                taken += take;
                rounds += 1;
            }
            (taken, rounds)
        });
        finish(
            net.spawn(&net.a, None, &["udp-send", &udp, "100000", "64"], false)
                .unwrap(),
        )
        .unwrap();
        finish(sink).unwrap();
        settled(&daemon);
        stop.store(true, Ordering::Relaxed);
        consumer.join().unwrap()
    });
    // Both written by doved at its last flush; nothing consumes any more.
    let after = settled(&daemon);
    let c = cost(&after, "consumed");
    eprintln!(
        "consumer took {:.2} ms in {rounds} rounds; pending {:.2} ms; attributed {:.2} ms",
        ms(taken),
        ms(c.pending_ns),
        ms(c.total_ns)
    );
    assert!(
        taken > 0 && c.pending_ns > 0,
        "the cap made pending carry over: {c:?}"
    );
    assert_eq!(
        taken + c.pending_ns,
        c.total_ns,
        "attributed cost was neither taken nor left pending"
    );
}

/// doved's `DOVE_COST` array, mapped from its pin as the patched scheduler sees it.
struct MappedCosts {
    base: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
    _map: aya::maps::MapData,
}

impl MappedCosts {
    fn open(pin: &std::path::Path) -> Self {
        use std::os::fd::AsFd;
        let map = aya::maps::MapData::from_pin(pin).unwrap();
        let len = dove_ebpf_common::SLOTS as usize * size_of::<dove_ebpf_common::GlobalCost>();
        // SAFETY: a shared mapping of an mmapable BPF array of `len` bytes.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .unwrap();
        Self {
            base,
            len,
            _map: map,
        }
    }

    fn entry(&self, slot: usize) -> *mut dove_ebpf_common::GlobalCost {
        assert!((slot + 1) * size_of::<dove_ebpf_common::GlobalCost>() <= self.len);
        // SAFETY: in bounds of the mapping.
        unsafe {
            self.base
                .as_ptr()
                .cast::<dove_ebpf_common::GlobalCost>()
                .add(slot)
        }
    }

    /// The slot of `cgroup_id`, waiting up to 5 s for it: the accounting thread hands out
    /// slots after a registration is acknowledged (registration never waits for it).
    fn slot_of(&self, cgroup_id: u64) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = (1..dove_ebpf_common::SLOTS as usize).find(|&slot| {
                // SAFETY: in bounds; doved writes the field before the slot is used.
                unsafe {
                    std::ptr::read_volatile(&raw const (*self.entry(slot)).cgroup_id) == cgroup_id
                }
            });
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A u64 field of an entry, shared with doved through atomics.
    fn field(&self, slot: usize, offset: usize) -> &AtomicU64 {
        // SAFETY: an 8-byte aligned u64 inside the mapping, which lives as long as `self`.
        unsafe { AtomicU64::from_ptr(self.entry(slot).cast::<u8>().add(offset).cast()) }
    }
}

impl Drop for MappedCosts {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped.
        let _ = unsafe { nix::sys::mman::munmap(self.base, self.len) };
    }
}

#[test]
fn receive_only_udp_ipv6_tcp_nested_cgroups_and_unregistered_traffic() {
    if !require_root("receive_only_udp_ipv6_tcp_nested_cgroups_and_unregistered_traffic") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-v6").unwrap();
    // The server runs in a cgroup nested inside the registered one.
    let nested = ctr.child("app/worker").unwrap();
    daemon.register(&ctr, "v6");
    let stranger = TestCgroup::new("dove-test-unregistered").unwrap();

    let tcp6 = format!("[{}]:5201", net.addr6_b);
    let udp = format!("{}:5202", net.addr_b);
    let stranger_udp = format!("{}:5203", net.addr_b);
    let tcp_sink = net
        .spawn(&net.b, Some(&nested), &["tcp-sink", &tcp6, "20"], true)
        .unwrap();
    let udp_sink = net
        .spawn(&net.b, Some(&nested), &["udp-sink", &udp, "20"], true)
        .unwrap();
    let stranger_sink = net
        .spawn(
            &net.b,
            Some(&stranger),
            &["udp-sink", &stranger_udp, "20"],
            true,
        )
        .unwrap();
    let before = settled(&daemon);
    finish(
        net.spawn(&net.a, None, &["tcp-send", &tcp6, "10000000"], false)
            .unwrap(),
    )
    .unwrap();
    finish(
        net.spawn(&net.a, None, &["udp-send", &udp, "5000", "64"], false)
            .unwrap(),
    )
    .unwrap();
    let mid = settled(&daemon);
    finish(
        net.spawn(
            &net.a,
            None,
            &["udp-send", &stranger_udp, "5000", "64"],
            false,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(finish(tcp_sink).unwrap(), 10_000_000);
    let received = finish(udp_sink).unwrap();
    let stranger_received = finish(stranger_sink).unwrap();
    let after = settled(&daemon);

    let during_own = cost(&mid, "v6").rx_packets - cost(&before, "v6").rx_packets;
    // 10 MB of TCP over veth arrives as GRO-merged segments: a few hundred skbs.
    assert!(
        during_own >= received + 100,
        "IPv6 TCP segments and UDP datagrams to a nested cgroup counted: {during_own}"
    );
    assert!(cost(&mid, "v6").rx_ns > cost(&before, "v6").rx_ns);
    // The unregistered cgroup's traffic is charged to no container.
    let own_during_stranger = cost(&after, "v6").total_ns - cost(&mid, "v6").total_ns;
    let unattributed = after.unattributed.total_ns - mid.unattributed.total_ns;
    eprintln!(
        "v6/nested packets {during_own}; unregistered datagrams {stranger_received}: unattributed {:.2} ms, registered container {:.3} ms",
        ms(unattributed), ms(own_during_stranger)
    );
    assert!(stranger_received > 1000);
    assert!(
        unattributed > 20 * own_during_stranger.max(1),
        "unregistered traffic went to unattributed"
    );
}

#[test]
fn restart_mid_traffic_keeps_counters_and_never_double_attaches() {
    if !require_root("restart_mid_traffic_keeps_counters_and_never_double_attaches") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-restart").unwrap();
    daemon.register(&ctr, "steady");
    let udp = format!("{}:5301", net.addr_b);
    let sink = net
        .spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "30"], true)
        .unwrap();
    let sender = net
        .spawn(&net.a, None, &["udp-send", &udp, "60000", "64"], false)
        .unwrap();

    let mut seen = Vec::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        seen.push(cost(&daemon.stats(), "steady").total_ns);
        daemon.kill9();
        daemon.spawn().unwrap();
        let s = daemon.stats();
        seen.push(cost(&s, "steady").total_ns);
        assert_eq!(
            s.health.programs_attached,
            14,
            "round {round}: {s:?}\n{}",
            daemon.log_text()
        );
        let here = attached_dove_programs(&daemon, &ctr.dir);
        let at_root = attached_dove_programs(&daemon, &unified_mount());
        assert_eq!(
            (here, at_root),
            (2, 0),
            "round {round}: cgroup_skb programs at the container's cgroup and at the root"
        );
    }
    finish(sender).unwrap();
    finish(sink).unwrap();
    seen.push(cost(&settled(&daemon), "steady").total_ns);
    eprintln!("total_ns across three kill -9 restarts: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0]),
        "counters went backwards: {seen:?}"
    );
    assert!(seen.last().unwrap() > seen.first().unwrap());
}

/// The socket programs run only for registered cgroups' sockets: attached at each
/// registered cgroup with no registered ancestor (a program runs for its cgroup's
/// descendants too, so attaching at both would run it twice per packet), handed down to
/// the registered descendants when that cgroup goes, and never run for a socket of an
/// unregistered cgroup.
#[test]
fn socket_programs_run_only_in_registered_cgroups() {
    if !require_root("socket_programs_run_only_in_registered_cgroups") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let outer = TestCgroup::new("dove-test-outer").unwrap();
    let inner = outer.child("inner").unwrap();
    let stranger = TestCgroup::new("dove-test-stranger").unwrap();
    // (attached at outer, at inner, running for inner's sockets, running for stranger's)
    let placement = || {
        (
            attached_dove_programs(&daemon, &outer.dir),
            attached_dove_programs(&daemon, &inner.dir),
            effective_dove_programs(&daemon, &inner.dir),
            effective_dove_programs(&daemon, &stranger.dir),
        )
    };
    let wait_for = |want: (usize, usize, usize, usize), step: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut now = placement();
        while now != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = placement();
        }
        assert_eq!(
            now,
            want,
            "{step}: (at outer, at inner, effective at inner, effective at stranger)\n{}",
            daemon.log_text()
        );
    };
    wait_for((0, 0, 0, 0), "nothing registered");
    daemon.register(&inner, "inner");
    wait_for((0, 2, 2, 0), "inner registered");
    daemon.register(&outer, "outer");
    wait_for((2, 0, 2, 0), "outer registered over it");
    // A cgroup registered below an attached one runs its ancestor's programs, once.
    let late = outer.child("late").unwrap();
    daemon.register(&late, "late");
    settled(&daemon);
    assert_eq!(
        (
            attached_dove_programs(&daemon, &late.dir),
            effective_dove_programs(&daemon, &late.dir)
        ),
        (0, 2),
        "registered below a registered cgroup: (attached, effective)"
    );
    assert_eq!(daemon.stats().health.hooked_cgroups, 1);

    // Datagrams to an unregistered cgroup's socket meet no socket program.
    let addr = format!("{}:5311", net.addr_b);
    let sink = net
        .spawn(&net.b, Some(&stranger), &["udp-sink", &addr, "20"], true)
        .unwrap();
    let before = settled(&daemon).health;
    finish(
        net.spawn(&net.a, None, &["udp-send", &addr, "3000", "64"], false)
            .unwrap(),
    )
    .unwrap();
    let received = finish(sink).unwrap();
    let after = settled(&daemon).health;
    let hooked = (after.packets_in_window + after.packets_outside_window)
        - (before.packets_in_window + before.packets_outside_window);
    let started = after.packets_started - before.packets_started;
    eprintln!("unregistered: {received} datagrams, {started} packets started, {hooked} socket program runs");
    assert!(received > 1000, "only {received} datagrams arrived");
    assert!(started >= received, "the tracepoints saw {started} packets");
    assert_eq!(hooked, 0, "socket programs ran for unregistered traffic");

    daemon.unregister("outer", None);
    wait_for((0, 2, 2, 0), "outer unregistered, inner inherits");
    assert_eq!(attached_dove_programs(&daemon, &late.dir), 2);
    inner.remove().unwrap();
    wait_for((0, 0, 0, 0), "inner's cgroup removed");
}

/// Pending cost is what an enforcer deducts from a quota: it accrues only while one
/// consumes it, and an enforcer that starts never inherits cost from a time when nobody
/// was enforcing (it would throttle a container for hours of old traffic at once).
#[test]
fn pending_starts_from_zero_when_an_enforcer_starts() {
    use std::sync::atomic::Ordering;
    if !require_root("pending_starts_from_zero_when_an_enforcer_starts") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-pending").unwrap();
    daemon.register(&ctr, "billed");
    let udp = format!("{}:5471", net.addr_b);
    let _sink = KillOnDrop(
        net.spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "60", "0"], true)
            .unwrap(),
    );
    let traffic = || {
        finish(
            net.spawn(&net.a, None, &["udp-send", &udp, "3000", "64"], false)
                .unwrap(),
        )
        .unwrap();
    };
    let pending_offset = std::mem::offset_of!(dove_ebpf_common::GlobalCost, pending_ns);
    let set_mode = |daemon: &TempDaemon, mode: &str| {
        let text = std::fs::read_to_string(&daemon.config).unwrap();
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("mode = ") {
                    format!("mode = \"{mode}\"")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&daemon.config, text).unwrap();
    };

    // Measuring only: the bill grows, pending does not.
    traffic();
    let measured = cost(&settled(&daemon), "billed");
    assert!(measured.total_ns > 0);
    assert_eq!(measured.pending_ns, 0, "pending accrued in mode none");

    // Pins left by a doved that accrued with nobody consuming (an older build): 5 s.
    daemon.kill9();
    let cost_pin = daemon
        .pin_dir
        .clone()
        .unwrap()
        .join(dove_ebpf_common::COST_MAP);
    {
        let costs = MappedCosts::open(&cost_pin);
        let slot = costs.slot_of(ctr.id()).expect("the container's slot");
        costs
            .field(slot, pending_offset)
            .store(5_000_000_000, Ordering::SeqCst);
    }
    set_mode(&daemon, "external");
    daemon.spawn().unwrap();
    let started = cost(&settled(&daemon), "billed");
    assert_eq!(
        started.pending_ns, 0,
        "an enforcer that starts inherits no pending cost: {started:?}"
    );
    assert!(started.total_ns >= measured.total_ns, "the bill is kept");

    // Enforcing: new cost accrues, and a restart of the same enforcing doved keeps it.
    traffic();
    let enforcing = cost(&settled(&daemon), "billed");
    assert_eq!(
        enforcing.pending_ns,
        enforcing.total_ns - started.total_ns,
        "pending is exactly the cost since the enforcer started"
    );
    daemon.kill9();
    daemon.spawn().unwrap();
    let restarted = cost(&settled(&daemon), "billed");
    assert_eq!(
        restarted.pending_ns, enforcing.pending_ns,
        "an enforcing doved's restart keeps what its enforcer has not taken"
    );

    // Back to measuring only: nobody will consume pending any more.
    daemon.kill9();
    set_mode(&daemon, "none");
    daemon.spawn().unwrap();
    traffic();
    let measuring = cost(&settled(&daemon), "billed");
    assert_eq!(measuring.pending_ns, 0, "{measuring:?}");
    eprintln!(
        "bill {:.2} ms -> {:.2} ms; pending 0 -> 0 (5 s planted) -> {:.2} ms -> {:.2} ms -> 0",
        ms(measured.total_ns),
        ms(measuring.total_ns),
        ms(enforcing.pending_ns),
        ms(restarted.pending_ns)
    );
}

/// Containers under one CFS quota (a Kubernetes pod's) fold their cost into one slot's
/// pending counter, the one the enforcer reads for the group. When the container whose
/// slot holds that role goes, the role passes to another member, with the cost the
/// enforcer has not taken yet.
#[test]
fn a_quota_groups_pending_cost_moves_with_its_slot() {
    use std::sync::atomic::Ordering;
    if !require_root("a_quota_groups_pending_cost_moves_with_its_slot") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer_config("", "external").unwrap();
    let net = NetPair::new().unwrap();
    let pod = TestCgroup::new("dove-test-pod").unwrap();
    let (first, second) = (pod.child("first").unwrap(), pod.child("second").unwrap());
    // The pod's quota, in the cpu hierarchy (v1 on this host) at the same path.
    // The containers' own cpu cgroups exist too (runtimes make the path in every v1
    // hierarchy), without a quota of their own.
    struct CpuGroup(std::path::PathBuf);
    impl Drop for CpuGroup {
        fn drop(&mut self) {
            for child in ["first", "second"] {
                let _ = std::fs::remove_dir(self.0.join(child));
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let quota =
        CpuGroup(std::path::Path::new("/sys/fs/cgroup/cpu").join(pod.path.trim_start_matches('/')));
    std::fs::create_dir(&quota.0).unwrap();
    std::fs::write(quota.0.join("cpu.cfs_quota_us"), "100000").unwrap();
    for child in ["first", "second"] {
        std::fs::create_dir(quota.0.join(child)).unwrap();
    }
    daemon.register(&first, "first");
    daemon.register(&second, "second");
    let costs = MappedCosts::open(
        &daemon
            .pin_dir
            .clone()
            .unwrap()
            .join(dove_ebpf_common::COST_MAP),
    );
    let (first_slot, second_slot) = (
        costs.slot_of(first.id()).unwrap(),
        costs.slot_of(second.id()).unwrap(),
    );
    let pending_offset = std::mem::offset_of!(dove_ebpf_common::GlobalCost, pending_ns);
    let pending = |slot| costs.field(slot, pending_offset).load(Ordering::SeqCst);
    for (ctr, port) in [(&first, 5481), (&second, 5482)] {
        let udp = format!("{}:{port}", net.addr_b);
        let sink = net
            .spawn(&net.b, Some(ctr), &["udp-sink", &udp, "20"], true)
            .unwrap();
        finish(
            net.spawn(&net.a, None, &["udp-send", &udp, "2000", "64"], false)
                .unwrap(),
        )
        .unwrap();
        finish(sink).unwrap();
    }
    let before = settled(&daemon);
    let group_pending = pending(first_slot);
    assert_eq!(
        pending(second_slot),
        0,
        "the second member folds into the first's slot"
    );
    assert_eq!(
        group_pending,
        cost(&before, "first").total_ns + cost(&before, "second").total_ns,
        "the group's slot holds both members' cost"
    );
    daemon.unregister("first", None);
    let after = settled(&daemon);
    let moved = pending(second_slot);
    eprintln!(
        "group pending {:.2} ms in the first's slot; after it left, {:.2} ms in the second's",
        ms(group_pending),
        ms(moved)
    );
    assert_eq!(
        moved,
        cost(&after, "second").total_ns + (group_pending - cost(&before, "second").total_ns),
        "the heir's slot carries the group's unconsumed cost"
    );
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Everything the pinned cost map holds, all slots (unattributed included).
fn pinned_total_ns(daemon: &TempDaemon) -> u64 {
    use aya::maps::{Array, Map, MapData};
    let path = daemon.pin_dir.as_ref().unwrap().join("DOVE_COST");
    let map = Map::Array(MapData::from_pin(&path).unwrap());
    let cost: Array<_, dove_ebpf_common::GlobalCost> = Array::try_from(map).unwrap();
    cost.iter().filter_map(Result::ok).map(|c| c.total_ns).sum()
}

/// A window open on some CPU when doved is killed stays open in the pinned state: the next
/// doved must never close it against that old mark (a charge of the whole downtime).
#[test]
fn a_window_open_when_doved_died_is_charged_to_nobody() {
    if !require_root("a_window_open_when_doved_died_is_charged_to_nobody") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-stale").unwrap();
    daemon.register(&ctr, "flooded");
    let udp = format!("{}:5451", net.addr_b);
    let _sink = KillOnDrop(
        net.spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "60", "0"], true)
            .unwrap(),
    );
    // The sender is the container too: its transmits run the egress program in process
    // context, where only a (stale) open window would make them chargeable.
    let _flood = KillOnDrop(
        net.spawn(&net.a, Some(&ctr), &["udp-flood", &udp, "30", "64"], false)
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill9();
    std::thread::sleep(Duration::from_secs(10));
    // Whatever the kill left, make it the worst case: every CPU inside a NET_RX window
    // opened when doved died, 10 s ago.
    {
        use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
        use dove_ebpf_common::{WindowState, NET_RX_SOFTIRQ, NO_PACKET};
        let path = daemon.pin_dir.as_ref().unwrap().join("DOVE_WINDOW");
        let map = Map::PerCpuArray(MapData::from_pin(&path).unwrap());
        let mut windows: PerCpuArray<_, WindowState> = PerCpuArray::try_from(map).unwrap();
        let stale_mark = monotonic_ns() - 10_000_000_000;
        let values: Vec<WindowState> = windows
            .get(&0, 0)
            .unwrap()
            .iter()
            .map(|w| WindowState {
                active: NET_RX_SOFTIRQ + 1,
                mark_ns: stale_mark,
                packet_slot: NO_PACKET,
                stale_windows: 0,
                dropped_stretches: 0,
                ..*w
            })
            .collect();
        windows
            .set(0, PerCpuValues::try_from(values).unwrap(), 0)
            .unwrap();
    }
    let before = pinned_total_ns(&daemon);
    let trace = SoftirqTrace::start().unwrap();
    daemon.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = settled(&daemon);
    let traced = trace.stop().unwrap();
    let dove: u64 = after
        .containers
        .iter()
        .map(|c| c.cost.total_ns)
        .sum::<u64>()
        + after.unattributed.total_ns;
    let charged = dove.saturating_sub(before);
    eprintln!(
        "after the restart: DOVE charged {:.2} ms, ftrace NET softirq {:.2} ms; stale windows {}, dropped stretches {}",
        ms(charged),
        ms(traced),
        after.health.stale_windows,
        after.health.dropped_stretches
    );
    // The flood's softirq since the restart, plus what the last tick before the kill had
    // not yet flushed (at most a tick of it).
    assert!(
        charged as f64 <= 1.2 * traced as f64 + 100e6,
        "DOVE charged {:.2} ms after the restart; the kernel ran {:.2} ms of NET softirq",
        ms(charged),
        ms(traced)
    );
    assert!(charged > 0, "the flood was not measured after the restart");
    // The restart closed the windows before attaching: the programs never met one that
    // was open (with the reset removed, each CPU's first softirq finds its planted
    // window open and counts it stale). Dropped stretches are only printed: a vCPU
    // the hypervisor stops for 50 ms inside a window makes one (one CI run had one, with
    // the charge bound above holding).
    assert_eq!(
        after.health.stale_windows, 0,
        "a window the previous doved left open reached the programs"
    );
}

/// An upgrade that changes a shared type finds pins of the old size: doved replaces those
/// (the verifier would refuse the programs against them) and keeps the ones that fit,
/// bills included.
#[test]
fn restart_over_pins_of_another_layout_keeps_the_bills() {
    if !require_root("restart_over_pins_of_another_layout_keeps_the_bills") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-upgrade").unwrap();
    daemon.register(&ctr, "kept");
    let udp = format!("{}:5401", net.addr_b);
    let sink = net
        .spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "20"], true)
        .unwrap();
    finish(
        net.spawn(&net.a, None, &["udp-send", &udp, "3000", "64"], false)
            .unwrap(),
    )
    .unwrap();
    finish(sink).unwrap();
    let before = cost(&settled(&daemon), "kept").total_ns;
    assert!(before > 0);

    daemon.kill9();
    // The window state as an older build laid it out: 56 bytes.
    let window = daemon.pin_dir.clone().unwrap().join("DOVE_WINDOW");
    std::fs::remove_file(&window).unwrap();
    run(std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&window)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "56",
            "entries",
            "1",
            "name",
            "DOVE_WINDOW",
        ]))
    .unwrap();
    daemon.spawn().unwrap();
    let s = daemon.stats();
    assert_eq!(s.observer, "active", "{}", daemon.log_text());
    assert_eq!(s.health.programs_attached, 14, "{}", daemon.log_text());
    assert!(
        cost(&s, "kept").total_ns >= before,
        "the bill survived the replaced window map"
    );
    assert!(daemon.log_text().contains("DOVE_WINDOW"));
}

/// `observer.max_containers` sizes the slot maps, and the programs index every CPU's row
/// with that capacity: traffic whose softirq runs on the last CPU lands in the right
/// slot. A restart with another setting keeps the pinned size (the counters in it are
/// bills) and says so; registering beyond the capacity names the setting to raise.
#[test]
fn the_slot_capacity_follows_max_containers_on_every_cpu() {
    if !require_root("the_slot_capacity_follows_max_containers_on_every_cpu") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer_settings("max_containers = 2").unwrap();
    let pin_dir = daemon.pin_dir.clone().unwrap();
    let entries = |name: &str| {
        aya::maps::MapInfo::from_pin(pin_dir.join(name))
            .unwrap()
            .max_entries()
    };
    let cpus = aya::util::nr_cpus().unwrap() as u32;
    assert_eq!(
        [
            "DOVE_COST",
            "DOVE_SLOTS",
            "DOVE_BASE",
            "DOVE_ENFORCE",
            "DOVE_PERCPU_COST"
        ]
        .map(entries),
        [3, 3, 3, 3, 3 * cpus]
    );
    assert_eq!(daemon.stats().health.slots_capacity, 2);

    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-capacity").unwrap();
    let other = TestCgroup::new("dove-test-capacity-other").unwrap();
    daemon.register(&other, "other");
    daemon.register(&ctr, "small");
    let udp = format!("{}:5421", net.addr_b);
    // A row length left at the compiled default shows only on a CPU past the first.
    let last_cpu = allowed_cpus().into_iter().max().unwrap();
    assert!(last_cpu > 0, "this test needs two CPUs it may run on");
    let flood = |daemon: &TempDaemon| {
        let before = cost(&settled(daemon), "small").rx_packets;
        let sink = net
            .spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "20"], true)
            .unwrap();
        // On veth the receive softirq runs on the sender's CPU.
        finish(
            net.spawn_on(
                Some(last_cpu),
                &net.a,
                None,
                &["udp-send", &udp, "3000", "64"],
                false,
            )
            .unwrap(),
        )
        .unwrap();
        finish(sink).unwrap();
        cost(&settled(daemon), "small").rx_packets - before
    };
    let billed = flood(&daemon);
    assert!(
        billed >= 2_500,
        "{billed} of 3,000 datagrams received on CPU {last_cpu} billed: {}",
        daemon.log_text()
    );

    let third = TestCgroup::new("dove-test-capacity-third").unwrap();
    daemon.register(&third, "third");
    let log_has = |daemon: &TempDaemon, text: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if daemon.log_text().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    assert!(
        log_has(&daemon, "raise observer.max_containers"),
        "{}",
        daemon.log_text()
    );

    let before = cost(&settled(&daemon), "small").total_ns;
    daemon.kill9();
    set_max_containers(&daemon, 2, 5);
    daemon.spawn().unwrap();
    assert!(log_has(&daemon, "hold 2 containers: keeping them"));
    assert_eq!(entries("DOVE_COST"), 3);
    assert!(cost(&settled(&daemon), "small").total_ns >= before);
    assert!(flood(&daemon) >= 2_500, "{}", daemon.log_text());

    // The cost map gone (an upgrade that changed its layout) while the setting changed
    // again: the size comes from the other pins, and the bill from the per-CPU rows.
    let before = cost(&settled(&daemon), "small").total_ns;
    daemon.kill9();
    std::fs::remove_file(pin_dir.join("DOVE_COST")).unwrap();
    set_max_containers(&daemon, 5, 7);
    daemon.spawn().unwrap();
    assert_eq!(
        ["DOVE_COST", "DOVE_BASE", "DOVE_PERCPU_COST"].map(entries),
        [3, 3, 3 * cpus],
        "{}",
        daemon.log_text()
    );
    assert!(cost(&settled(&daemon), "small").total_ns >= before);
}

/// Rewrite a stopped test daemon's `observer.max_containers` from `from` to `to`.
fn set_max_containers(daemon: &TempDaemon, from: u32, to: u32) {
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    let (old, new) = (
        format!("max_containers = {from}"),
        format!("max_containers = {to}"),
    );
    assert!(text.contains(&old), "{text}");
    std::fs::write(&daemon.config, text.replace(&old, &new)).unwrap();
}

/// An upgrade may change the layout of one cost map and not the other: doved creates that
/// one afresh and rebases on the one it kept, so a bill neither stalls nor jumps, and an
/// enforcer is never handed a container's whole history as pending.
#[test]
fn restart_over_one_cost_map_of_another_layout_keeps_bills_continuous() {
    if !require_root("restart_over_one_cost_map_of_another_layout_keeps_bills_continuous") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer_config("", "external").unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-rebase").unwrap();
    daemon.register(&ctr, "kept");
    let udp = format!("{}:5491", net.addr_b);
    let _sink = KillOnDrop(
        net.spawn(&net.b, Some(&ctr), &["udp-sink", &udp, "60", "0"], true)
            .unwrap(),
    );
    let traffic = |daemon: &TempDaemon| {
        finish(
            net.spawn(&net.a, None, &["udp-send", &udp, "3000", "64"], false)
                .unwrap(),
        )
        .unwrap();
        cost(&settled(daemon), "kept")
    };
    let mut last = traffic(&daemon);
    assert!(last.total_ns > 0 && last.pending_ns == last.total_ns);
    for (map, entries) in [("DOVE_PERCPU_COST", "8192"), ("DOVE_COST", "4096")] {
        daemon.kill9();
        let pin = daemon.pin_dir.clone().unwrap().join(map);
        std::fs::remove_file(&pin).unwrap();
        // The same map as an older build laid it out: 24-byte values.
        run(std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&pin)
            .args([
                "type", "array", "key", "4", "value", "24", "entries", entries, "name", map,
                "flags", "1024",
            ]))
        .unwrap();
        daemon.spawn().unwrap();
        let restarted = cost(&settled(&daemon), "kept");
        assert_eq!(
            (restarted.total_ns, restarted.rx_packets),
            (last.total_ns, last.rx_packets),
            "{map} replaced: the bill continues where it was\n{}",
            daemon.log_text()
        );
        let expected_pending = if map == "DOVE_COST" {
            0
        } else {
            last.pending_ns
        };
        assert_eq!(
            restarted.pending_ns, expected_pending,
            "{map} replaced: pending neither lost nor handed the container's history"
        );
        let more = traffic(&daemon);
        assert!(
            more.total_ns > restarted.total_ns && more.rx_packets >= restarted.rx_packets + 3000,
            "{map} replaced: billing goes on ({restarted:?} -> {more:?})"
        );
        assert_eq!(
            more.pending_ns - restarted.pending_ns,
            more.total_ns - restarted.total_ns,
            "{map} replaced: new cost accrues as pending"
        );
        eprintln!(
            "{map} replaced: bill {:.2} ms -> {:.2} ms -> {:.2} ms, pending {:.2} ms -> {:.2} ms",
            ms(last.total_ns),
            ms(restarted.total_ns),
            ms(more.total_ns),
            ms(restarted.pending_ns),
            ms(more.pending_ns)
        );
        last = more;
    }
}

/// `daemon`'s cgroup_skb programs attached at cgroup directory `at` (not inherited from
/// above), counted by bpftool. A DOVE installed on the host attaches programs of the same
/// names; this daemon's are the ones that use the window map pinned in its own directory.
fn attached_dove_programs(daemon: &TempDaemon, at: &std::path::Path) -> usize {
    dove_programs_at(daemon, at, false)
}

/// `daemon`'s cgroup_skb programs that run for sockets of cgroup `at`, wherever attached.
fn effective_dove_programs(daemon: &TempDaemon, at: &std::path::Path) -> usize {
    dove_programs_at(daemon, at, true)
}

fn dove_programs_at(daemon: &TempDaemon, at: &std::path::Path, effective: bool) -> usize {
    let json = |args: &[&std::ffi::OsStr]| -> serde_json::Value {
        // A program listed a moment ago may be gone (a daemon restarting): no answer.
        run(std::process::Command::new("bpftool").arg("-j").args(args))
            .ok()
            .and_then(|out| serde_json::from_str(out.trim()).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let window = daemon.pin_dir.as_ref().unwrap().join("DOVE_WINDOW");
    let window_id = json(&[
        "map".as_ref(),
        "show".as_ref(),
        "pinned".as_ref(),
        window.as_ref(),
    ])["id"]
        .as_u64()
        .expect("the test daemon pinned its window map");
    let mut show = vec!["cgroup".as_ref(), "show".as_ref(), at.as_os_str()];
    if effective {
        show.push("effective".as_ref());
    }
    json(&show)
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .filter(|id| {
            let id = id.to_string();
            json(&["prog".as_ref(), "show".as_ref(), "id".as_ref(), id.as_ref()])["map_ids"]
                .as_array()
                .is_some_and(|maps| maps.iter().any(|m| m.as_u64() == Some(window_id)))
        })
        .count()
}

#[test]
fn metrics_endpoint_is_valid_prometheus_text() {
    if !require_root("metrics_endpoint_is_valid_prometheus_text") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let ctr = TestCgroup::new("dove-test-metrics").unwrap();
    daemon.register(&ctr, "metrics-ctr");
    settled(&daemon);
    let body = daemon.scrape().unwrap();
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text");
    let names: std::collections::BTreeSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for want in [
        "dove_softirq_seconds_total",
        "dove_softirq_direction_seconds_total",
        "dove_unattributed_softirq_seconds_total",
        "dove_programs_attached",
        "dove_observer_up",
        "dove_cost_slots_used",
    ] {
        assert!(names.contains(want), "{want} missing from {names:?}");
    }
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == "dove_softirq_seconds_total")
        .unwrap();
    assert_eq!(sample.labels.get("cgroup"), Some(ctr.path.as_str()));
    assert_eq!(
        scrape
            .docs
            .get("dove_softirq_seconds_total")
            .map(String::as_str),
        Some("Softirq (NET_RX/NET_TX) CPU time spent on the container's network traffic.")
    );
    let up = scrape
        .samples
        .iter()
        .find(|s| s.metric == "dove_observer_up")
        .unwrap();
    assert!(matches!(up.value, prometheus_parse::Value::Gauge(v) if v == 1.0));
    // IRQ time accounting, against the kernel's own build configuration.
    let states: Vec<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "dove_irq_time_accounting")
        .filter(|s| matches!(s.value, prometheus_parse::Value::Gauge(v) if v == 1.0))
        .filter_map(|s| s.labels.get("state"))
        .collect();
    let release = run(std::process::Command::new("uname").arg("-r")).unwrap();
    let config = std::fs::read_to_string(format!("/boot/config-{}", release.trim()))
        .or_else(|_| run(std::process::Command::new("sh").args(["-c", "zcat /proc/config.gz"])));
    let allowed: &[&str] = match config.as_deref() {
        Ok(c) if c.contains("# CONFIG_IRQ_TIME_ACCOUNTING is not set") => &["not-built"],
        Ok(c) if c.contains("CONFIG_IRQ_TIME_ACCOUNTING=y") => &[
            "active",
            "unconfirmed",
            "disabled-at-boot",
            "disabled-tsc-unstable",
        ],
        _ => &[
            "active",
            "unconfirmed",
            "disabled-at-boot",
            "disabled-tsc-unstable",
            "not-built",
            "unknown",
        ],
    };
    assert!(
        states.len() == 1 && allowed.contains(&states[0]),
        "dove_irq_time_accounting says {states:?}; the kernel's config allows {allowed:?}"
    );
    let status = match daemon.client().call(dove_proto::Request::Status).unwrap() {
        dove_proto::Reply::Status(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(status.irq_time_accounting_state, states[0]);
}

#[test]
fn dovectl_stats_and_top() {
    if !require_root("dovectl_stats_and_top") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let ctr = TestCgroup::new("dove-test-ctl").unwrap();
    daemon.register(&ctr, "ctl");
    settled(&daemon);
    let dovectl = |args: &[&str]| {
        run(std::process::Command::new(bin("dovectl"))
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args))
        .unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&dovectl(&["stats", "--json"])).unwrap();
    assert_eq!(json["observer"], "active");
    assert_eq!(json["containers"][0]["id"], "ctl");
    assert_eq!(json["containers"][0]["cgroup_id"], ctr.id());
    for key in [
        "total_ns",
        "rx_ns",
        "tx_ns",
        "pending_ns",
        "rx_packets",
        "tx_packets",
    ] {
        assert!(json["containers"][0][key].is_u64(), "{key}");
    }
    assert_eq!(json["health"]["programs_attached"], 14);
    let top = dovectl(&["top", "--interval", "0.2", "--iterations", "2"]);
    assert!(
        top.contains("CONTAINER") && top.contains("ctl") && top.contains("(unattributed)"),
        "{top}"
    );
    let status = dovectl(&["status"]);
    assert!(status.contains("observer:      active"), "{status}");
    // This host's kernel has no DOVE scheduler patch: measuring only.
    if !std::path::Path::new("/proc/sys/kernel/sched_dove_slot_map").exists() {
        assert!(status.contains("enforcement:   none"), "{status}");
    }
}

/// The programs cache each CPU's last owner resolution; a registration or removal must
/// reach the very next packet of a cgroup whose traffic is already flowing.
#[test]
fn registration_changes_reach_flows_already_running() {
    if !require_root("registration_changes_reach_flows_already_running") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-late").unwrap();
    // Every sender (a child of this thread) on one CPU, so that each burst meets the
    // owner cache the previous one left there.
    let first = allowed_cpus()[0];
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(first).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one_cpu).unwrap();
    // Datagrams delivered to a fresh socket in `ctr`, with the stats around them.
    let burst = |port: u16| {
        let addr = format!("{}:{port}", net.addr_b);
        let sink = net
            .spawn(&net.b, Some(&ctr), &["udp-sink", &addr, "20"], true)
            .unwrap();
        let before = settled(&daemon);
        finish(
            net.spawn(&net.a, None, &["udp-send", &addr, "3000", "64"], false)
                .unwrap(),
        )
        .unwrap();
        let received = finish(sink).unwrap();
        assert!(received > 1000, "only {received} datagrams arrived");
        (received, before, settled(&daemon))
    };
    let unattributed_packets = |before: &Stats, after: &Stats| {
        after.unattributed.rx_packets - before.unattributed.rx_packets
    };

    let (received, before, after) = burst(5301);
    assert!(!after.containers.iter().any(|c| c.id == "late"));
    assert!(unattributed_packets(&before, &after) >= received);

    daemon.register(&ctr, "late");
    let (received, before, after) = burst(5302);
    let counted = cost(&after, "late").rx_packets - cost(&before, "late").rx_packets;
    assert!(
        counted >= received,
        "after registering, {counted} of {received} datagrams were charged to the container"
    );

    daemon.unregister("late", None);
    let (received, before, after) = burst(5303);
    assert!(!after.containers.iter().any(|c| c.id == "late"));
    let unowned = unattributed_packets(&before, &after);
    assert!(
        unowned >= received,
        "after unregistering, only {unowned} of {received} datagrams were unattributed"
    );
}

/// A removed container's final bill, as `dovectl bills --json` shows it.
fn bills(daemon: &TempDaemon) -> Vec<serde_json::Value> {
    let out = run(std::process::Command::new(bin("dovectl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["bills", "--json"]))
    .unwrap();
    serde_json::from_str(&out).unwrap()
}

fn assert_billed_once(
    bills: &[serde_json::Value],
    id: &str,
    reason: &str,
    last: &dove_proto::CostCounters,
) {
    let mine: Vec<_> = bills.iter().filter(|b| b["id"] == id).collect();
    assert_eq!(
        mine.len(),
        1,
        "{id} billed {} times: {bills:#?}",
        mine.len()
    );
    let b = mine[0];
    assert_eq!(b["reason"], reason, "{b:#?}");
    for (key, want) in [
        ("total_ns", last.total_ns),
        ("rx_ns", last.rx_ns),
        ("tx_ns", last.tx_ns),
        ("rx_packets", last.rx_packets),
        ("tx_packets", last.tx_packets),
    ] {
        assert_eq!(
            b[key], want,
            "{id}: bill's {key} differs from its last counters: {b:#?}"
        );
    }
}

/// Removal turns the last counters into a durable bill: one removed through the socket
/// right before `kill -9`, one whose cgroup went while doved was down. Each is billed
/// exactly its last counters, once, across two restarts.
#[test]
fn removed_containers_are_billed_exactly_once_across_kill_9() {
    if !require_root("removed_containers_are_billed_exactly_once_across_kill_9") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer().unwrap();
    let net = NetPair::new().unwrap();
    let unregistered = TestCgroup::new("dove-test-bill-a").unwrap();
    let vanished = TestCgroup::new("dove-test-bill-b").unwrap();
    daemon.register(&unregistered, "bill-a");
    daemon.register(&vanished, "bill-b");
    for (n, ctr) in [(5101, &unregistered), (5102, &vanished)] {
        let addr = format!("{}:{n}", net.addr_b);
        let sink = net
            .spawn(&net.b, Some(ctr), &["udp-sink", &addr, "10"], true)
            .unwrap();
        finish(
            net.spawn(&net.a, None, &["udp-send", &addr, "5000", "64"], false)
                .unwrap(),
        )
        .unwrap();
        assert!(finish(sink).unwrap() > 1000, "traffic arrived");
    }
    let last = settled(&daemon);
    let (last_a, last_b) = (cost(&last, "bill-a"), cost(&last, "bill-b"));
    assert!(last_a.total_ns > 0 && last_b.total_ns > 0, "{last:#?}");

    daemon.unregister("bill-a", Some(unregistered.path.as_str()));
    daemon.kill9();
    vanished.remove().unwrap();
    daemon.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = bills(&daemon);
    while seen.len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        seen = bills(&daemon);
    }
    assert_billed_once(&seen, "bill-a", "unregistered", &last_a);
    assert_billed_once(&seen, "bill-b", "cgroup_removed", &last_b);
    assert!(daemon.list().is_empty(), "{:#?}", daemon.list());

    // Recorded is recorded: another crash and restart bills nothing twice.
    daemon.kill9();
    daemon.spawn().unwrap();
    let again = bills(&daemon);
    assert_billed_once(&again, "bill-a", "unregistered", &last_a);
    assert_billed_once(&again, "bill-b", "cgroup_removed", &last_b);
    // And the last scrape after a removal still has the whole bill.
    let metrics = daemon.scrape().unwrap();
    assert!(
        metrics.contains("dove_softirq_seconds_total{container_id=\"bill-a\""),
        "{metrics}"
    );
}

/// Cgroups come and go while doved starts and stops 100 times: each round registers 20
/// containers, stops doved, and removes their cgroups while it starts again (the
/// registry reloads them while inotify reports them gone, and the observer adds and
/// releases their slots). Every start must serve within 2 s and every stop finish.
#[test]
fn starts_and_stops_never_hang_while_cgroups_churn() {
    if !require_root("starts_and_stops_never_hang_while_cgroups_churn") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer().unwrap();
    let parent = TestCgroup::new("dove-test-churn").unwrap();
    let mut slowest_start = Duration::ZERO;
    let mut slowest_stop = Duration::ZERO;
    for round in 0..100 {
        let cgroups: Vec<TestCgroup> = (0..20)
            .map(|i| parent.child(&format!("r{round}-c{i}")).unwrap())
            .collect();
        for (i, cg) in cgroups.iter().enumerate() {
            daemon.register(cg, &format!("churn-{i}"));
        }
        slowest_stop = slowest_stop.max(daemon.terminate());
        let remover = std::thread::spawn(move || {
            for cg in cgroups {
                let _ = cg.remove();
            }
        });
        let start = Instant::now();
        daemon
            .spawn()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let took = start.elapsed();
        remover.join().unwrap();
        slowest_start = slowest_start.max(took);
        assert!(
            took < Duration::from_secs(2),
            "round {round}: doved took {took:?} to serve\n{}",
            daemon.log_text()
        );
    }
    eprintln!(
        "100 restarts, 2000 cgroups removed around them: slowest start {slowest_start:?}, slowest stop {slowest_stop:?}"
    );
    assert!(
        slowest_stop < Duration::from_secs(10),
        "a stop hung: {slowest_stop:?}"
    );
}

/// Capabilities belong to threads: every thread of a running doved (the async runtime's)
/// must have none left, not just the one that dropped them; the accounting thread keeps
/// CAP_NET_ADMIN alone (CAP_BPF too before 6.0), to attach programs as containers register.
#[test]
fn only_the_accounting_thread_keeps_a_capability_and_only_net_admin() {
    if !require_root("only_the_accounting_thread_keeps_a_capability_and_only_net_admin") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let ctr = TestCgroup::new("dove-test-caps").unwrap();
    // Registrations after the drop still reach the maps, and attach.
    daemon.register(&ctr, "caps");
    settled(&daemon);
    assert_eq!(daemon.stats().health.slots_used, 1);
    assert_eq!(attached_dove_programs(&daemon, &ctr.dir), 2);
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", daemon.pid()))
        .unwrap()
        .map(|t| t.unwrap().path())
        .collect();
    assert!(tasks.len() >= 3, "doved runs {} threads", tasks.len());
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_BPF: u64 = 1 << 39;
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy();
    let before_6 = release
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        < Some(6);
    let accounting_keeps = CAP_NET_ADMIN | if before_6 { CAP_BPF } else { 0 };
    let mut accounting_threads = 0;
    for task in tasks {
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let accounting = comm.trim() == "dove-accounting";
        accounting_threads += usize::from(accounting);
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        for set in ["CapPrm:", "CapEff:", "CapInh:", "CapAmb:", "CapBnd:"] {
            let line = status
                .lines()
                .find(|l| l.starts_with(set))
                .unwrap_or_else(|| panic!("{set} missing"));
            let value = u64::from_str_radix(line[set.len()..].trim(), 16).unwrap();
            let allowed = match set {
                "CapPrm:" | "CapEff:" | "CapBnd:" if accounting => accounting_keeps,
                _ => 0,
            };
            assert_eq!(
                value,
                allowed,
                "{} ({}): {line}",
                task.display(),
                comm.trim()
            );
        }
    }
    assert_eq!(accounting_threads, 1);
}

/// The metrics endpoint holds a bounded number of connections: 200 idle ones cost doved
/// 64 tasks at most, and it serves again as soon as they go.
#[test]
fn metrics_endpoint_caps_its_connections() {
    if !require_root("metrics_endpoint_caps_its_connections") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer().unwrap();
    let addr = daemon.metrics.clone().unwrap();
    let idle: Vec<_> = (0..200)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    let refused_by = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = daemon.log_text();
        if log.contains("metrics connection refused: too many open") || Instant::now() > refused_by
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        log.contains("metrics connection refused: too many open"),
        "{log}"
    );
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match daemon.scrape() {
            Ok(body) if body.contains("dove_observer_up 1") => break,
            other => assert!(
                Instant::now() < deadline,
                "no scrape after the flood: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
