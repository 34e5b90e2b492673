//! Benchmark: what the eBPF observer costs per datagram, per program, and per tick.
//!
//! 1. Floods of 64-byte UDP over a veth pair between two namespaces, sender pinned to
//!    CPU 0 and sink to CPU 1, on four paths:
//!    - the worst case: veth without RPS, where every datagram is its own softirq window,
//!      run on the sender's CPU; the sink registered;
//!    - the batched path: RPS steers every packet to CPU 1, whose NET_RX windows drain
//!      the backlog in batches (as NAPI does on a NIC); the sink registered;
//!    - bulk TCP on the batched path: one stream (GSO: 64 KB packets), per byte;
//!    - unregistered traffic: the worst-case path with the sink in an unregistered cgroup
//!      while 1,000 other containers are registered.
//!
//!    Each path runs four variants: without DOVE; empty programs where DOVE attaches its
//!    per-packet programs (`ebpf/programs/src/floor.rs`: four tracepoints, and the two
//!    socket hooks at the registered cgroups: the kernel's dispatch cost, the floor under
//!    anything attached there); the same with the socket hooks at the cgroup v2 root
//!    instead (the floor of a design that runs them for every socket on the host);
//!    doved. Every round runs every (path, variant) pair once, in an order shuffled afresh each round, because shared 2-core
//!    machines drift by tens of percent over minutes. Datagrams are counted by the
//!    receiving namespace's own UDP counters (`/proc/net/snmp`: delivered plus dropped at
//!    the socket, so buffer drops do not pass for cost), CPU time from `/proc/stat`.
//!    Reported: median and interquartile range of datagrams/s and of CPU ns per datagram.
//! 2. A separate pass with `kernel.bpf_stats_enabled` (it adds about 20 ns to every
//!    program run, so never in the timed rounds): each of doved's programs' mean run time.
//! 3. The aggregation tick with 0, 1,000 and 10,000 registered containers (doved started
//!    with `observer.max_containers = 10000`).
//!
//! Prints numbers; asserts nothing. Run as root after a release build:
//!     cargo build --release --workspace --bins && cargo bench -p dove-tests --bench observer_overhead
//! ROUNDS (default 10) and FLOOD_SECONDS (default 1) tune the floods; SEED repeats an
//! order.

use std::time::Duration;

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, RawTracePoint};
use dove_tests::bench::*;
use dove_tests::*;

static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dove-floor.bpf.o"));

const SENDER_CPU: usize = 0;
const SINK_CPU: usize = 1;
/// The bulk TCP path's stream size per second of FLOOD_SECONDS (about a second over
/// veth here, at 2.6-3.2 GB/s).
const TCP_BYTES_PER_SECOND: u64 = 3_000_000_000;

/// Empty programs at DOVE's four per-packet tracepoints and at the socket hooks of the
/// cgroup at `socket_hooks_at`; detached on drop.
fn attach_floor(socket_hooks_at: &std::path::Path) -> aya::Ebpf {
    let mut ebpf = aya::Ebpf::load(FLOOR_OBJECT).expect("loading the floor programs");
    for (name, tracepoint) in [
        ("floor_softirq_entry", "softirq_entry"),
        ("floor_softirq_exit", "softirq_exit"),
        ("floor_packet_start", "netif_receive_skb"),
        ("floor_xmit_start", "net_dev_start_xmit"),
    ] {
        let program: &mut RawTracePoint = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
        program.attach(tracepoint).unwrap();
    }
    let cgroup = std::fs::File::open(socket_hooks_at).unwrap();
    for (name, kind) in [
        ("floor_ingress", CgroupSkbAttachType::Ingress),
        ("floor_egress", CgroupSkbAttachType::Egress),
    ] {
        let program: &mut CgroupSkb = ebpf.program_mut(name).unwrap().try_into().unwrap();
        program.load().unwrap();
        program
            .attach(&cgroup, kind, CgroupAttachMode::Single)
            .unwrap();
    }
    ebpf
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Without,
    Floor,
    /// The floor with the socket hooks at the cgroup v2 root: what a design that runs
    /// them for every socket on the host starts from.
    RootFloor,
    Dove,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Without,
        Variant::Floor,
        Variant::RootFloor,
        Variant::Dove,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Without => "without DOVE",
            Variant::Floor => "empty programs where DOVE attaches (floor)",
            Variant::RootFloor => "the same, socket hooks at the cgroup root",
            Variant::Dove => "DOVE",
        }
    }
}

