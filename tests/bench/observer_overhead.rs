//! Benchmark: what the eBPF observer costs, and what a tick costs.
//!
//! 1. A bounded 64-byte UDP flood over a veth pair between two namespaces, the sink in a
//!    registered cgroup: datagrams/s delivered and CPU ns per delivered datagram (all
//!    CPUs' busy time from /proc/stat over the run), interleaved round by round because
//!    shared 2-core machines drift by tens of percent over minutes: without any program;
//!    with empty programs at DOVE's five per-packet hooks (`ebpf/programs/src/floor.rs`:
//!    the kernel's dispatch cost, the floor under anything attached there); with doved;
//!    with doved without its egress program.
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

/// Which of DOVE's hooks get an empty program.
#[derive(Clone, Copy)]
struct Hooks {
    softirq: bool,
    cgroup_skb: bool,
}

/// Empty programs attached where DOVE attaches its own; detached on drop.
fn attach_floor(hooks: Hooks) -> aya::Ebpf {
    let mut ebpf = aya::Ebpf::load(FLOOR_OBJECT).expect("loading the floor programs");
    if hooks.softirq {
        for (name, tracepoint) in [
            ("floor_softirq_entry", "softirq_entry"),
            ("floor_softirq_exit", "softirq_exit"),
            ("floor_packet_start", "netif_receive_skb"),
        ] {
            let program: &mut RawTracePoint = ebpf.program_mut(name).unwrap().try_into().unwrap();
            program.load().unwrap();
            program.attach(tracepoint).unwrap();
        }
    }
    if hooks.cgroup_skb {
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
    }
    ebpf
}

/// What is attached during one flood.
enum Setup {
    Nothing,
    Floor(Hooks),
    /// doved with these extra `[observer]` settings, the sink registered.
    Dove(&'static str),
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
    let both = Hooks {
        softirq: true,
        cgroup_skb: true,
    };
    let variants = [
        ("without DOVE", Setup::Nothing),
        (
            "empty programs at all five per-packet hooks",
            Setup::Floor(both),
        ),
        (
            "empty programs, tracepoints only (softirq, packet start)",
            Setup::Floor(Hooks {
                softirq: true,
                cgroup_skb: false,
            }),
        ),
        (
            "empty programs, cgroup_skb only",
            Setup::Floor(Hooks {
                softirq: false,
                cgroup_skb: true,
            }),
        ),
        ("with DOVE", Setup::Dove("")),
        (
            "with DOVE, no egress program",
            Setup::Dove("egress = false"),
        ),
    ];
    let mut pps = vec![Vec::new(); variants.len()];
    let mut cpu = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        for (i, (_, setup)) in variants.iter().enumerate() {
            let port = 6000 + (round * variants.len() + i) as u16;
            let _attached: Box<dyn std::any::Any> = match setup {
                Setup::Nothing => Box::new(()),
                Setup::Floor(hooks) => Box::new(attach_floor(*hooks)),
                Setup::Dove(settings) => {
                    let daemon = TempDaemon::with_observer_settings(settings).unwrap();
                    daemon.register(&ctr, "sink");
                    Box::new(daemon)
                }
            };
            let run = flood(&net, &ctr, port, seconds);
            pps[i].push(run.pps);
            cpu[i].push(run.cpu_ns_per_packet);
        }
    }
    println!("64-byte UDP flood over veth, {rounds} interleaved rounds of {seconds} s each:");
    for (i, (label, _)) in variants.iter().enumerate() {
        println!(
            "  {label:<42} {:>7.0} datagrams/s (spread {}), {:>5.0} CPU ns/datagram (spread {}); ratio to without: {:.3} datagrams/s, {:.3} CPU ns",
            median(pps[i].clone()),
            spread(&pps[i]),
            median(cpu[i].clone()),
            spread(&cpu[i]),
            median(pps[i].clone()) / median(pps[0].clone()),
            median(cpu[i].clone()) / median(cpu[0].clone()),
        );
    }
    let (floor, dove) = (1, 4);
    println!(
        "  DOVE's own work (with DOVE / empty programs at all five per-packet hooks): {:.3} datagrams/s, {:.3} CPU ns",
        median(pps[dove].clone()) / median(pps[floor].clone()),
        median(cpu[dove].clone()) / median(cpu[floor].clone())
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
