//! Benchmark: what the eBPF observer costs, and what a tick costs.
//!
//! 1. A bounded 64-byte UDP flood over a veth pair between two namespaces, the sink in a
//!    registered cgroup: datagrams/s delivered and CPU ns per delivered datagram (all
//!    CPUs' busy time from /proc/stat over the run), interleaved round by round
//!    (DESIGN.md, "Measuring on these machines"): without any program; with empty
//!    programs at DOVE's four hooks (`ebpf/programs/src/floor.rs`: the kernel's dispatch
//!    cost, the floor under anything attached there); with doved; with doved without its
//!    egress program.
//! 2. The per-tick aggregation cost with 0 and with 1,000 registered containers.
//!
//! Prints numbers; asserts nothing. Run as root after a release build:
//!     cargo build --release --workspace --bins && cargo bench -p dove-tests --bench observer_overhead
//! ROUNDS (default 5) and FLOOD_SECONDS (default 2) tune the flood.

use std::time::Duration;

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint};
use dove_tests::*;

static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dove-floor.bpf.o"));

/// Empty programs attached where DOVE attaches its own; detached on drop.
fn attach_floor() -> aya::Ebpf {
    let mut ebpf = aya::Ebpf::load(FLOOR_OBJECT).expect("loading the floor programs");
    for (name, tracepoint) in [
        ("floor_softirq_entry", "softirq_entry"),
        ("floor_softirq_exit", "softirq_exit"),
    ] {
        let program: &mut RawTracePoint = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
        program.attach(tracepoint).unwrap();
    }
    let root = std::fs::File::open(unified_mount()).unwrap();
    for (name, kind) in [
        ("floor_ingress", CgroupSkbAttachType::Ingress),
        ("floor_egress", CgroupSkbAttachType::Egress),
    ] {
        let program: &mut CgroupSkb = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
        program
            .attach(&root, kind, CgroupAttachMode::Single)
            .unwrap();
    }
    ebpf
}

fn busy_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = cpu[3] + cpu[4];
    let total: u64 = cpu.iter().take(8).sum();
    (total - idle, total)
}

struct Run {
    pps: f64,
    cpu_ns_per_packet: f64,
}

