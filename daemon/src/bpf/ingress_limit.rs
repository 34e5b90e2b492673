//! Early drop's mechanism: the `dove_early_drop` tc program at egress of a container's
//! host-side interfaces, and its token buckets. What to limit, and to what rate, is
//! decided in `enforce/early_drop.rs`.
//!
//! The program attaches through tcx links on kernels that have them (6.6), which stack
//! with other users' programs; before that, through a clsact filter of its own priority
//! (aya picks), next to any other filters. Links are doved's: when it stops, they go,
//! and nothing is dropped.

use std::collections::HashMap;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::SchedClassifier;
use aya::Ebpf;
use dove_ebpf_common::{DropBucket, Dropped, DROPPED_MAP, DROP_BUCKET_MAP};

use super::observer::ObserverError;

pub const PROGRAM: &str = "dove_early_drop";
/// How long a bucket drops after doved last renewed it: ticks renew it, so only a stalled
/// or dead doved lets it lapse, and then the program passes everything.
pub const LEASE: Duration = Duration::from_secs(1);

/// What a limited interface admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Softirq time per second admitted (ns/s).
    pub rate_ns_per_s: u64,
    /// Tokens the bucket holds at most (ns).
    pub burst_ns: u64,
    /// What one packet costs (ns).
    pub packet_cost_ns: u64,
}

/// `CLOCK_MONOTONIC` in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

pub struct IngressLimiter {
    buckets: BpfHashMap<MapData, u32, DropBucket>,
    dropped: PerCpuHashMap<MapData, u32, Dropped>,
    /// Interface index → its link.
    links: HashMap<u32, SchedClassifierLinkId>,
}

impl IngressLimiter {
    /// Load the program (while doved still has CAP_BPF and CAP_NET_ADMIN) and take its
    /// maps. Attaching later needs only CAP_NET_ADMIN.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, ObserverError> {
        let program: &mut SchedClassifier = super::observer::program(ebpf, PROGRAM)?;
        program.load().map_err(|source| ObserverError::Program {
            what: format!("loading {PROGRAM}"),
            source,
        })?;
        Ok(Self {
            buckets: super::observer::take(ebpf, DROP_BUCKET_MAP, BpfHashMap::try_from)?,
            dropped: super::observer::take(ebpf, DROPPED_MAP, PerCpuHashMap::try_from)?,
            links: HashMap::new(),
        })
    }

    pub fn attached(&self) -> usize {
        self.links.len()
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
        let bucket = DropBucket {
            rate_ns_per_s: tuning.rate_ns_per_s,
            burst_ns: tuning.burst_ns,
            packet_cost_ns: tuning.packet_cost_ns,
            tokens: tuning.burst_ns as i64,
            refilled_ns: monotonic_ns(),
            expires_ns: monotonic_ns() + LEASE.as_nanos() as u64,
        };
        let map_error = |e: aya::maps::MapError| ObserverError::Map {
            name: DROP_BUCKET_MAP,
            detail: e.to_string(),
        };
        // The bucket first: the program passes everything on an interface without one.
        self.buckets.insert(index, bucket, 0).map_err(map_error)?;
        if self.links.contains_key(&index) {
            return Ok(());
        }
        let program: &mut SchedClassifier = super::observer::program(ebpf, PROGRAM)?;
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        if !tcx {
            // Someone else's clsact is as good as ours; it stays when we leave.
            if let Err(e) = tc::qdisc_add_clsact(name) {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    let _ = self.buckets.remove(&index);
                    return Err(ObserverError::Program {
                        what: format!("adding a clsact qdisc to {name}"),
                        source: aya::programs::ProgramError::from(tc::TcError::NetlinkError {
                            io_error: e,
                        }),
                    });
                }
            }
        }
        match program.attach(name, TcAttachType::Egress) {
            Ok(link) => {
                self.links.insert(index, link);
                Ok(())
            }
            Err(source) => {
                let _ = self.buckets.remove(&index);
                Err(ObserverError::Program {
                    what: format!("attaching {PROGRAM} at egress of {name}"),
                    source,
                })
            }
        }
    }

    /// Update a limited interface's tuning and renew its lease, keeping its tokens (a
    /// refill the program makes between the read and the write is lost: a few packets'
    /// worth, once a tick).
    pub fn retune(&mut self, index: u32, tuning: Tuning) {
        if let Ok(mut bucket) = self.buckets.get(&index, 0) {
            bucket.rate_ns_per_s = tuning.rate_ns_per_s;
            bucket.burst_ns = tuning.burst_ns;
            bucket.packet_cost_ns = tuning.packet_cost_ns;
            bucket.expires_ns = monotonic_ns() + LEASE.as_nanos() as u64;
            let _ = self.buckets.insert(index, bucket, 0);
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
        let _ = self.buckets.remove(&index);
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
