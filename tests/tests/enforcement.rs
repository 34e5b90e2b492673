//! Enforcement on a stock kernel: the cpu.max controller against this host's `cpu`
//! controller (a v1 hierarchy here: `cpu.cfs_quota_us`), under real softirq cost.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dove_tests::*;

/// The container's cgroup in the `cpu` hierarchy (and, on v1, `cpuacct` for its usage),
/// with an 80 ms per 100 ms quota.
struct CpuCgroup {
    dir: PathBuf,
    /// v1 only: the same path in the `cpuacct` hierarchy.
    acct: Option<PathBuf>,
    v1: bool,
}

impl CpuCgroup {
    fn new(v2: &TestCgroup) -> Option<Self> {
        let v1_root = Path::new("/sys/fs/cgroup/cpu");
        let rel = v2.path.trim_start_matches('/');
        let (dir, acct, v1) = if v1_root.join("cpu.cfs_quota_us").exists() {
            let acct = Path::new("/sys/fs/cgroup/cpuacct").join(rel);
            std::fs::create_dir_all(&acct).ok()?;
            (v1_root.join(rel), Some(acct), true)
        } else {
            (v2.dir.clone(), None, false)
        };
        std::fs::create_dir_all(&dir).ok()?;
        let cg = Self { dir, acct, v1 };
        if cg.v1 {
            std::fs::write(cg.dir.join("cpu.cfs_period_us"), "100000").unwrap();
        }
        cg.set_quota_us(80_000);
        Some(cg)
    }

    /// A busy loop in this cgroup, as the container's own work: it runs at its quota, so
    /// CFS periods run and a lowered quota bites.
    fn busy(&self) -> KillOnDrop {
        let child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id().to_string();
        std::fs::write(self.dir.join("cgroup.procs"), &pid).unwrap();
        if let Some(acct) = &self.acct {
            std::fs::write(acct.join("cgroup.procs"), &pid).unwrap();
        }
        KillOnDrop(child)
    }

    /// CPU time the cgroup's tasks used, in ns.
    fn usage_ns(&self) -> u64 {
        match &self.acct {
            Some(acct) => std::fs::read_to_string(acct.join("cpuacct.usage"))
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
            None => {
                let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap();
                stat.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .unwrap()
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    * 1000
            }
        }
    }

