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
//! the first of them over budget sets the limit.

use std::collections::{BTreeMap, HashMap};
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
    members: HashMap<Member, Tracked>,
}

impl EarlyDrop {
    /// `global`: `enforcement.early_drop`; `cgroups`: the v2 hierarchy containers'
    /// processes are found in.
    pub fn new(global: bool, cgroups: dove_cgroup::Hierarchy) -> Self {
        Self {
            global,
            cgroups,
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
                    let (ns, packets) = (
                        cost.rx_ns.saturating_sub(rx_ns),
                        cost.rx_packets.saturating_sub(rx_packets),
                    );
                    if packets > 0 && ns > 0 {
                        // A quarter of each new measurement: steady under noise, current
                        // within a second.
                        tracked.packet_cost_ns = (tracked.packet_cost_ns * 3 + ns / packets) / 4;
                    }
                }
                tracked.last_rx = Some((cost.rx_ns, cost.rx_packets));
            }
            let Some(budget) = cpumax.budget_of(id, *cgroup_id) else {
                release(observer, tracked);
                continue;
            };
            tracked.rate_ns_per_s = budget.absorbable_ns_per_s * ADMIT_PERCENT / 100;
            if tracked.limiting.is_none() {
                if !budget.over {
                    continue;
                }
                let found = interfaces_of(&self.cgroups, &tracked.cgroup_path);
                if found.is_empty() {
                    if !tracked.said_no_interface {
                        tracing::warn!(id, "over budget, but no veth leads from the host into its network namespace (host network, macvlan/ipvlan, or none): early drop cannot act; its quota stays at the floor");
                        tracked.said_no_interface = true;
                    }
                    continue;
                }
                limit(observer, tracked, found);
                if tracked.interfaces.is_empty() {
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
                let found = interfaces_of(&self.cgroups, &tracked.cgroup_path);
                limit(observer, tracked, found);
            }
            retune(observer, tracked);
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

fn tuning(tracked: &Tracked) -> Tuning {
    Tuning {
        rate_ns_per_s: tracked.rate_ns_per_s.max(1),
        burst_ns: tracked.rate_ns_per_s * BURST_MS / 1000,
        packet_cost_ns: tracked.packet_cost_ns.max(1),
    }
}

/// Limit `found` (the container's interfaces now), releasing those that are gone; the
/// ones already limited keep their buckets.
fn limit(observer: &mut Observer, tracked: &mut Tracked, found: Vec<Interface>) {
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
        if tracked.interfaces.contains_key(&interface.index) {
            continue;
        }
        match limiter.limit(ebpf, interface.index, &interface.name, tuning(tracked)) {
            Ok(()) => {
                tracked.interfaces.insert(interface.index, interface.name);
            }
            Err(e) => tracing::error!("early drop: {e}"),
        }
    }
}

fn retune(observer: &mut Observer, tracked: &Tracked) {
    if let Some((limiter, _)) = observer.ingress_limiter() {
        for &index in tracked.interfaces.keys() {
            limiter.retune(index, tuning(tracked));
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
/// (or of its descendants: systemd-style runtimes put the processes in a child).
fn interfaces_of(cgroups: &dove_cgroup::Hierarchy, path: &str) -> Vec<Interface> {
    let Some(pid) = cgroups.dir(path).ok().and_then(|dir| a_pid_in(&dir, 3)) else {
        return Vec::new();
    };
    match host_veths_of(pid) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!("early drop: finding the container's interfaces: {e}");
            Vec::new()
        }
    }
}

fn a_pid_in(dir: &Path, depth: u32) -> Option<u32> {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
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

    #[test]
    fn the_annotation_overrides_the_global_switch() {
        let cgroups = dove_cgroup::Hierarchy {
            mount_point: "/nonexistent".into(),
            root: String::new(),
        };
        let on = |v: &str| BTreeMap::from([(ANNOTATION.to_owned(), v.to_owned())]);
        let off_by_default = EarlyDrop::new(false, cgroups.clone());
        assert!(off_by_default.enabled_for(&on("true")));
        assert!(!off_by_default.enabled_for(&on("false")));
        assert!(!off_by_default.enabled_for(&BTreeMap::new()));
        let on_by_default = EarlyDrop::new(true, cgroups);
        assert!(on_by_default.enabled_for(&BTreeMap::new()));
        assert!(!on_by_default.enabled_for(&on("false")));
        assert!(on_by_default.enabled_for(&on("yes please")));
    }
}
