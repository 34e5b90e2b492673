//! Early drop: when a container's softirq cost outruns what its quota can absorb (the
//! cpu.max controller forgives debt at the floor), the packets sent into it beyond what
//! the quota can pay for are dropped at its host-side veth, before its side of the pair
//! spends any softirq time on them. It lets go once nothing has had to be dropped for
//! [`CALM`].
//!
//! Enabled per container by the annotation [`ANNOTATION`] (`true`/`false`), or for all
//! by `enforcement.early_drop`. Acts in enforcement mode `cpumax`, on containers whose
//! network namespace is reached through a veth pair from the host's (bridge or routed
//! setups: Docker, podman, CNI bridge/ptp). Containers in the host's namespace, or
//! behind macvlan/ipvlan, are measured and quota-enforced but never dropped for; doved
//! says so once.
//!
//! Containers that share a network namespace (a Kubernetes pod) share its interfaces:
//! the first of them over budget limits them at its own rate and counts their drops; the
//! others wait until it lets go.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use dove_ebpf_common::Dropped;
use dove_proto::EarlyDropState;

use super::cpumax::CpuMax;
use super::interfaces::{host_veths_of, Interface};
use crate::bpf::ingress_limit::Tuning;
use crate::bpf::observer::Observer;

/// Per-container switch: `"true"` or `"false"` overrides `enforcement.early_drop`.
pub const ANNOTATION: &str = "io.dove.early-drop";
/// Released once this long passes with nothing dropped and the quota absorbing the cost.
pub const CALM: Duration = Duration::from_secs(2);
/// Admit this share of what the quota absorbs, so the debt the flood left drains.
pub const ADMIT_PERCENT: u64 = 80;
/// The bucket holds this much of a second's admitted cost: a burst the quota absorbs.
pub const BURST_MS: u64 = 50;
/// Interfaces are looked up again this often while limiting (a veth added meanwhile).
const RESCAN: Duration = Duration::from_secs(2);
/// Until a packet's cost is measured.
const DEFAULT_PACKET_COST_NS: u64 = 2_000;
/// No packet is priced under this: a price near zero would admit everything.
const MIN_PACKET_COST_NS: u64 = 100;
/// The bucket holds at least this many packets' worth, so a burst of a few always fits.
const MIN_BURST_PACKETS: u64 = 4;
/// Below this rate (1% of a CPU) a quota absorbs too little to admit anything useful:
/// early drop does not engage, and says so.
const MIN_RATE_NS_PER_S: u64 = 10_000_000;

type Member = (String, u64);

struct Tracked {
    cgroup_path: String,
    /// Limited interfaces, by index.
    interfaces: BTreeMap<u32, String>,
    /// Drops on interfaces limited before and since released.
    released_drops: Dropped,
    limiting: Option<Limiting>,
    /// (rx_ns, rx_packets) at the last tick.
    last_rx: Option<(u64, u64)>,
    packet_cost_ns: u64,
    rate_ns_per_s: u64,
    said_no_interface: bool,
    said_too_small: bool,
    /// Interfaces whose attach failed once (said once, retried quietly).
    failed: BTreeSet<u32>,
}

struct Limiting {
    /// Last time a drop was seen or the quota could not absorb the cost.
    busy_at: Instant,
    scanned_at: Instant,
    dropped_total: u64,
}

pub struct EarlyDrop {
    global: bool,
    cgroups: dove_cgroup::Hierarchy,
    /// How long a bucket drops without renewal: three control periods, at least 1 s.
    lease: Duration,
    members: HashMap<Member, Tracked>,
}

impl EarlyDrop {
    /// `global`: `enforcement.early_drop`; `cgroups`: the v2 hierarchy containers'
    /// processes are found in; `control_period`: how often [`Self::control`] runs.
    pub fn new(global: bool, cgroups: dove_cgroup::Hierarchy, control_period: Duration) -> Self {
        Self {
            global,
            cgroups,
            lease: (control_period * 3).max(Duration::from_secs(1)),
            members: HashMap::new(),
        }
    }

