//! Benchmark: where early drop saves the most CPU per dropped packet.
//!
//! A 64-byte UDP flood from an "outside" namespace, through a "router" namespace that
//! stands for the host (forwarding on, as on a host that routes to its containers), into
//! a "container" namespace, over veth pairs: outside ⇄ router (`entry`, where packets
//! enter the host) and router ⇄ container (the container's host-side veth and its peer).
//! The sender is pinned to CPU 0, where veth runs the whole receive path in softirq; the
//! sink to CPU 1.
//!
//! Variants, each run once per round in an order shuffled afresh every round:
//! - forwarded: nothing drops, the container's socket receives;
//! - dropped at the sender's own egress: what the sender alone costs, subtracted from
//!   the others to give the host's share;
//! - XDP at the entry, keyed by the container's address (what a program at a host's NIC
//!   would have to do; on veth, native XDP switches the entry to NAPI receive and copies
//!   each skb a socket built into a page of its own first, so this row is veth's XDP, not
//!   what XDP costs at a NIC);
//! - tc ingress at the entry, keyed the same way;
//! - tc egress at the container's host-side veth, keyed by the interface: where doved's
//!   `dove_early_drop` stands.
//!
//! The programs (`ebpf/programs/src/drop_placement.rs`) each do one hash lookup and drop
//! what they match, so the placements are compared, not policies. Reported per variant:
//! median and interquartile range of datagrams sent per second and of all CPUs' busy
//! time (`/proc/stat`, steal excluded) per datagram sent, the host's share of that (less
//! the sender-only median), what the program itself dropped (its own per-CPU counter: a
//! full veth ring or backlog drops more cheaply and must not pass for the placement's
//! work) and what the container's namespace delivered (its UDP counters).
//!
//! What this topology cannot show: at a physical NIC, XDP runs before the kernel
//! allocates an skb, so it saves that allocation too; and the router here has no bridge,
//! netfilter or conntrack, which a Docker or podman host runs between its entry and the
//! container's veth, so the veth placement's gap to the entry is a lower bound.
//!
//! Prints numbers; asserts nothing. Run as root:
//!     cargo bench -p dove-tests --bench early_drop_placement
//! ROUNDS (default 10) and FLOOD_SECONDS (default 1) tune the floods; SEED repeats an
//! order.

use std::net::Ipv4Addr;
use std::process::Command;

use aya::maps::{HashMap, PerCpuArray};
use aya::programs::links::LinkOrder;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpFlags};
use dove_tests::bench::*;
use dove_tests::*;

static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dove-drop-placement.bpf.o"));

const SENDER_CPU: usize = 0;
const SINK_CPU: usize = 1;
const PORT: u16 = 5400;

/// outside ⇄ router ⇄ container, each a network namespace of its own.
struct Topology {
    outside: String,
    router: String,
    container: String,
    /// The outside namespace's end of its link: the sender's own device.
    outside_dev: String,
    /// The router's end of the outside link: where packets enter the host.
    entry: String,
    /// The router's end of the container's pair: the container's host-side veth.
    host_veth: String,
    host_veth_index: u32,
    container_addr: Ipv4Addr,
}