struct Path {
    label: &'static str,
    rps: bool,
    /// Bulk TCP (one stream of `TCP_BYTES_PER_SECOND` × FLOOD_SECONDS) instead of the
    /// 64-byte UDP flood: reported per byte, as GSO hands veth 64 KB packets.
    tcp: bool,
    sink_registered: bool,
    /// Other containers registered while DOVE runs.
    crowd: usize,
}

const PATHS: [Path; 4] = [
    Path {
        label: "worst case: veth, a softirq window per datagram, sink registered",
        rps: false,
        tcp: false,
        sink_registered: true,
        crowd: 0,
    },
    Path {
        label: "batched: RPS to CPU 1, windows drain the backlog, sink registered",
        rps: true,
        tcp: false,
        sink_registered: true,
        crowd: 0,
    },
    Path {
        label: "batched, bulk TCP: one stream, RPS to CPU 1, sink registered",
        rps: true,
        tcp: true,
        sink_registered: true,
        crowd: 0,
    },
    Path {
        label: "unregistered traffic: veth, sink unregistered, 1,000 containers registered",
        rps: false,
        tcp: false,
        sink_registered: false,
        crowd: 1000,
    },
];

struct Bed {
    net: NetPair,
    sink: TestCgroup,
    crowd: Vec<TestCgroup>,
    crowd_parent: TestCgroup,
}

impl Bed {
    fn new() -> Self {
        let net = NetPair::new().unwrap();
        let parent = TestCgroup::new("dove-bench-crowd").unwrap();
        let crowd = (0..1000)
            .map(|i| parent.child(&format!("c{i}")).unwrap())
            .collect();
        Bed {
            net,
            sink: TestCgroup::new("dove-bench-sink").unwrap(),
            crowd,
            crowd_parent: parent,
        }
    }

    fn set_rps(&self, on: bool) {
        if on {
            self.net.steer_b_to(SINK_CPU).unwrap();
        } else {
            self.net.rps_off().unwrap();
        }
    }

    /// What `variant` attaches for `path`, kept alive for the flood.
    fn attach(&self, path: &Path, variant: Variant) -> Box<dyn std::any::Any> {
        match variant {
            Variant::Without => Box::new(()),
            // DOVE attaches its socket programs at the registered sink, or, with the sink
            // unregistered, at the crowd's cgroups (one parent stands in for them).
            Variant::Floor if path.sink_registered => Box::new(attach_floor(&self.sink.dir)),
            Variant::Floor => Box::new(attach_floor(&self.crowd_parent.dir)),
            Variant::RootFloor => Box::new(attach_floor(&unified_mount())),
            Variant::Dove => {
                let daemon = TempDaemon::with_observer().unwrap();
                if path.sink_registered {
                    daemon.register(&self.sink, "sink");
                }
                for (i, cg) in self.crowd.iter().take(path.crowd).enumerate() {
                    daemon.register(cg, &format!("c{i}"));
                }
                // Links are made as the accounting thread takes the registrations in.
                let hooked = path.crowd + usize::from(path.sink_registered);
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while daemon.stats().health.hooked_cgroups < hooked as u64 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{hooked} cgroups never hooked"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Box::new(daemon)
            }
        }
    }

    /// `dove-traffic ARGS` in the sink's cgroup and namespace, on the sink's CPU, ready.
    fn sink(&self, args: &[&str]) -> std::process::Child {
        self.net
            .spawn_on(Some(SINK_CPU), &self.net.b, Some(&self.sink), args, true)
            .unwrap()
    }

    /// `dove-traffic ARGS` in the sending namespace on the sender's CPU, to its end: the
    /// count it prints.
    fn send(&self, args: &[&str]) -> u64 {
        finish(
            self.net
                .spawn_on(Some(SENDER_CPU), &self.net.a, None, args, false)
                .unwrap(),
        )
        .unwrap()
    }

    /// The path's traffic: its UDP flood or its TCP stream.
    fn run(&self, path: &Path, port: u16, seconds: f64) -> Flood {
        if path.tcp {
            self.stream(port, seconds)
        } else {
            self.flood(port, seconds)
        }
    }

    /// One bulk TCP stream of `TCP_BYTES_PER_SECOND × seconds` into the sink; `per_second`
    /// in bytes, `cpu_ns` per KB.
    fn stream(&self, port: u16, seconds: f64) -> Flood {
        let addr = format!("{}:{port}", self.net.addr_b);
        let bytes = (TCP_BYTES_PER_SECOND as f64 * seconds) as u64;
        let sink = self.sink(&["tcp-sink", &addr, "60"]);
        let before = busy_ns();
        let start = std::time::Instant::now();
        self.send(&["tcp-send", &addr, &bytes.to_string()]);
        let received = finish(sink).unwrap();
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = busy_ns() - before;
        Flood {
            sent: bytes,
            processed: received,
            dropped: bytes.saturating_sub(received),
            per_second: received as f64 / elapsed,
            cpu_ns: cpu as f64 / (received.max(1) as f64 / 1000.0),
        }
    }