    /// Whether early drop applies to a container with these annotations.
    pub fn enabled_for(&self, annotations: &BTreeMap<String, String>) -> bool {
        match annotations.get(ANNOTATION).map(|v| v.trim()) {
            Some("true") => true,
            Some("false") => false,
            Some(other) => {
                tracing::warn!(
                    "annotation {ANNOTATION}={other:?} is neither \"true\" nor \"false\": using enforcement.early_drop = {}",
                    self.global
                );
                self.global
            }
            None => self.global,
        }
    }

    pub fn join(
        &mut self,
        id: &str,
        cgroup_id: u64,
        cgroup_path: &str,
        annotations: &BTreeMap<String, String>,
    ) {
        if !self.enabled_for(annotations) {
            return;
        }
        self.members.insert(
            (id.to_owned(), cgroup_id),
            Tracked {
                cgroup_path: cgroup_path.to_owned(),
                interfaces: BTreeMap::new(),
                released_drops: Dropped::default(),
                limiting: None,
                last_rx: None,
                packet_cost_ns: DEFAULT_PACKET_COST_NS,
                rate_ns_per_s: 0,
                said_no_interface: false,
                said_too_small: false,
                failed: BTreeSet::new(),
            },
        );
    }

    pub fn leave(&mut self, observer: &mut Observer, id: &str, cgroup_id: u64) {
        if let Some(mut tracked) = self.members.remove(&(id.to_owned(), cgroup_id)) {
            release(observer, &mut tracked);
        }
    }

    /// Stop dropping anything (doved stops).
    pub fn release_all(&mut self, observer: &mut Observer) {
        for tracked in self.members.values_mut() {
            release(observer, tracked);
        }
    }

    /// One control period, after the cpu.max controller's.
    pub fn control(&mut self, cpumax: &CpuMax, observer: &mut Observer, now: Instant) {
        for ((id, cgroup_id), tracked) in self.members.iter_mut() {
            if let Some(cost) = observer.cost_of(*cgroup_id) {
                if let Some((rx_ns, rx_packets)) = tracked.last_rx {
                    let ns = cost.rx_ns.saturating_sub(rx_ns);
                    let packets = cost.rx_packets.saturating_sub(rx_packets);
                    if let Some(per_packet) = ns.checked_div(packets) {
                        // A quarter of each new measurement: steady under noise, current
                        // within a second.
                        tracked.packet_cost_ns =
                            ((tracked.packet_cost_ns * 3 + per_packet) / 4).max(MIN_PACKET_COST_NS);
                    }
                }
                tracked.last_rx = Some((cost.rx_ns, cost.rx_packets));
            }
            let Some(budget) = cpumax.budget_of(id, *cgroup_id) else {
                release(observer, tracked);
                continue;
            };
            tracked.rate_ns_per_s = budget.absorbable_ns_per_s * ADMIT_PERCENT / 100;
            let lease = self.lease;
            if tracked.limiting.is_none() {
                if !budget.over {
                    continue;
                }
                if tracked.rate_ns_per_s < MIN_RATE_NS_PER_S {
                    if !tracked.said_too_small {
                        tracing::warn!(id, rate_ns_per_s = tracked.rate_ns_per_s, "over budget, but its quota above the floor absorbs less than 1% of a CPU: early drop would drop everything, so it does not engage");
                        tracked.said_too_small = true;
                    }
                    continue;
                }
                let found = match interfaces_of(&self.cgroups, &tracked.cgroup_path) {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::debug!(id, "early drop: finding the container's interfaces: {e}; retried next tick");
                        continue;
                    }
                };
                if found.is_empty() {
                    if !tracked.said_no_interface {
                        tracing::warn!(id, "over budget, but no veth leads from the host into its network namespace (host network, macvlan/ipvlan, or none): early drop cannot act; its quota stays at the floor");
                        tracked.said_no_interface = true;
                    }
                    continue;
                }
                limit(observer, tracked, found, lease);
                if tracked.interfaces.is_empty() {
                    // Its namespace's interfaces are limited for a sibling already (a pod),
                    // or attaching failed (said once).
                    continue;
                }
                tracing::info!(id, interfaces = ?tracked.interfaces.values().collect::<Vec<_>>(), rate_ns_per_s = tracked.rate_ns_per_s, packet_cost_ns = tracked.packet_cost_ns, "early drop: softirq cost outran the quota; traffic into the container beyond what it can pay for is dropped");
                tracked.limiting = Some(Limiting {
                    busy_at: now,
                    scanned_at: now,
                    dropped_total: 0,
                });
                continue;
            }
            let dropped = current_drops(observer, tracked).packets;
            let Some(limiting) = tracked.limiting.as_mut() else {
                continue;
            };
            if dropped != limiting.dropped_total || budget.over {
                limiting.busy_at = now;
                limiting.dropped_total = dropped;
            }
            if now.duration_since(limiting.busy_at) >= CALM {
                tracing::info!(
                    id,
                    dropped_packets = dropped,
                    "early drop: back under budget; nothing is dropped any more"
                );
                release(observer, tracked);
                continue;
            }
            if now.duration_since(limiting.scanned_at) >= RESCAN {
                limiting.scanned_at = now;
                // A failed lookup keeps what is limited.
                if let Ok(found) = interfaces_of(&self.cgroups, &tracked.cgroup_path) {
                    limit(observer, tracked, found, lease);
                }
            }
            retune(observer, tracked, lease);
        }
    }

    /// Early drop's state for container `id` (cgroup `cgroup_id`), if enabled for it.
    pub fn status_of(
        &self,
        observer: &mut Observer,
        id: &str,
        cgroup_id: u64,
    ) -> Option<EarlyDropState> {
        let tracked = self.members.get(&(id.to_owned(), cgroup_id))?;
        let dropped = current_drops(observer, tracked);
        Some(EarlyDropState {
            limiting: tracked.limiting.is_some(),
            interfaces: tracked.interfaces.values().cloned().collect(),
            rate_ns_per_s: tracked.rate_ns_per_s,
            packet_cost_ns: tracked.packet_cost_ns,
            dropped_packets: dropped.packets,
            dropped_bytes: dropped.bytes,
        })
    }
}