impl Topology {
    fn new() -> anyhow::Result<Self> {
        let n = std::process::id() % 250 + 1;
        let mut t = Topology {
            outside: unique("dove-pout"),
            router: unique("dove-prt"),
            container: unique("dove-pctr"),
            outside_dev: format!("dpo{n}"),
            entry: format!("dpe{n}"),
            host_veth: format!("dph{n}"),
            host_veth_index: 0,
            container_addr: Ipv4Addr::new(10, 79, n as u8, 2),
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        for ns in [&t.outside, &t.router, &t.container] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let outside_dev = t.outside_dev.clone();
        let container_dev = format!("dpc{n}");
        ip(&[
            "-n",
            &t.outside,
            "link",
            "add",
            &outside_dev,
            "type",
            "veth",
            "peer",
            "name",
            &t.entry,
            "netns",
            &t.router,
        ])?;
        ip(&[
            "-n",
            &t.router,
            "link",
            "add",
            &t.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &container_dev,
            "netns",
            &t.container,
        ])?;
        for (ns, dev, addr) in [
            (&t.outside, &outside_dev, format!("10.78.{n}.1/24")),
            (&t.router, &t.entry, format!("10.78.{n}.2/24")),
            (&t.router, &t.host_veth, format!("10.79.{n}.1/24")),
            (
                &t.container,
                &container_dev,
                format!("{}/24", t.container_addr),
            ),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            &t.outside,
            "route",
            "add",
            &format!("10.79.{n}.0/24"),
            "via",
            &format!("10.78.{n}.2"),
        ])?;
        ip(&[
            "-n",
            &t.container,
            "route",
            "add",
            "default",
            "via",
            &format!("10.79.{n}.1"),
        ])?;
        // Forwarding in the router's namespace only: the host's own setting is untouched.
        run(Command::new("ip").args([
            "netns",
            "exec",
            &t.router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]))?;
        let index = run(Command::new("ip").args([
            "netns",
            "exec",
            &t.router,
            "cat",
            &format!("/sys/class/net/{}/ifindex", t.host_veth),
        ]))?;
        t.host_veth_index = index.trim().parse()?;
        Ok(t)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.outside, &self.router, &self.container] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Forwarded,
    SenderOnly,
    XdpEntry,
    TcEntry,
    TcHostVeth,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Forwarded,
        Variant::SenderOnly,
        Variant::XdpEntry,
        Variant::TcEntry,
        Variant::TcHostVeth,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Forwarded => "forwarded, nothing dropped",
            Variant::SenderOnly => "dropped at the sender's egress (sender only)",
            Variant::XdpEntry => "veth XDP at the entry, by address",
            Variant::TcEntry => "tc ingress at the entry, by address",
            Variant::TcHostVeth => "tc egress at the host-side veth (doved's)",
        }
    }
}

/// Load `variant`'s program and attach it in its namespace; it stays attached until the
/// returned object is dropped.
fn attach(t: &Topology, variant: Variant) -> Option<aya::Ebpf> {
    let (program, interface, ns) = match variant {
        Variant::Forwarded => return None,
        Variant::SenderOnly => ("drop_tc_entry", t.outside_dev.clone(), &t.outside),
        Variant::XdpEntry => ("drop_xdp_entry", t.entry.clone(), &t.router),
        Variant::TcEntry => ("drop_tc_entry", t.entry.clone(), &t.router),
        Variant::TcHostVeth => ("drop_tc_host_veth", t.host_veth.clone(), &t.router),
    };
    let netns = format!("/run/netns/{ns}");
    // The header's bytes, as the program reads them.
    let address = u32::from_ne_bytes(t.container_addr.octets());
    let index = t.host_veth_index;
    // Interface names resolve in the calling thread's namespace: attach from a thread
    // that joined the program's (the links outlive it; the thread's namespace does not
    // leak into the bench's).
    let attached = std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut ebpf = aya::Ebpf::load(OBJECT).expect("loading the placement programs");
        let mut addresses: HashMap<_, u32, u8> =
            HashMap::try_from(ebpf.map_mut("DROP_ADDRS").unwrap()).unwrap();
        addresses.insert(address, 1, 0).unwrap();
        let mut interfaces: HashMap<_, u32, u8> =
            HashMap::try_from(ebpf.map_mut("DROP_IFINDEX").unwrap()).unwrap();
        interfaces.insert(index, 1, 0).unwrap();
        match variant {
            Variant::XdpEntry => {
                let p: &mut Xdp = ebpf.program_mut(program).unwrap().try_into().unwrap();
                p.load().unwrap();
                p.attach(&interface, XdpFlags::DRV_MODE)
                    .expect("veth's native XDP");
            }
            _ => {
                let direction = if variant == Variant::TcEntry {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let p: &mut SchedClassifier =
                    ebpf.program_mut(program).unwrap().try_into().unwrap();
                p.load().unwrap();
                p.attach_with_options(
                    &interface,
                    direction,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .expect("a tcx link");
            }
        }
        ebpf
    })
    .join()
    .expect("attaching in the program's namespace");
    Some(attached)
}

/// What the loaded program has dropped so far, summed over CPUs.
fn program_drops(ebpf: &aya::Ebpf) -> u64 {
    let dropped: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("DROPPED").expect("the DROPPED map")).unwrap();
    dropped.get(&0, 0).unwrap().iter().sum()
}

struct Flood {
    sent: u64,
    delivered: u64,
    program_drops: u64,
    per_second: f64,
    cpu_ns: f64,
}