    fn flood(&self, port: u16, seconds: f64) -> Flood {
        let addr = format!("{}:{port}", self.net.addr_b);
        let sink = self.sink(&["udp-sink", &addr, "60"]);
        let before = (udp_counters(&self.net.b), busy_ns());
        let start = std::time::Instant::now();
        let sent = self.send(&["udp-flood", &addr, &seconds.to_string(), "64"]);
        // The receiving side drains its backlog.
        std::thread::sleep(Duration::from_millis(20));
        let elapsed = start.elapsed().as_secs_f64();
        let after = (udp_counters(&self.net.b), busy_ns());
        drop(KillOnDrop(sink));
        let processed = (after.0 .0 + after.0 .1) - (before.0 .0 + before.0 .1);
        Flood {
            sent,
            processed,
            dropped: after.0 .1 - before.0 .1,
            per_second: processed as f64 / elapsed,
            cpu_ns: (after.1 - before.1) as f64 / processed.max(1) as f64,
        }
    }
}

struct Flood {
    sent: u64,
    processed: u64,
    dropped: u64,
    per_second: f64,
    cpu_ns: f64,
}

fn timed_rounds(bed: &Bed, rounds: usize, seconds: f64) {
    let (mut order, seed) = Shuffle::from_env();
    let pairs: Vec<(usize, usize)> = (0..PATHS.len())
        .flat_map(|p| (0..Variant::ALL.len()).map(move |v| (p, v)))
        .collect();
    let mut results: Vec<Vec<Flood>> = (0..pairs.len()).map(|_| Vec::new()).collect();
    let mut port = 6000u16;
    for _ in 0..rounds {
        let mut this_round: Vec<usize> = (0..pairs.len()).collect();
        order.shuffle(&mut this_round);
        for k in this_round {
            let (p, v) = pairs[k];
            let path = &PATHS[p];
            bed.set_rps(path.rps);
            let _attached = bed.attach(path, Variant::ALL[v]);
            port += 1;
            results[k].push(bed.run(path, port, seconds));
        }
    }
    bed.set_rps(false);

    println!(
        "64-byte UDP floods and one bulk TCP path, sender on CPU {SENDER_CPU}, sink on CPU {SINK_CPU}: {rounds} rounds of {seconds} s, every (path, variant) once per round in a shuffled order (SEED={seed})"
    );
    println!("  datagrams the receiving side processed (delivered + dropped at the socket), median [interquartile range]");
    for (p, path) in PATHS.iter().enumerate() {
        println!("{}:", path.label);
        let of = |v: usize| &results[p * Variant::ALL.len() + v];
        let stats = |v: usize| {
            (
                quartiles(of(v).iter().map(|f| f.per_second).collect()),
                quartiles(of(v).iter().map(|f| f.cpu_ns).collect()),
            )
        };
        let (base_rate, base_cpu) = stats(0);
        for (v, variant) in Variant::ALL.iter().enumerate() {
            let (rate, cpu) = stats(v);
            let floods = of(v);
            let sent: u64 = floods.iter().map(|f| f.sent).sum();
            let processed: u64 = floods.iter().map(|f| f.processed).sum();
            let dropped: u64 = floods.iter().map(|f| f.dropped).sum();
            let (unit, per, scale) = if path.tcp {
                ("MB/s", "KB", 1e-6)
            } else {
                ("datagrams/s", "datagram", 1.0)
            };
            println!(
                "  {:<40} {:>7.0} {unit} [{:.0}..{:.0}]  {:>6.0} CPU ns/{per} [{:.0}..{:.0}]  vs without: {:.3}x {unit}, {:.3}x CPU ns  ({} sent, {} processed, {} dropped)",
                variant.label(),
                rate.0 * scale,
                rate.1 * scale,
                rate.2 * scale,
                cpu.0,
                cpu.1,
                cpu.2,
                rate.0 / base_rate.0,
                cpu.0 / base_cpu.0,
                sent,
                processed,
                dropped
            );
        }
        let (floor_rate, floor_cpu) = stats(1);
        let (dove_rate, dove_cpu) = stats(3);
        println!(
            "  DOVE over its floor: {:.3}x rate, {:.3}x CPU ns per unit",
            dove_rate.0 / floor_rate.0,
            dove_cpu.0 / floor_cpu.0
        );
    }
}