/// Every drop for `tracked`, on interfaces released or still limited.
fn current_drops(observer: &mut Observer, tracked: &Tracked) -> Dropped {
    let mut total = tracked.released_drops;
    if let Some((limiter, _)) = observer.ingress_limiter() {
        for &index in tracked.interfaces.keys() {
            let d = limiter.dropped(index);
            total.packets += d.packets;
            total.bytes += d.bytes;
        }
    }
    total
}

fn tuning(tracked: &Tracked, lease: Duration) -> Tuning {
    Tuning {
        rate_ns_per_s: tracked.rate_ns_per_s,
        burst_ns: (tracked.rate_ns_per_s * BURST_MS / 1000)
            .max(tracked.packet_cost_ns * MIN_BURST_PACKETS),
        packet_cost_ns: tracked.packet_cost_ns,
        lease,
    }
}

/// Limit `found` (the container's interfaces now), releasing those that are gone; the
/// ones already limited keep their buckets, and those limited for another container of
/// the same namespace stay that one's.
fn limit(observer: &mut Observer, tracked: &mut Tracked, found: Vec<Interface>, lease: Duration) {
    let Some((limiter, ebpf)) = observer.ingress_limiter() else {
        return;
    };
    let gone: Vec<u32> = tracked
        .interfaces
        .keys()
        .filter(|index| !found.iter().any(|i| i.index == **index))
        .copied()
        .collect();
    for index in gone {
        let d = limiter.dropped(index);
        tracked.released_drops.packets += d.packets;
        tracked.released_drops.bytes += d.bytes;
        limiter.release(ebpf, index);
        tracked.interfaces.remove(&index);
    }
    for interface in found {
        if tracked.interfaces.contains_key(&interface.index) || limiter.is_limited(interface.index)
        {
            continue;
        }
        match limiter.limit(
            ebpf,
            interface.index,
            &interface.name,
            tuning(tracked, lease),
        ) {
            Ok(()) => {
                tracked.failed.remove(&interface.index);
                tracked.interfaces.insert(interface.index, interface.name);
            }
            Err(e) if tracked.failed.insert(interface.index) => {
                tracing::error!("early drop: {e}")
            }
            Err(_) => {}
        }
    }
}

fn retune(observer: &mut Observer, tracked: &Tracked, lease: Duration) {
    if let Some((limiter, _)) = observer.ingress_limiter() {
        for &index in tracked.interfaces.keys() {
            limiter.retune(index, tuning(tracked, lease));
        }
    }
}