fn flood(t: &Topology, port: u16, seconds: f64) -> Flood {
    let addr = format!("{}:{port}", t.container_addr);
    let sink = KillOnDrop(
        spawn_traffic(
            Some(SINK_CPU),
            &t.container,
            None,
            &["udp-sink", &addr, "60"],
            true,
        )
        .unwrap(),
    );
    // The counters' own process starts fall outside the measured stretch: the UDP
    // counters are read before the CPU time at the start, after it at the end.
    let before = (udp_counters(&t.container), busy_ns());
    let start = std::time::Instant::now();
    let sent = finish(
        spawn_traffic(
            Some(SENDER_CPU),
            &t.outside,
            None,
            &["udp-flood", &addr, &seconds.to_string(), "64"],
            false,
        )
        .unwrap(),
    )
    .unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    // What is still queued is processed before the counters are read.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let busy = busy_ns();
    let after = (udp_counters(&t.container), busy);
    drop(sink);
    Flood {
        sent,
        delivered: (after.0 .0 + after.0 .1) - (before.0 .0 + before.0 .1),
        program_drops: 0,
        per_second: sent as f64 / elapsed,
        cpu_ns: (after.1 - before.1) as f64 / sent.max(1) as f64,
    }
}

fn main() {
    if !require_root("early_drop_placement bench") {
        return;
    }
    let rounds: usize = env_or("ROUNDS", 10);
    let seconds: f64 = env_or("FLOOD_SECONDS", 1.0);
    let topology = Topology::new().expect("building the outside/router/container namespaces");
    let (mut order, seed) = Shuffle::from_env();
    let mut results: Vec<Vec<Flood>> = Variant::ALL.iter().map(|_| Vec::new()).collect();
    let mut port = PORT;
    // One short untimed pass: first loads, page-ins and neighbour resolution.
    for variant in Variant::ALL {
        let _attached = attach(&topology, variant);
        port += 1;
        flood(&topology, port, 0.2);
    }
    for _ in 0..rounds {
        let mut this_round: Vec<usize> = (0..Variant::ALL.len()).collect();
        order.shuffle(&mut this_round);
        for v in this_round {
            let attached = attach(&topology, Variant::ALL[v]);
            port += 1;
            let mut result = flood(&topology, port, seconds);
            result.program_drops = attached.as_ref().map_or(0, program_drops);
            results[v].push(result);
        }
    }
    println!(
        "early drop's placement: 64-byte UDP floods outside -> router (the host) -> container over veth, sender on CPU {SENDER_CPU}, sink on CPU {SINK_CPU}; {rounds} rounds of {seconds} s, variants in a shuffled order each round (SEED={seed})"
    );
    println!("  datagrams sent per second and all CPUs' busy ns per datagram sent, median [interquartile range]; the host's share is that less the sender-only median");
    let stats = |v: usize| {
        (
            quartiles(results[v].iter().map(|f| f.per_second).collect()),
            quartiles(results[v].iter().map(|f| f.cpu_ns).collect()),
        )
    };
    let (base_rate, base_cpu) = stats(0);
    let (_, sender_cpu) = stats(1);
    for (v, variant) in Variant::ALL.iter().enumerate() {
        let (rate, cpu) = stats(v);
        let sent: u64 = results[v].iter().map(|f| f.sent).sum();
        let delivered: u64 = results[v].iter().map(|f| f.delivered).sum();
        let dropped: u64 = results[v].iter().map(|f| f.program_drops).sum();
        println!(
            "  {:<46} {:>8.0} sent/s [{:.0}..{:.0}]  {:>6.0} CPU ns/datagram [{:.0}..{:.0}], host {:>5.0}  vs forwarded: {:.3}x sent/s, {:.0} ns saved  ({sent} sent, {dropped} dropped by the program, {delivered} delivered)",
            variant.label(),
            rate.0,
            rate.1,
            rate.2,
            cpu.0,
            cpu.1,
            cpu.2,
            cpu.0 - sender_cpu.0,
            rate.0 / base_rate.0,
            base_cpu.0 - cpu.0,
        );
        if *variant != Variant::Forwarded && dropped * 100 < sent * 99 {
            println!(
                "  NOTE: {} dropped {dropped} of {sent} datagrams itself ({delivered} delivered): the rest was lost elsewhere, and its cost is not the placement's",
                variant.label()
            );
        }
    }
}