/// Every program loaded now, as bpftool reports them.
fn programs() -> Vec<serde_json::Value> {
    let json = run(std::process::Command::new("bpftool").args(["prog", "show", "--json"])).unwrap();
    match serde_json::from_str(&json).unwrap() {
        serde_json::Value::Array(programs) => programs,
        _ => Vec::new(),
    }
}

/// IDs of loaded programs named like DOVE's.
fn dove_program_ids() -> std::collections::BTreeSet<u64> {
    programs()
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("dove_")))
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Each doved program's mean run time on each path, from the kernel's own statistics.
fn program_costs(bed: &Bed, seconds: f64) {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let was = std::fs::read_to_string(STATS).unwrap_or_default();
    let was = if was.trim().is_empty() {
        "0"
    } else {
        was.trim()
    };
    println!("doved's programs, mean run time per run (kernel.bpf_stats_enabled, a separate pass; stats add ~20 ns per run):");
    for (p, path) in PATHS.iter().enumerate() {
        bed.set_rps(path.rps);
        // Only the programs of the doved started here, not an installed one's.
        let others = dove_program_ids();
        let attached = bed.attach(path, Variant::Dove);
        std::fs::write(STATS, "1").unwrap();
        let flood = bed.run(path, 7000 + p as u16, seconds);
        // Per datagram, or for the TCP stream per 64 KB (a GSO packet's worth).
        let (per, units) = if path.tcp {
            ("64 KB", flood.processed as f64 / 65536.0)
        } else {
            ("datagram", flood.processed as f64)
        };
        let programs = programs();
        std::fs::write(STATS, was).unwrap();
        drop(attached);
        let mut rows: Vec<String> = programs
            .iter()
            .filter(|p| {
                p["name"].as_str().is_some_and(|n| n.starts_with("dove_"))
                    && !p["id"].as_u64().is_some_and(|id| others.contains(&id))
                    && p["run_cnt"].as_u64().unwrap_or(0) > 0
            })
            .map(|p| {
                let runs = p["run_cnt"].as_u64().unwrap();
                let ns = p["run_time_ns"].as_u64().unwrap_or(0);
                format!(
                    "{} {:.0} ns x {:.2}/{per}",
                    p["name"].as_str().unwrap(),
                    ns as f64 / runs as f64,
                    runs as f64 / units.max(1.0)
                )
            })
            .collect();
        rows.sort();
        println!("  {}: {}", path.label, rows.join("; "));
    }
    bed.set_rps(false);
}

fn tick_costs(bed: &Bed) {
    const MOST: usize = 10_000;
    let daemon = TempDaemon::with_observer_settings(&format!("max_containers = {MOST}")).unwrap();
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
        quartiles(samples).0
    };
    println!("aggregation tick (median of 20 ticks, 2 CPUs):");
    println!("  {:>5} containers: {:>8.1} µs", 0, tick_cost(&daemon));
    for (i, cg) in bed.crowd.iter().enumerate() {
        daemon.register(cg, &format!("c{i}"));
    }
    let full = tick_cost(&daemon);
    println!(
        "  {:>5} containers: {full:>8.1} µs  ({:.2}% of a 100 ms period)",
        bed.crowd.len(),
        full / 1e3
    );
    // Registered like a Kubernetes pod around its containers: the socket programs attach
    // at the pod alone. Flat, every container holds two link fds in doved, and 10,000 of
    // them need more than a hard open-file limit of 20,000 (which a doved without
    // CAP_SYS_RESOURCE cannot raise) allows.
    let parent = TestCgroup::new("dove-bench-more").unwrap();
    daemon.register(&parent, "pod");
    let more: Vec<TestCgroup> = (bed.crowd.len() + 1..MOST)
        .map(|i| parent.child(&format!("m{i}")).unwrap())
        .collect();
    for (i, cg) in more.iter().enumerate() {
        daemon.register(cg, &format!("m{i}"));
    }
    let most = tick_cost(&daemon);
    println!(
        "  {MOST:>5} containers: {most:>8.1} µs  ({:.2}% of a 100 ms period)",
        most / 1e3
    );
    drop(daemon);
}

fn main() {
    if !require_root("observer_overhead bench") {
        return;
    }
    let rounds: usize = env_or("ROUNDS", 10);
    let seconds: f64 = env_or("FLOOD_SECONDS", 1.0);
    let others = dove_program_ids();
    if !others.is_empty() {
        println!(
            "NOTE: {} programs of another doved (an installed one?) are loaded: every variant below also runs them, so \"without DOVE\" is not without it and the ratios understate DOVE's cost. Stop it (systemctl stop doved) for a clean run.",
            others.len()
        );
    }
    let bed = Bed::new();
    timed_rounds(&bed, rounds, seconds);
    program_costs(&bed, seconds);
    tick_costs(&bed);
}
