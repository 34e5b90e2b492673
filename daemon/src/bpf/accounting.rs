//! The observer's own thread: the only place the eBPF maps are changed and read.
//!
//! It applies the registry's events to the observer (a slot per registered cgroup), runs
//! the aggregation tick, publishes each snapshot to telemetry, and turns every removal
//! into a bill in the ledger before settling it with the registry. Nothing else holds
//! the observer, so no lock is held across components and neither registration nor the
//! async runtime waits for a tick.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dove_proto::{Bill, Container};

use crate::bills::Ledger;
use crate::bpf::observer::{cgroup_level, quota_dir, Cost, Observer};
use crate::enforce::cpumax::CpuMax;
use crate::enforce::early_drop::EarlyDrop;
use crate::registry::{Departure, Registry, RegistryEvent, Subscription};
use crate::telemetry::Telemetry;

const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The thread the accounting runs on, started while doved still holds its capabilities.
/// It keeps the ones it needs for life and drops the rest at once, before the main
/// thread drops all of its own: attaching the socket programs at a cgroup when a
/// container registers needs CAP_NET_ADMIN (`BPF_LINK_CREATE` checks it for cgroup_skb
/// programs), and kernels before 6.0 check CAP_BPF on every map update.
pub struct AccountingThread {
    work: SyncSender<Box<dyn FnOnce() + Send>>,
    thread: JoinHandle<()>,
}

impl AccountingThread {
    /// Start the thread; it keeps `keep` and nothing else.
    pub fn reserve(keep: Vec<caps::Capability>) -> Result<Self, String> {
        let (work, jobs) = std::sync::mpsc::sync_channel::<Box<dyn FnOnce() + Send>>(1);
        let (dropped, outcome) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("dove-accounting".into())
            .spawn(move || {
                let result = crate::bpf::observer::drop_capabilities(&keep);
                let failed = result.is_err();
                let _ = dropped.send(result);
                if failed {
                    return;
                }
                if let Ok(job) = jobs.recv() {
                    job();
                }
            })
            .map_err(|e| format!("starting the accounting thread: {e}"))?;
        match outcome.recv() {
            Ok(Ok(())) => Ok(Self { work, thread }),
            Ok(Err(e)) => Err(format!("the accounting thread: {e}")),
            Err(_) => Err("the accounting thread died while dropping capabilities".into()),
        }
    }

    /// Run `job` on the thread; join the handle to wait for it.
    pub fn run(self, job: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
        // The thread waits for exactly this one job, so the send cannot block or fail
        // unless the thread is gone, which the join then reports.
        let _ = self.work.send(Box::new(job));
        self.thread
    }
}

pub struct Accounting {
    observer: Observer,
    registry: Arc<Registry>,
    ledger: Arc<Ledger>,
    telemetry: Arc<Telemetry>,
    /// The `cpu` controller's hierarchy, when the kernel charges quotas.
    enforce_in: Option<dove_cgroup::Hierarchy>,
    /// cgroup ID → the container IDs registered with it (one cgroup may carry several
    /// IDs after a runtime re-registered it under a new one).
    holders: HashMap<u64, BTreeSet<String>>,
    /// Bills the ledger could not take yet (disk full): retried every tick.
    unrecorded: Vec<(Departure, Bill)>,
    /// The cpu.max controller, in enforcement mode `cpumax`, and early drop with it.
    cpumax: Option<(CpuMax, EarlyDrop)>,
    last_control: Instant,
    /// Containers cpumax found no quota for, by (ID, cgroup ID) → the cgroup path the
    /// quota is looked up from and the container's cgroup level: a quota set later
    /// (`docker update --cpus`, a resize) is found within [`QUOTA_RECHECK`] and enforced
    /// from then on.
    unquoted: BTreeMap<(String, u64), (String, u32)>,
    next_quota_check: Instant,
}

/// How often containers without a quota are looked at again.
const QUOTA_RECHECK: Duration = Duration::from_secs(1);

