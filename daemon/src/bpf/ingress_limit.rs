//! Early drop's mechanism: the `dove_early_drop` tc program at egress of a container's
//! host-side interfaces, and its token buckets. What to limit, and to what rate, is
//! decided in `enforce/early_drop.rs`.
//!
//! From kernel 6.6 the program attaches through a tcx link placed first on the interface
//! (so a CNI program that redirects or passes cannot skip it; others' links stay where
//! they are), owned by doved: when doved dies, the kernel removes it. Before 6.6 it is a
//! clsact filter (the kernel gives it a priority ahead of the filters already there),
//! which outlives a doved that is killed: such a filter passes everything once its
//! bucket's lease lapses, and the next doved removes it at start.

use std::collections::HashMap;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcAttachType};
use aya::programs::SchedClassifier;
use aya::util::KernelVersion;
use aya::Ebpf;
use dove_ebpf_common::{
    DropConfig, DropState, Dropped, DROPPED_MAP, DROP_CONFIG_MAP, DROP_STATE_MAP,
};

use super::observer::ObserverError;

pub const PROGRAM: &str = "dove_early_drop";

/// What a limited interface admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Softirq time per second admitted (ns/s).
    pub rate_ns_per_s: u64,
    /// Tokens the bucket holds at most (ns).
    pub burst_ns: u64,
    /// What one packet costs (ns).
    pub packet_cost_ns: u64,
    /// How long the bucket drops after this setting: renewed every control period, so
    /// only a stalled or dead doved lets it lapse, and then the program passes everything.
    pub lease: Duration,
}

/// `CLOCK_MONOTONIC` in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn config(tuning: Tuning) -> DropConfig {
    let rate = tuning.rate_ns_per_s.max(1);
    DropConfig {
        rate_ns_per_s: rate,
        burst_ns: tuning.burst_ns,
        burst_window_ns: (tuning.burst_ns as u128 * 1_000_000_000 / rate as u128) as u64,
        packet_cost_ns: tuning.packet_cost_ns.max(1),
        expires_ns: monotonic_ns() + tuning.lease.as_nanos() as u64,
    }
}

fn tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

pub struct IngressLimiter {
    configs: BpfHashMap<MapData, u32, DropConfig>,
    states: BpfHashMap<MapData, u32, DropState>,
    dropped: PerCpuHashMap<MapData, u32, Dropped>,
    /// Interface index → its link.
    links: HashMap<u32, SchedClassifierLinkId>,
}