    fn set_quota_us(&self, quota: u64) {
        if self.v1 {
            std::fs::write(self.dir.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
        } else {
            std::fs::write(self.dir.join("cpu.max"), format!("{quota} 100000")).unwrap();
        }
    }

    fn quota_us(&self) -> u64 {
        let text = if self.v1 {
            std::fs::read_to_string(self.dir.join("cpu.cfs_quota_us")).unwrap()
        } else {
            std::fs::read_to_string(self.dir.join("cpu.max")).unwrap()
        };
        text.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// The lowest quota seen within `within`, polling every 10 ms.
    fn lowest_within(&self, within: Duration) -> u64 {
        let end = Instant::now() + within;
        let mut lowest = u64::MAX;
        while Instant::now() < end {
            lowest = lowest.min(self.quota_us());
            std::thread::sleep(Duration::from_millis(10));
        }
        lowest
    }

    /// Wait until the quota reads under `threshold`: what it read then, and after how long.
    /// The controller writes at most once per five ticks, so a deep cut takes a few
    /// writes; the deadline is generous and the wait ends as soon as the cut shows.
    fn lowered_below(&self, threshold: u64, within: Duration) -> Option<(u64, Duration)> {
        let start = Instant::now();
        while start.elapsed() < within {
            let quota = self.quota_us();
            if quota < threshold {
                return Some((quota, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Wait until the quota reads `quota`; how long that took.
    fn back_to(&self, quota: u64, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.quota_us() == quota {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

/// How long a flood may take to show in the quota: a few writes, at most one per five
/// 100-ms ticks, on a CI machine that may be slow; the waits end as soon as it shows.
const LOWERING: Duration = Duration::from_millis(2500);

/// The flood shows in the quota (under 90% of the adopted 90 ms base) within [`LOWERING`].
fn expect_lowered(cpu: &CpuCgroup, daemon: &TempDaemon, step: &str) {
    let lowered = cpu.lowered_below(81_000, LOWERING);
    eprintln!("{step}: lowered {lowered:?}");
    assert!(
        lowered.is_some(),
        "{step}: not lowered, {} us\n{}",
        cpu.quota_us(),
        daemon.log_text()
    );
}

/// A 64-byte UDP flood into a sink in `ctr` for `seconds`, in the background.
fn flood(net: &NetPair, ctr: &TestCgroup, port: u16, seconds: f64) -> (KillOnDrop, KillOnDrop) {
    let addr = format!("{}:{port}", net.addr_b);
    let sink = net
        .spawn(&net.b, Some(ctr), &["udp-sink", &addr, "60"], true)
        .unwrap();
    let sender = net
        .spawn(
            &net.a,
            None,
            &["udp-flood", &addr, &seconds.to_string(), "64"],
            false,
        )
        .unwrap();
    (KillOnDrop(sender), KillOnDrop(sink))
}

/// The controller lowers a container's quota while its traffic costs softirq time and
/// gives it back when the cost stops, holding the container's own CPU plus its softirq
/// cost near its quota; a quota someone else sets meanwhile becomes the base; the base
/// comes back after a `kill -9` (at the next start, whatever was registered, and from
/// `doved --restore-quotas` as the unit's ExecStopPost runs it) and at unregistering.
#[test]
fn cpumax_lowers_the_quota_by_softirq_cost_and_always_restores_the_base() {
    if !require_root("cpumax_lowers_the_quota_by_softirq_cost_and_always_restores_the_base") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer_config("", "cpumax").unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-cpumax").unwrap();
    let cpu = CpuCgroup::new(&ctr).expect("a cpu controller to test against");
    let _work = cpu.busy();
    daemon.register(&ctr, "flooded");

    // 1. Under a flood the quota is lowered by about its cost, never under the 10% floor,
    //    and the container's own CPU plus its softirq cost stays near its quota.
    let traffic = flood(&net, &ctr, 5401, 5.0);
    let lowest = cpu.lowest_within(Duration::from_millis(1500));
    let attributed = || {
        daemon
            .stats()
            .containers
            .into_iter()
            .find(|c| c.id == "flooded")
            .map(|c| c.cost.total_ns)
            .unwrap_or(0)
    };
    let (usage0, attr0, t0) = (cpu.usage_ns(), attributed(), Instant::now());
    std::thread::sleep(Duration::from_millis(2500));
    let (usage1, attr1, t1) = (cpu.usage_ns(), attributed(), Instant::now());
    let quota_ns = (t1 - t0).as_nanos() as f64 * 0.8;
    let (usage, attr) = ((usage1 - usage0) as f64, (attr1 - attr0) as f64);
    let state = quota_state(&daemon, "flooded").expect("the container is enforced");
    eprintln!(
        "under a flood: lowest quota {lowest} us of 80000; over 2.5 s: own CPU {:.0} ms + softirq {:.0} ms = {:.2}x its quota ({:.0} ms); {state:?}",
        usage / 1e6,
        attr / 1e6,
        (usage + attr) / quota_ns,
        quota_ns / 1e6
    );
    assert!(
        lowest < 72_000,
        "a flood costing softirq time lowered the quota only to {lowest} us\n{}",
        daemon.log_text()
    );
    assert!(
        lowest >= 8_000,
        "the floor (10% of the base) did not hold: {lowest}"
    );
    assert!(
        attr > 0.1 * quota_ns,
        "the flood must cost enough softirq time to judge the controller: {:.0} ms",
        attr / 1e6
    );
    assert!(
        usage + attr <= 1.15 * quota_ns,
        "own CPU + softirq {:.2}x the quota (want at most 1.15x)",
        (usage + attr) / quota_ns
    );
    assert_eq!(state.base_quota_us, 80_000);
    assert_eq!(state.period_us, 100_000);
    assert!(state.softirq_per_period_us > 0);
    let status = run(std::process::Command::new(bin("dovectl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("status"))
    .unwrap();
    assert!(
        status.contains("enforcement:   cpumax")
            && status
                .lines()
                .any(|l| l.starts_with("flooded") && l.contains("80.0ms/100.0ms")),
        "{status}"
    );
    drop(traffic);
    let back = cpu.back_to(80_000, Duration::from_secs(3));
    eprintln!("back to the base {back:?} after the flood stopped");
    assert!(
        back.is_some(),
        "the quota never came back: {}",
        cpu.quota_us()
    );

    // 2. An external change while lowered is adopted, not overwritten.
    let traffic = flood(&net, &ctr, 5402, 8.0);
    let lowered = cpu.lowered_below(72_000, LOWERING);
    assert!(lowered.is_some(), "not lowered: {}", cpu.quota_us());
    cpu.set_quota_us(90_000);
    let adopted_by = Instant::now() + Duration::from_secs(3);
    let state = loop {
        let state = quota_state(&daemon, "flooded").unwrap();
        if state.base_quota_us == 90_000 || Instant::now() > adopted_by {
            break state;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(state.base_quota_us, 90_000, "not adopted in 3 s: {state:?}");
    let relowered = cpu.lowered_below(81_000, LOWERING);
    // The floor is the new base's (9 ms), not the old one's (8 ms).
    let lowest = cpu.lowest_within(Duration::from_millis(1000));
    eprintln!("lowered {lowered:?}; from the adopted base {relowered:?}, lowest {lowest}");
    assert!(
        relowered.is_some() && lowest >= 9_000,
        "lowered from the new base: {relowered:?}, lowest {lowest}"
    );
    drop(traffic);
    assert!(
        cpu.back_to(90_000, Duration::from_secs(3)).is_some(),
        "restored to the adopted base, not the old one: {}",
        cpu.quota_us()
    );

    // 3. kill -9 while lowered: the next start restores the base before serving.
    let traffic = flood(&net, &ctr, 5403, 6.0);
    expect_lowered(&cpu, &daemon, "step 3");
    daemon.kill9();
    let left = cpu.quota_us();
    drop(traffic);
    assert!(left < 90_000, "doved died with the quota lowered ({left})");
    daemon.spawn().unwrap();
    assert!(
        daemon
            .log_text()
            .contains("CFS quotas a previous doved had lowered were restored to their bases"),
        "{}",
        daemon.log_text()
    );
    // The cost left pending when doved died is still deducted, then the base returns.
    let back = cpu.back_to(90_000, Duration::from_secs(2));
    eprintln!("restart after kill -9: base back {back:?} after doved serves");
    assert!(back.is_some(), "{}", cpu.quota_us());

    // 4. Killed while lowered, restored with no doved running.
    let traffic = flood(&net, &ctr, 5404, 6.0);
    expect_lowered(&cpu, &daemon, "step 4");
    daemon.kill9();
    drop(traffic);
    assert!(cpu.quota_us() < 90_000);
    // What ExecStopPost runs, with nothing else running.
    let out = run(std::process::Command::new(bin("doved"))
        .arg("--config")
        .arg(&daemon.config)
        .arg("--state-dir")
        .arg(&daemon.state_dir)
        .arg("--restore-quotas"))
    .unwrap();
    assert!(out.contains("1 CFS quota(s) restored"), "{out}");
    assert_eq!(cpu.quota_us(), 90_000);
    daemon.spawn().unwrap();

    // 5. Unregistering gives the base back at once, and the ledger is empty after.
    //    (Unregistering while doved is down is 3.: the next start restores every base.)
    let traffic = flood(&net, &ctr, 5405, 6.0);
    expect_lowered(&cpu, &daemon, "step 5");
    daemon.unregister("flooded", None);
    assert!(
        cpu.back_to(90_000, Duration::from_millis(500)).is_some(),
        "unregistered, still lowered: {}",
        cpu.quota_us()
    );
    assert_eq!(cpu.lowest_within(Duration::from_millis(300)), 90_000);
    drop(traffic);
    let ledger = std::fs::read_to_string(daemon.state_dir.join("quota-bases.json")).unwrap();
    assert!(
        !ledger.contains("cpu"),
        "the ledger still holds a base: {ledger}"
    );
}

/// Containers without a quota are left alone (and said so), and unlimited stays unlimited.
#[test]
fn cpumax_leaves_containers_without_a_quota_alone() {
    if !require_root("cpumax_leaves_containers_without_a_quota_alone") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer_config("", "cpumax").unwrap();
    let net = NetPair::new().unwrap();
    let ctr = TestCgroup::new("dove-test-unlimited").unwrap();
    let cpu = CpuCgroup::new(&ctr).unwrap();
    if cpu.v1 {
        std::fs::write(cpu.dir.join("cpu.cfs_quota_us"), "-1").unwrap();
    } else {
        std::fs::write(cpu.dir.join("cpu.max"), "max 100000").unwrap();
    }
    daemon.register(&ctr, "unlimited");
    let traffic = flood(&net, &ctr, 5411, 1.5);
    std::thread::sleep(Duration::from_millis(1000));
    drop(traffic);
    let quota = if cpu.v1 {
        std::fs::read_to_string(cpu.dir.join("cpu.cfs_quota_us")).unwrap()
    } else {
        std::fs::read_to_string(cpu.dir.join("cpu.max")).unwrap()
    };
    assert!(
        quota.starts_with("-1") || quota.starts_with("max"),
        "{quota}"
    );
    assert_eq!(quota_state(&daemon, "unlimited"), None);
    assert!(
        daemon.log_text().contains("cpumax leaves it alone"),
        "{}",
        daemon.log_text()
    );
}

/// A container's network namespace reached from the host through a veth pair, as
/// Docker, podman and CNI bridge/ptp set it up: the host side in this namespace.
struct HostVeth {
    ns: String,
    host_dev: String,
    ctr_dev: String,
    ctr_addr: String,
}

impl HostVeth {
    fn new() -> Self {
        let n = std::process::id() % 200 + 20;
        let link = Self {
            ns: unique("dove-nc"),
            host_dev: format!("dvh{n}"),
            ctr_dev: format!("dvc{n}"),
            ctr_addr: format!("10.79.{n}.2"),
        };
        let ip = |args: &[&str]| {
            run(std::process::Command::new("ip").args(args)).unwrap();
        };
        ip(&["netns", "add", &link.ns]);
        ip(&[
            "link",
            "add",
            &link.host_dev,
            "type",
            "veth",
            "peer",
            "name",
            &link.ctr_dev,
            "netns",
            &link.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("10.79.{n}.1/24"),
            "dev",
            &link.host_dev,
        ]);
        ip(&["link", "set", &link.host_dev, "up"]);
        ip(&[
            "-n",
            &link.ns,
            "addr",
            "add",
            &format!("{}/24", link.ctr_addr),
            "dev",
            &link.ctr_dev,
        ]);
        ip(&["-n", &link.ns, "link", "set", &link.ctr_dev, "up"]);
        ip(&["-n", &link.ns, "link", "set", "lo", "up"]);
        link
    }

    /// `dove-traffic ARGS` inside the container: its namespace and cgroups.
    fn spawn_inside(
        &self,
        ctr: &TestCgroup,
        cpu: &CpuCgroup,
        args: &[&str],
    ) -> std::process::Child {
        let mut script = format!("echo $$ > {}/cgroup.procs && ", ctr.dir.display());
        script.push_str(&format!("echo $$ > {}/cgroup.procs && ", cpu.dir.display()));
        if let Some(acct) = &cpu.acct {
            script.push_str(&format!("echo $$ > {}/cgroup.procs && ", acct.display()));
        }
        script.push_str("exec ip netns exec \"$0\" \"$@\"");
        let mut child = std::process::Command::new("sh")
            .args(["-c", &script, &self.ns])
            .arg(bin("dove-traffic"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = [0u8; 6];
        use std::io::Read;
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut line)
            .unwrap();
        assert_eq!(&line, b"ready\n");
        child
    }

    /// `dove-traffic ARGS` in the host's namespace.
    fn spawn_outside(&self, args: &[&str]) -> std::process::Child {
        std::process::Command::new(bin("dove-traffic"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Packets the host side's veth dropped itself (its peer's backlog full).
    fn host_tx_dropped(&self) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/tx_dropped", self.host_dev);
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Names of the programs at tc egress of the host side, as the kernel lists them
    /// (BPF_PROG_QUERY on its tcx egress hook; Debian's bpftool predates tcx).
    fn programs(&self) -> Vec<String> {
        use aya::programs::{tc::TcAttachType, SchedClassifier};
        let (_, programs) = SchedClassifier::query_tcx(&self.host_dev, TcAttachType::Egress)
            .expect("querying the interface's tcx programs");
        programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    }
}

impl Drop for HostVeth {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

/// A field of the Udp line in this namespace's /proc/net/snmp.
fn udp_counter(field: &str) -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names.split_whitespace().position(|n| n == field).unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

fn register_with_early_drop(
    daemon: &TempDaemon,
    ctr: &TestCgroup,
    cpu: &CpuCgroup,
    id: &str,
    on: bool,
) {
    let mut registration = ctr.registration(id);
    registration.cpu_cgroup_path = cpu.v1.then(|| ctr.path.clone());
    registration
        .annotations
        .insert("io.dove.early-drop".into(), on.to_string());
    match daemon
        .client()
        .call(dove_proto::Request::Register {
            container: registration,
        })
        .unwrap()
    {
        dove_proto::Reply::Registered { .. } => {}
        other => panic!("{other:?}"),
    }
}

/// Own CPU plus attributed softirq over `over`, as a multiple of the quota.
fn cost_over_quota(
    daemon: &TempDaemon,
    cpu: &CpuCgroup,
    id: &str,
    quota_share: f64,
    over: Duration,
) -> f64 {
    let attributed = || {
        daemon
            .stats()
            .containers
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.cost.total_ns)
            .unwrap_or(0)
    };
    let (usage0, attr0, t0) = (cpu.usage_ns(), attributed(), Instant::now());
    std::thread::sleep(over);
    let (usage1, attr1, t1) = (cpu.usage_ns(), attributed(), Instant::now());
    let quota_ns = (t1 - t0).as_nanos() as f64 * quota_share;
    let ratio = ((usage1 - usage0) + (attr1 - attr0)) as f64 / quota_ns;
    eprintln!(
        "{id}: own CPU {:.0} ms + softirq {:.0} ms over {:.1} s = {ratio:.2}x its quota",
        (usage1 - usage0) as f64 / 1e6,
        (attr1 - attr0) as f64 / 1e6,
        (t1 - t0).as_secs_f64()
    );
    ratio
}

fn early_drop_state(daemon: &TempDaemon, id: &str) -> Option<dove_proto::EarlyDropState> {
    daemon
        .stats()
        .containers
        .into_iter()
        .find(|c| c.id == id)
        .and_then(|c| c.early_drop)
}

/// A flood a small quota cannot absorb: without early drop the container's own CPU plus
/// its softirq cost runs far over its quota (the controller sits at the floor and
/// forgives); with it, the traffic into the container beyond what its quota pays for is
/// dropped at its host-side veth, the kernel's own UDP counters agree with DOVE's drop
/// count, and once the flood stops the program leaves the interface and TCP gets through.
#[test]
fn early_drop_holds_a_flood_to_what_the_quota_absorbs_and_lets_go_after() {
    if !require_root("early_drop_holds_a_flood_to_what_the_quota_absorbs_and_lets_go_after") {
        return;
    }
    let _serial = serial();
    let mut daemon = TempDaemon::with_observer_config("", "cpumax").unwrap();
    let link = HostVeth::new();
    let ctr = TestCgroup::new("dove-test-early-drop").unwrap();
    let cpu = CpuCgroup::new(&ctr).expect("a cpu controller to test against");
    // 10% of a CPU: 9 points above the floor, far less than the flood costs (24-40% of
    // a CPU here, depending on what else the machine runs).
    cpu.set_quota_us(10_000);
    let _work = cpu.busy();
    let addr = |port: u16| format!("{}:{port}", link.ctr_addr);

    // 1. Early drop off: the flood escapes the quota.
    register_with_early_drop(&daemon, &ctr, &cpu, "flooded", false);
    let sink = KillOnDrop(link.spawn_inside(&ctr, &cpu, &["udp-sink", &addr(5501), "30"]));
    let flood = KillOnDrop(link.spawn_outside(&["udp-flood", &addr(5501), "5", "64"]));
    std::thread::sleep(Duration::from_millis(2000));
    let escaped = cost_over_quota(&daemon, &cpu, "flooded", 0.1, Duration::from_millis(2000));
    let state = early_drop_state(&daemon, "flooded");
    drop((flood, sink));
    assert_eq!(state, None, "early drop is off for this container");
    assert!(
        escaped > 1.4,
        "the flood must cost more than the quota absorbs for this test to judge early drop: {escaped:.2}x"
    );
    daemon.unregister("flooded", None);
    std::thread::sleep(Duration::from_millis(300));

    // 2. Early drop on: it limits within a few seconds and holds the total near the quota.
    //    Someone else's tc filter on the interface stays where it is.
    let tc = |args: &[&str]| run(std::process::Command::new("tc").args(args)).unwrap();
    tc(&["qdisc", "add", "dev", &link.host_dev, "clsact"]);
    // (u32 is the classifier this host's kernel has; it only classifies.)
    tc(&[
        "filter",
        "add",
        "dev",
        &link.host_dev,
        "egress",
        "protocol",
        "all",
        "prio",
        "7",
        "u32",
        "match",
        "u32",
        "0",
        "0",
        "classid",
        "1:1",
    ]);
    register_with_early_drop(&daemon, &ctr, &cpu, "flooded", true);
    let (sndbuf0, vethdrop0) = (udp_counter("SndbufErrors"), link.host_tx_dropped());
    let sink = KillOnDrop(link.spawn_inside(&ctr, &cpu, &["udp-sink", &addr(5502), "30"]));
    let flood = link.spawn_outside(&["udp-flood", &addr(5502), "10", "64"]);
    let start = Instant::now();
    let limited_after = loop {
        if early_drop_state(&daemon, "flooded").is_some_and(|s| s.limiting) {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "early drop never started: {:?}\n{}",
            daemon.stats().containers,
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        link.programs().iter().any(|p| p == "dove_early_drop"),
        "the kernel lists no early-drop program at {}: {:?}",
        link.host_dev,
        link.programs()
    );
    std::thread::sleep(Duration::from_millis(1000));
    let held = cost_over_quota(&daemon, &cpu, "flooded", 0.1, Duration::from_millis(3000));
    let state = early_drop_state(&daemon, "flooded").unwrap();
    eprintln!("limiting after {limited_after:?}: {state:?}");
    assert!(
        held <= 1.15,
        "with early drop the container's own CPU plus softirq is {held:.2}x its quota (want at most 1.15x; {escaped:.2}x without)"
    );
    assert!(state.limiting && state.dropped_packets > 0, "{state:?}");
    assert_eq!(state.interfaces, vec![link.host_dev.clone()]);

    // A stalled doved (stopped: its program stays attached) stops dropping once its
    // lease on the bucket lapses, as one killed on a kernel without tcx would (a clsact
    // filter outlives its process). The kernel's counter of failed sends stops.
    // The veth's own drops count in both counters, one a moment after the other.
    let kernel_drops = || udp_counter("SndbufErrors") as i64 - link.host_tx_dropped() as i64;
    daemon.freeze();
    let dropping = kernel_drops();
    std::thread::sleep(Duration::from_millis(300));
    let dropping = kernel_drops() - dropping;
    std::thread::sleep(Duration::from_millis(1200));
    let lapsed = kernel_drops();
    std::thread::sleep(Duration::from_millis(500));
    let lapsed = kernel_drops() - lapsed;
    daemon.thaw();
    eprintln!(
        "doved stopped: {dropping} drops in 300 ms, {lapsed} in 500 ms once its lease lapsed"
    );
    assert!(
        dropping > 0,
        "the program must still be dropping right after the stop"
    );
    // A veth drop between the two counters' reads reads as one either way; the program
    // drops thousands in this time.
    assert!(
        lapsed.abs() <= 2,
        "a stalled doved's bucket went on dropping ({lapsed})"
    );
    let _ = finish(flood);
    drop(sink);

    // 3. The flood is over: early drop lets go, the program leaves, TCP gets through.
    let start = Instant::now();
    while early_drop_state(&daemon, "flooded").is_some_and(|s| s.limiting) {
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "still limiting {:?} after the flood stopped",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("released {:?} after the flood stopped", start.elapsed());
    assert!(
        link.programs().is_empty(),
        "released, yet the kernel still lists programs: {:?}",
        link.programs()
    );
    let filters = tc(&["filter", "show", "dev", &link.host_dev, "egress"]);
    assert!(
        filters.contains("pref 7 u32"),
        "the other filter is gone: {filters}"
    );
    // DOVE's count against the kernel's: every packet the program dropped failed its
    // send with ENOBUFS, which UDP counts as SndbufErrors (less the veth's own drops).
    let kernel = (udp_counter("SndbufErrors") - sndbuf0) - (link.host_tx_dropped() - vethdrop0);
    let state = early_drop_state(&daemon, "flooded").unwrap();
    eprintln!(
        "dropped: DOVE {} packets ({} bytes), kernel {kernel}",
        state.dropped_packets, state.dropped_bytes
    );
    assert!(
        state.dropped_packets.abs_diff(kernel) as f64 <= 0.02 * kernel as f64 + 10.0,
        "DOVE counted {} drops, the kernel {kernel}",
        state.dropped_packets
    );
    let sink = link.spawn_inside(&ctr, &cpu, &["tcp-sink", &addr(5503), "20"]);
    let sender = link.spawn_outside(&["tcp-send", &addr(5503), "4000000"]);
    let _ = finish(sender);
    let received = finish(sink).unwrap();
    assert_eq!(received, 4_000_000, "TCP after early drop let go");
    let metrics = daemon.scrape().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dove_early_drop_packets_total{")
                && l.contains("container_id=\"flooded\"")
                && !l.ends_with(" 0")),
        "{metrics}"
    );

    // 4. kill -9 while limiting: the kernel removes the program with doved; the next
    //    doved limits again with exactly one.
    let sink = KillOnDrop(link.spawn_inside(&ctr, &cpu, &["udp-sink", &addr(5504), "30"]));
    let flood = KillOnDrop(link.spawn_outside(&["udp-flood", &addr(5504), "12", "64"]));
    let limiting = |daemon: &TempDaemon| {
        let start = Instant::now();
        while !early_drop_state(daemon, "flooded").is_some_and(|s| s.limiting) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    limiting(&daemon);
    daemon.kill9();
    assert!(
        link.programs().is_empty(),
        "doved is dead, yet the kernel lists {:?}",
        link.programs()
    );
    daemon.spawn().unwrap();
    limiting(&daemon);
    assert_eq!(link.programs(), vec!["dove_early_drop".to_owned()]);
    drop((flood, sink));
}
