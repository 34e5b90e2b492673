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
//! - XDP at the entry, keyed by the container's address (what a program at a host's NIC
//!   would have to do; on veth, XDP switches the entry to NAPI receive);
//! - tc ingress at the entry, keyed the same way;
//! - tc egress at the container's host-side veth, keyed by the interface: where doved's
//!   `dove_early_drop` stands.
//!
//! The programs (`ebpf/programs/src/drop_placement.rs`) each do one hash lookup and drop
//! what they match, so the placements are compared, not policies. Reported per variant:
//! median and interquartile range of datagrams sent per second and of all CPUs' busy
//! time (`/proc/stat`) per datagram sent, and what the container's namespace delivered
//! (its own UDP counters), which must be nothing when a variant drops.
//!
//! What veth cannot show: at a physical NIC, XDP runs before the kernel allocates an
//! skb, so it saves that allocation too; here the sender's stack already built one.
//!
//! Prints numbers; asserts nothing. Run as root:
//!     cargo bench -p dove-tests --bench early_drop_placement
//! ROUNDS (default 10) and FLOOD_SECONDS (default 1) tune the floods; SEED repeats an
//! order.

use std::net::Ipv4Addr;
use std::process::Command;

use aya::maps::HashMap;
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
        let outside_dev = format!("dpo{n}");
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
    XdpEntry,
    TcEntry,
    TcHostVeth,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Forwarded,
        Variant::XdpEntry,
        Variant::TcEntry,
        Variant::TcHostVeth,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Forwarded => "forwarded, nothing dropped",
            Variant::XdpEntry => "XDP at the entry, by address",
            Variant::TcEntry => "tc ingress at the entry, by address",
            Variant::TcHostVeth => "tc egress at the host-side veth (doved's)",
        }
    }
}

/// Load `variant`'s program and attach it in the router's namespace; it stays attached
/// until the returned object is dropped.
fn attach(t: &Topology, variant: Variant) -> Option<aya::Ebpf> {
    let (program, interface) = match variant {
        Variant::Forwarded => return None,
        Variant::XdpEntry => ("drop_xdp_entry", t.entry.clone()),
        Variant::TcEntry => ("drop_tc_entry", t.entry.clone()),
        Variant::TcHostVeth => ("drop_tc_host_veth", t.host_veth.clone()),
    };
    let netns = format!("/run/netns/{}", t.router);
    // The header's bytes, as the program reads them.
    let address = u32::from_ne_bytes(t.container_addr.octets());
    let index = t.host_veth_index;
    // Interface names resolve in the calling thread's namespace: attach from a thread
    // that joined the router's (the links outlive it; the thread's namespace does not
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
    .expect("attaching in the router's namespace");
    Some(attached)
}

struct Flood {
    sent: u64,
    delivered: u64,
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
    let after = (udp_counters(&t.container), busy_ns());
    drop(sink);
    Flood {
        sent,
        delivered: (after.0 .0 + after.0 .1) - (before.0 .0 + before.0 .1),
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
    for _ in 0..rounds {
        let mut this_round: Vec<usize> = (0..Variant::ALL.len()).collect();
        order.shuffle(&mut this_round);
        for v in this_round {
            let _attached = attach(&topology, Variant::ALL[v]);
            port += 1;
            results[v].push(flood(&topology, port, seconds));
        }
    }
    println!(
        "early drop's placement: 64-byte UDP floods outside -> router (the host) -> container over veth, sender on CPU {SENDER_CPU}, sink on CPU {SINK_CPU}; {rounds} rounds of {seconds} s, variants in a shuffled order each round (SEED={seed})"
    );
    println!("  datagrams sent per second and all CPUs' busy ns per datagram sent, median [interquartile range]");
    let stats = |v: usize| {
        (
            quartiles(results[v].iter().map(|f| f.per_second).collect()),
            quartiles(results[v].iter().map(|f| f.cpu_ns).collect()),
        )
    };
    let (base_rate, base_cpu) = stats(0);
    for (v, variant) in Variant::ALL.iter().enumerate() {
        let (rate, cpu) = stats(v);
        let sent: u64 = results[v].iter().map(|f| f.sent).sum();
        let delivered: u64 = results[v].iter().map(|f| f.delivered).sum();
        println!(
            "  {:<44} {:>8.0} sent/s [{:.0}..{:.0}]  {:>6.0} CPU ns/datagram [{:.0}..{:.0}]  vs forwarded: {:.3}x sent/s, {:.0} ns saved per datagram  ({sent} sent, {delivered} delivered)",
            variant.label(),
            rate.0,
            rate.1,
            rate.2,
            cpu.0,
            cpu.1,
            cpu.2,
            rate.0 / base_rate.0,
            base_cpu.0 - cpu.0,
        );
        if *variant != Variant::Forwarded && delivered * 100 > sent {
            println!(
                "  NOTE: {} delivered {delivered} of {sent} datagrams: its drop did not hold",
                variant.label()
            );
        }
    }
}