impl IngressLimiter {
    /// Load the program (while doved still has CAP_BPF and CAP_NET_ADMIN) and take its
    /// maps; before 6.6, remove the filters a killed doved left behind. Attaching later
    /// needs only CAP_NET_ADMIN.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, ObserverError> {
        let program: &mut SchedClassifier = super::observer::program(ebpf, PROGRAM)?;
        program.load().map_err(|source| ObserverError::Program {
            what: format!("loading {PROGRAM}"),
            source,
        })?;
        if !tcx() {
            sweep_stale_filters();
        }
        Ok(Self {
            configs: super::observer::take(ebpf, DROP_CONFIG_MAP, BpfHashMap::try_from)?,
            states: super::observer::take(ebpf, DROP_STATE_MAP, BpfHashMap::try_from)?,
            dropped: super::observer::take(ebpf, DROPPED_MAP, PerCpuHashMap::try_from)?,
            links: HashMap::new(),
        })
    }

    pub fn attached(&self) -> usize {
        self.links.len()
    }

    pub fn is_limited(&self, index: u32) -> bool {
        self.links.contains_key(&index)
    }

    /// Limit what interface `index` (`name`) carries, attaching there first; the bucket
    /// starts full.
    pub fn limit(
        &mut self,
        ebpf: &mut Ebpf,
        index: u32,
        name: &str,
        tuning: Tuning,
    ) -> Result<(), ObserverError> {
        let map_error = |name: &'static str| {
            move |e: aya::maps::MapError| ObserverError::Map {
                name,
                detail: e.to_string(),
            }
        };
        let config = config(tuning);
        let state = DropState {
            epoch_ns: monotonic_ns().saturating_sub(config.burst_window_ns),
            spent_ns: 0,
        };
        // The bucket first: the program passes everything on an interface without one.
        self.states
            .insert(index, state, 0)
            .map_err(map_error(DROP_STATE_MAP))?;
        self.configs
            .insert(index, config, 0)
            .map_err(map_error(DROP_CONFIG_MAP))?;
        if self.links.contains_key(&index) {
            return Ok(());
        }
        let program: &mut SchedClassifier = super::observer::program(ebpf, PROGRAM)?;
        let options = if tcx() {
            TcAttachOptions::TcxOrder(LinkOrder::first())
        } else {
            // Someone else's clsact is as good as ours; it stays when we leave.
            if let Err(e) = tc::qdisc_add_clsact(name) {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    self.forget(index);
                    return Err(ObserverError::Program {
                        what: format!("adding a clsact qdisc to {name}"),
                        source: tc::TcError::NetlinkError { io_error: e }.into(),
                    });
                }
            }
            TcAttachOptions::Netlink(NlOptions::default())
        };
        let attached = program.attach_with_options(name, TcAttachType::Egress, options);
        let link = match attached {
            Ok(link) => link,
            Err(source) => {
                self.forget(index);
                return Err(ObserverError::Program {
                    what: format!("attaching {PROGRAM} at egress of {name}"),
                    source,
                });
            }
        };
        // The name was resolved again to attach: a veth re-created under it meanwhile
        // has another index, with no bucket.
        if nix::net::if_::if_nametoindex(name).ok() != Some(index) {
            let _ = program.detach(link);
            self.forget(index);
            return Err(ObserverError::Program {
                what: format!("{name} changed while {PROGRAM} attached to it; not limited"),
                source: aya::programs::ProgramError::NotAttached,
            });
        }
        self.links.insert(index, link);
        Ok(())
    }

    /// Update a limited interface's tuning and renew its lease. The bucket's fill is the
    /// program's and stays as it is.
    pub fn retune(&mut self, index: u32, tuning: Tuning) {
        if self.links.contains_key(&index) {
            let _ = self.configs.insert(index, config(tuning), 0);
        }
    }

    /// Stop limiting interface `index`: detach, and forget its bucket and counters (read
    /// [`Self::dropped`] first).
    pub fn release(&mut self, ebpf: &mut Ebpf, index: u32) {
        if let Some(link) = self.links.remove(&index) {
            if let Ok(program) = super::observer::program::<SchedClassifier>(ebpf, PROGRAM) {
                // Fails only when the interface is gone, which took the link with it.
                let _ = program.detach(link);
            }
        }
        self.forget(index);
    }

    fn forget(&mut self, index: u32) {
        let _ = self.configs.remove(&index);
        let _ = self.states.remove(&index);
        let _ = self.dropped.remove(&index);
    }

    /// What the program dropped on interface `index` since it was limited.
    pub fn dropped(&self, index: u32) -> Dropped {
        self.dropped
            .get(&index, 0)
            .map(|per_cpu| {
                per_cpu.iter().fold(Dropped::default(), |a, d| Dropped {
                    packets: a.packets + d.packets,
                    bytes: a.bytes + d.bytes,
                })
            })
            .unwrap_or_default()
    }
}

/// Remove the clsact filters named after the program from every interface (a doved
/// killed on a kernel without tcx leaves them; they pass everything, but cost a lookup
/// per packet and would pile up with each restart).
fn sweep_stale_filters() {
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return;
    };
    let mut removed = 0;
    for interface in interfaces.iter() {
        let Ok(name) = interface.name().to_str() else {
            continue;
        };
        if tc::qdisc_detach_program(name, TcAttachType::Egress, PROGRAM).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            interfaces = removed,
            "removed the early-drop filters a previous doved left attached"
        );
    }
}