impl Accounting {
    /// Bring the observer in line with the registry (bill what left while doved was
    /// down, add every container, release slots nobody holds) and publish the first
    /// snapshot, so that the daemon serves real numbers from its first request.
    pub fn start(
        observer: Observer,
        subscription: &Subscription,
        registry: Arc<Registry>,
        ledger: Arc<Ledger>,
        telemetry: Arc<Telemetry>,
        enforce_in: Option<dove_cgroup::Hierarchy>,
        cpumax: Option<(CpuMax, EarlyDrop)>,
    ) -> Self {
        let mut this = Self {
            observer,
            registry,
            ledger,
            telemetry,
            enforce_in,
            holders: HashMap::new(),
            unrecorded: Vec::new(),
            cpumax,
            last_control: Instant::now(),
            unquoted: BTreeMap::new(),
            next_quota_check: Instant::now() + QUOTA_RECHECK,
        };
        // Live containers first, so a departure that shares a cgroup with one leaves the
        // cost with it; then the departures, whose slots survived in the pinned maps.
        for container in &subscription.containers {
            this.registered(container);
        }
        for departure in &subscription.departures {
            this.removed(departure.clone());
        }
        let keep = this.holders.keys().copied().collect();
        this.observer.retain(&keep);
        this.publish();
        this
    }

    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    /// Run until `stop`, then publish a last snapshot.
    pub fn run(mut self, subscription: Subscription, tick: Duration, stop: Arc<AtomicBool>) {
        let events = subscription.events;
        let mut next_tick = Instant::now() + tick;
        let mut next_prune = Instant::now() + PRUNE_EVERY;
        while !stop.load(Ordering::Acquire) {
            match events.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(RegistryEvent::Registered(c)) => self.registered(&c),
                Ok(RegistryEvent::Removed(d)) => self.removed(d),
                Err(RecvTimeoutError::Timeout) => {}
                // The registry is gone: only the shutdown is left to wait for.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(tick),
            }
            let now = Instant::now();
            if now >= next_tick {
                self.retry_unrecorded();
                self.publish();
                next_tick = (next_tick + tick).max(now);
            }
            if now >= next_prune {
                if let Err(e) = self.ledger.prune(false) {
                    tracing::error!("{e}");
                }
                next_prune = now + PRUNE_EVERY;
            }
        }
        self.publish();
        if let Some((cpumax, early_drop)) = &mut self.cpumax {
            early_drop.release_all(&mut self.observer);
            cpumax.restore_all();
        }
    }

    fn publish(&mut self) {
        let snapshot = self.observer.tick();
        if self.cpumax.is_some() && Instant::now() >= self.next_quota_check {
            self.next_quota_check = Instant::now() + QUOTA_RECHECK;
            self.find_new_quotas();
        }
        if let Some((cpumax, early_drop)) = &mut self.cpumax {
            let now = Instant::now();
            let observer = &self.observer;
            cpumax.control(
                |group| observer.take_pending(group),
                now - self.last_control,
            );
            self.last_control = now;
            early_drop.control(cpumax, &mut self.observer, now);
            let mut quotas = HashMap::new();
            let mut drops = HashMap::new();
            for (cgroup_id, ids) in &self.holders {
                for id in ids {
                    if let Some(s) = cpumax.status_of(id, *cgroup_id) {
                        quotas.insert(id.clone(), s);
                    }
                    if let Some(s) = early_drop.status_of(&mut self.observer, id, *cgroup_id) {
                        drops.insert(id.clone(), s);
                    }
                }
            }
            self.telemetry.publish_enforcement(quotas, drops);
        }
        self.telemetry.publish(snapshot);
    }

    fn registered(&mut self, container: &Container) {
        let reg = &container.registration;
        let holders = self.holders.entry(reg.cgroup_id).or_default();
        if holders.is_empty() {
            self.observer.hook_sockets(&reg.cgroup_path);
        }
        holders.insert(reg.id.clone());
        let quota = self.enforce_in.as_ref().and_then(|cpu| {
            quota_dir(
                cpu,
                reg.cpu_cgroup_path.as_deref().unwrap_or(&reg.cgroup_path),
            )
        });
        if let Some((cpumax, early_drop)) = &mut self.cpumax {
            if container.registered_by == 0 {
                let key = (reg.id.clone(), reg.cgroup_id);
                if quota.is_some() {
                    self.unquoted.remove(&key);
                } else {
                    let path = reg.cpu_cgroup_path.as_deref().unwrap_or(&reg.cgroup_path);
                    self.unquoted
                        .insert(key, (path.to_owned(), cgroup_level(&reg.cgroup_path)));
                }
                cpumax.join(&reg.id, reg.cgroup_id, quota.clone());
                early_drop.join(&reg.id, reg.cgroup_id, &reg.cgroup_path, &reg.annotations);
            } else {
                // Its cgroup lies in a subtree delegated to that user, and the nearest quota
                // above it may be a whole slice of other tenants'.
                tracing::info!(id = %reg.id, uid = container.registered_by, "registered by a non-root user: cpumax measures it but never lowers a quota for it");
            }
        }
        if let Err(e) = self.observer.add(
            reg.cgroup_id,
            cgroup_level(&reg.cgroup_path),
            quota.map(|(group, _)| group),
        ) {
            tracing::error!(id = %reg.id, "container's traffic will be unattributed: {e}");
        }
    }

    /// Enforce on the containers that had no quota and have one now.
    fn find_new_quotas(&mut self) {
        let (Some(cpu), Some((cpumax, _))) = (self.enforce_in.as_ref(), self.cpumax.as_mut())
        else {
            return;
        };
        let mut found = Vec::new();
        for ((id, cgroup_id), (path, level)) in &self.unquoted {
            if let Some(quota) = quota_dir(cpu, path) {
                tracing::info!(id, quota_cgroup = %quota.1.display(), "a CFS quota appeared above the container: cpumax enforces on it from now");
                cpumax.join(id, *cgroup_id, Some(quota.clone()));
                found.push(((id.clone(), *cgroup_id), *level, quota.0));
            }
        }
        for (key, level, group) in found {
            self.unquoted.remove(&key);
            // Already added at its level: this routes its pending cost to the group.
            if let Err(e) = self.observer.add(key.1, level, Some(group)) {
                tracing::error!(id = %key.0, "{e}");
            }
        }
    }

    fn removed(&mut self, departure: Departure) {
        let reg = &departure.container.registration;
        self.unquoted.remove(&(reg.id.clone(), reg.cgroup_id));
        if let Some((cpumax, early_drop)) = &mut self.cpumax {
            early_drop.leave(&mut self.observer, &reg.id, reg.cgroup_id);
            cpumax.leave(&reg.id, reg.cgroup_id);
        }
        if let Some(ids) = self.holders.get_mut(&reg.cgroup_id) {
            ids.remove(&reg.id);
            if !ids.is_empty() {
                // The cgroup's cost goes on with the IDs still registered to it.
                tracing::info!(id = %reg.id, cgroup = %reg.cgroup_path, "removed; its cgroup stays registered under another ID, which the cost goes on with");
                self.registry.settle(&departure);
                return;
            }
            self.holders.remove(&reg.cgroup_id);
            self.observer.unhook_sockets(&reg.cgroup_path);
        }
        let Some(cost) = self.observer.cost_of(reg.cgroup_id) else {
            tracing::warn!(id = %reg.id, "removed with no bill: its traffic was never measured (no observer slot)");
            self.registry.settle(&departure);
            return;
        };
        let bill = bill(&departure, &cost);
        tracing::info!(
            target: "dove::bill",
            id = %bill.id,
            cgroup = %bill.cgroup_path,
            cgroup_id = bill.cgroup_id,
            registered_at = %bill.registered_at,
            removed_at = %bill.removed_at,
            reason = bill.reason.as_str(),
            rx_ns = bill.rx_ns,
            tx_ns = bill.tx_ns,
            total_ns = bill.total_ns,
            "final bill"
        );
        self.record(departure, bill);
    }

    /// Record the bill durably, then let the slot go and settle the departure: a crash in
    /// between leaves the slot pinned and the departure in the registry, billed again
    /// (once: the ledger deduplicates) at the next start.
    fn record(&mut self, departure: Departure, bill: Bill) {
        match self.ledger.record(&bill) {
            Ok(_) => {
                let cgroup_id = departure.container.registration.cgroup_id;
                if let Some(last) = self.observer.remove(cgroup_id) {
                    let late = last.total_ns.saturating_sub(bill.total_ns);
                    if late > 0 {
                        tracing::debug!(id = %bill.id, late_ns = late, "cost after the bill (packets in flight at removal), not billed");
                    }
                }
                self.registry.settle(&departure);
            }
            Err(e) => {
                tracing::error!(id = %bill.id, "{e}; the bill is kept in memory and retried");
                self.unrecorded.push((departure, bill));
            }
        }
    }

    fn retry_unrecorded(&mut self) {
        for (departure, bill) in std::mem::take(&mut self.unrecorded) {
            self.record(departure, bill);
        }
    }
}

fn bill(departure: &Departure, cost: &Cost) -> Bill {
    let reg = &departure.container.registration;
    Bill {
        id: reg.id.clone(),
        cgroup_path: reg.cgroup_path.clone(),
        cgroup_id: reg.cgroup_id,
        registered_at: departure.container.registered_at.clone(),
        removed_at: departure.removed_at.clone(),
        reason: departure.reason,
        rx_ns: cost.rx_ns,
        tx_ns: cost.tx_ns,
        total_ns: cost.total_ns,
        rx_packets: cost.rx_packets,
        tx_packets: cost.tx_packets,
        kubernetes: (departure.container.registered_by == 0)
            .then(|| dove_proto::kubernetes_names(&reg.annotations))
            .flatten(),
    }
}