fn release(observer: &mut Observer, tracked: &mut Tracked) {
    if let Some((limiter, ebpf)) = observer.ingress_limiter() {
        for (index, _) in std::mem::take(&mut tracked.interfaces) {
            let d = limiter.dropped(index);
            tracked.released_drops.packets += d.packets;
            tracked.released_drops.bytes += d.bytes;
            limiter.release(ebpf, index);
        }
    }
    tracked.limiting = None;
}

/// The host-side veths into the network namespace of a process of the cgroup at `path`
/// (or of its descendants: systemd-style runtimes put the processes in a child). Empty
/// when the cgroup has no process; an error when the answer cannot be trusted.
///
/// The namespace is looked up by pid, so the pid must not change hands meanwhile: a
/// pidfd taken first, the process checked to be the container's, and the pidfd checked
/// after the lookup to show it did not exit (after which its pid could be reused).
fn interfaces_of(cgroups: &dove_cgroup::Hierarchy, path: &str) -> Result<Vec<Interface>, String> {
    let dir = cgroups.dir(path).map_err(|e| e.to_string())?;
    let Some(pid) = a_pid_in(&dir, 3) else {
        return Ok(Vec::new());
    };
    let pidfd = PidFd::open(pid).map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    if !in_cgroup(pid, path) {
        return Err(format!("process {pid} left the container's cgroup"));
    }
    let found = host_veths_of(pid).map_err(|e| e.to_string())?;
    if pidfd.exited() {
        return Err(format!("process {pid} exited during the lookup"));
    }
    Ok(found)
}

/// Whether process `pid` is in the cgroup v2 `path` or below it.
fn in_cgroup(pid: u32, path: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    let Some(own) = dove_cgroup::parse_proc_cgroup(&text).unified else {
        return false;
    };
    let path = path.trim_end_matches('/');
    own == path
        || own
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with('/'))
}

struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    fn open(pid: u32) -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor the call just opened, owned by nobody else.
        Ok(Self(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as i32)
        }))
    }

    /// A pidfd polls readable once its process has exited.
    fn exited(&self) -> bool {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            self.0.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_or(true, |n| n > 0)
    }
}

fn a_pid_in(dir: &Path, depth: u32) -> Option<u32> {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        // 0: a process in a pid namespace the reader cannot see.
        if let Some(pid) = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .find(|&pid| pid != 0)
        {
            return Some(pid);
        }
    }
    if depth == 0 {
        return None;
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| a_pid_in(&e.path(), depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process is in its own cgroup and below its parents, never in a sibling whose
    /// name merely starts the same.
    #[test]
    fn a_process_is_in_its_cgroup_and_below_its_ancestors_only() {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            return; // no cgroup v2 here
        };
        let pid = std::process::id();
        assert!(in_cgroup(pid, path));
        assert!(in_cgroup(pid, "/"), "everything is below the root");
        assert!(!in_cgroup(pid, &format!("{path}x")));
        if let Some((parent, _)) = path.rsplit_once('/').filter(|(p, _)| !p.is_empty()) {
            assert!(in_cgroup(pid, parent));
            assert!(!in_cgroup(pid, &format!("{parent}x")));
        }
    }

    /// A pidfd of a live process does not poll as exited; once the process is gone it does.
    #[test]
    fn a_pidfd_tells_when_its_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id()).unwrap();
        assert!(!pidfd.exited());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(pidfd.exited());
    }

    #[test]
    fn the_annotation_overrides_the_global_switch() {
        let cgroups = dove_cgroup::Hierarchy {
            mount_point: "/nonexistent".into(),
            root: String::new(),
        };
        let on = |v: &str| BTreeMap::from([(ANNOTATION.to_owned(), v.to_owned())]);
        let period = Duration::from_millis(100);
        let off_by_default = EarlyDrop::new(false, cgroups.clone(), period);
        assert!(off_by_default.enabled_for(&on("true")));
        assert!(!off_by_default.enabled_for(&on("false")));
        assert!(!off_by_default.enabled_for(&BTreeMap::new()));
        let on_by_default = EarlyDrop::new(true, cgroups, period);
        assert!(on_by_default.enabled_for(&BTreeMap::new()));
        assert!(!on_by_default.enabled_for(&on("false")));
        assert!(on_by_default.enabled_for(&on("yes please")));
    }
}