fn flood(net: &NetPair, sink_cgroup: &TestCgroup, port: u16, seconds: f64) -> Run {
    let addr = format!("{}:{port}", net.addr_b);
    let sink = net
        .spawn(&net.b, Some(sink_cgroup), &["udp-sink", &addr, "60"], true)
        .unwrap();
    let hz = 100.0; // USER_HZ
    let (busy0, _) = busy_jiffies();
    let start = std::time::Instant::now();
    finish(
        net.spawn(
            &net.a,
            None,
            &["udp-flood", &addr, &seconds.to_string(), "64"],
            false,
        )
        .unwrap(),
    )
    .unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let (busy1, _) = busy_jiffies();
    let received = finish(sink).unwrap() as f64;
    Run {
        pps: received / elapsed,
        cpu_ns_per_packet: (busy1 - busy0) as f64 / hz * 1e9 / received,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(0.0, f64::max);
    format!("{lo:.0}..{hi:.0}")
}

fn main() {
    if !require_root("observer_overhead bench") {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seconds: f64 = std::env::var("FLOOD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-bench-sink").unwrap();
    let (mut base_pps, mut base_cpu, mut dove_pps, mut dove_cpu) = (vec![], vec![], vec![], vec![]);
    let (mut ingress_pps, mut ingress_cpu) = (vec![], vec![]);
    let (mut floor_pps, mut floor_cpu) = (vec![], vec![]);
    for round in 0..rounds {
        let port = 6000 + round as u16 * 4;
        let a = flood(&net, &ctr, port, seconds);
        base_pps.push(a.pps);
        base_cpu.push(a.cpu_ns_per_packet);
        let floor = attach_floor();
        let f = flood(&net, &ctr, port + 3, seconds);
        drop(floor);
        floor_pps.push(f.pps);
        floor_cpu.push(f.cpu_ns_per_packet);
        for (settings, pps, cpu, offset) in [
            ("", &mut dove_pps, &mut dove_cpu, 1),
            ("egress = false", &mut ingress_pps, &mut ingress_cpu, 2),
        ] {
            let daemon = TempDaemon::with_observer_settings(settings).unwrap();
            daemon.register(&ctr, "sink");
            let b = flood(&net, &ctr, port + offset, seconds);
            pps.push(b.pps);
            cpu.push(b.cpu_ns_per_packet);
        }
    }
    println!("64-byte UDP flood over veth, {rounds} interleaved rounds of {seconds} s each:");
    println!(
        "  without DOVE: {:>9.0} datagrams/s (spread {}), {:>6.0} CPU ns/datagram (spread {})",
        median(base_pps.clone()),
        spread(&base_pps),
        median(base_cpu.clone()),
        spread(&base_cpu)
    );
    println!(
        "  empty programs at DOVE's hooks: {:>9.0} datagrams/s (spread {}), {:>6.0} CPU ns/datagram (spread {})",
        median(floor_pps.clone()),
        spread(&floor_pps),
        median(floor_cpu.clone()),
        spread(&floor_cpu)
    );
    println!(
        "  with DOVE:    {:>9.0} datagrams/s (spread {}), {:>6.0} CPU ns/datagram (spread {})",
        median(dove_pps.clone()),
        spread(&dove_pps),
        median(dove_cpu.clone()),
        spread(&dove_cpu)
    );
    println!(
        "  DOVE, no egress:{:>9.0} datagrams/s (spread {}), {:>6.0} CPU ns/datagram (spread {})",
        median(ingress_pps.clone()),
        spread(&ingress_pps),
        median(ingress_cpu.clone()),
        spread(&ingress_cpu)
    );
    println!(
        "  ratio with/without: datagrams/s {:.3}, CPU ns/datagram {:.3}",
        median(dove_pps.clone()) / median(base_pps.clone()),
        median(dove_cpu.clone()) / median(base_cpu.clone())
    );
    println!(
        "  ratio without egress/without DOVE: datagrams/s {:.3}, CPU ns/datagram {:.3}",
        median(ingress_pps) / median(base_pps.clone()),
        median(ingress_cpu) / median(base_cpu.clone())
    );
    println!(
        "  ratio empty programs/without: datagrams/s {:.3}, CPU ns/datagram {:.3}  (the hooks' own cost)",
        median(floor_pps.clone()) / median(base_pps),
        median(floor_cpu.clone()) / median(base_cpu)
    );
    println!(
        "  ratio with DOVE/empty programs: datagrams/s {:.3}, CPU ns/datagram {:.3}  (DOVE's work)",
        median(dove_pps) / median(floor_pps),
        median(dove_cpu) / median(floor_cpu)
    );

    // Per-tick aggregation cost.
    let daemon = TempDaemon::with_observer().unwrap();
    let tick_cost = |daemon: &TempDaemon| {
        let mut samples = Vec::new();
        let mut last = 0;
        while samples.len() < 20 {
            std::thread::sleep(Duration::from_millis(30));
            let h = daemon.stats().health;
            if h.ticks != last {
                last = h.ticks;
                samples.push(h.last_tick_ns as f64 / 1e3);
            }
        }
        median(samples)
    };
    let empty = tick_cost(&daemon);
    let parent = TestCgroup::new("dove-bench-many").unwrap();
    let cgroups: Vec<TestCgroup> = (0..1000)
        .map(|i| parent.child(&format!("c{i}")).unwrap())
        .collect();
    for (i, cg) in cgroups.iter().enumerate() {
        daemon.register(cg, &format!("c{i}"));
    }
    let full = tick_cost(&daemon);
    println!("aggregation tick (median of 20 ticks, 2 CPUs):");
    println!("  0 containers:     {empty:>8.1} µs");
    println!(
        "  1,000 containers: {full:>8.1} µs  ({:.1}% of a 100 ms period)",
        full / 1e3
    );
}
