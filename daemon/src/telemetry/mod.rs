//! What doved knows about cost, in the shapes operators read: `dovectl stats` (JSON)
//! and the Prometheus endpoint (text format 0.0.4).

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::collections::HashMap;

use dove_proto::{
    Bill, ContainerStats, CostCounters, EarlyDropState, ObserverHealth, QuotaState, Stats,
};
use tokio::net::TcpListener;

use crate::bills::Ledger;
use crate::bpf::observer::{Cost, Snapshot};
use crate::enforce::Enforcement;
use crate::registry::Registry;

/// Whether the eBPF observer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObserverState {
    Active,
    /// `observer.enabled = false`.
    Disabled,
}

impl ObserverState {
    pub fn as_str(self) -> &'static str {
        match self {
            ObserverState::Active => "active",
            ObserverState::Disabled => "disabled",
        }
    }
}

#[derive(Default)]
struct EnforcementState {
    quotas: HashMap<String, QuotaState>,
    early_drop: HashMap<String, EarlyDropState>,
}

pub struct Telemetry {
    pub observer_state: ObserverState,
    pub enforcement: Enforcement,
    pub tick_ms: u64,
    snapshot: RwLock<Snapshot>,
    /// Container ID → its quota under the cpu.max controller, and early drop's state.
    enforcement_state: RwLock<EnforcementState>,
    ledger: Arc<Ledger>,
    /// How long a removed container's final counters stay in the metrics.
    removed_grace: Duration,
}

fn counters(c: &Cost) -> CostCounters {
    CostCounters {
        total_ns: c.total_ns,
        rx_ns: c.rx_ns,
        tx_ns: c.tx_ns,
        rx_packets: c.rx_packets,
        tx_packets: c.tx_packets,
        pending_ns: c.pending_ns,
    }
}

impl Telemetry {
    pub fn new(
        observer_state: ObserverState,
        enforcement: Enforcement,
        tick_ms: u64,
        ledger: Arc<Ledger>,
        removed_grace: Duration,
    ) -> Self {
        Self {
            observer_state,
            enforcement,
            tick_ms,
            snapshot: RwLock::new(Snapshot::default()),
            enforcement_state: RwLock::new(EnforcementState::default()),
            ledger,
            removed_grace,
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Final bills of containers removed within the grace period, for the metrics.
    fn recently_removed(&self) -> Vec<Bill> {
        match std::time::SystemTime::now().checked_sub(self.removed_grace) {
            Some(since) if !self.removed_grace.is_zero() => self.ledger.removed_since(since),
            _ => Vec::new(),
        }
    }

    pub fn publish(&self, snapshot: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = snapshot;
    }

    /// What the cpu.max controller and early drop did this tick, by container ID.
    pub fn publish_enforcement(
        &self,
        quotas: HashMap<String, QuotaState>,
        early_drop: HashMap<String, EarlyDropState>,
    ) {
        *self
            .enforcement_state
            .write()
            .unwrap_or_else(|p| p.into_inner()) = EnforcementState { quotas, early_drop };
    }

    pub fn stats(&self, registry: &Registry) -> Stats {
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        let state = self
            .enforcement_state
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut containers: Vec<ContainerStats> = registry
            .list()
            .into_iter()
            .map(|c| ContainerStats {
                cost: snap
                    .by_cgroup
                    .get(&c.registration.cgroup_id)
                    .map(counters)
                    .unwrap_or_default(),
                quota: state.quotas.get(&c.registration.id).cloned(),
                early_drop: state.early_drop.get(&c.registration.id).cloned(),
                // A non-root peer (rootless mode) could name any tenant's pod.
                kubernetes: (c.registered_by == 0)
                    .then(|| dove_proto::kubernetes_names(&c.registration.annotations))
                    .flatten(),
                id: c.registration.id,
                cgroup_path: c.registration.cgroup_path,
                cgroup_id: c.registration.cgroup_id,
            })
            .collect();
        containers.sort_by(|a, b| b.cost.total_ns.cmp(&a.cost.total_ns).then(a.id.cmp(&b.id)));
        let h = &snap.health;
        Stats {
            observer: self.observer_state.as_str().into(),
            irq_time_accounting: crate::irqtime::IrqTimeAccounting::probe().as_str().into(),
            tick_ms: self.tick_ms,
            containers,
            unattributed: counters(&snap.unattributed),
            health: ObserverHealth {
                programs_attached: snap.programs_attached as u64,
                hooked_cgroups: snap.hooked_cgroups as u64,
                windows: h.windows,
                packets_in_window: h.packets_in_window,
                packets_outside_window: h.packets_outside_window,
                unowned_windows: h.unowned_windows,
                owner_lookups: h.owner_lookups,
                packets_started: h.packets_started,
                packets_without_socket: h.packets_without_socket,
                stale_windows: h.stale_windows,
                dropped_stretches: h.dropped_stretches,
                xmits_started: h.xmits_started,
                transmit_callbacks: h.transmit_callbacks,
                slots_used: snap.slots_used as u64,
                slots_capacity: snap.slots_capacity as u64,
                ticks: snap.ticks,
                last_tick_ns: snap.tick_duration_ns,
            },
        }
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Render the Prometheus text exposition format. `removed` are final bills of containers
/// removed recently: their counters are exported at their final values for a while, so
/// that the scrape after a removal still sees everything the container cost.
pub fn render(stats: &Stats, registry: &Registry, removed: &[Bill]) -> String {
    let mut out = String::new();
    let mut containers = stats.containers.clone();
    for bill in removed {
        let registered = containers
            .iter()
            .any(|c| c.id == bill.id && c.cgroup_path == bill.cgroup_path);
        if !registered {
            containers.push(ContainerStats {
                id: bill.id.clone(),
                cgroup_path: bill.cgroup_path.clone(),
                cgroup_id: bill.cgroup_id,
                cost: CostCounters {
                    total_ns: bill.total_ns,
                    rx_ns: bill.rx_ns,
                    tx_ns: bill.tx_ns,
                    rx_packets: bill.rx_packets,
                    tx_packets: bill.tx_packets,
                    pending_ns: 0,
                },
                quota: None,
                early_drop: None,
                kubernetes: bill.kubernetes.clone(),
            });
        }
    }
    let containers = &containers;
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
    };
    let labels = |c: &ContainerStats| {
        let mut labels = format!(
            "container_id=\"{}\",cgroup=\"{}\"",
            escape(&c.id),
            escape(&c.cgroup_path)
        );
        if let Some(k) = &c.kubernetes {
            let _ = write!(
                labels,
                ",namespace=\"{}\",pod=\"{}\",container=\"{}\"",
                escape(&k.namespace),
                escape(&k.pod),
                escape(&k.container)
            );
        }
        labels
    };
    let per = |f: &dyn Fn(&ContainerStats) -> String| -> Vec<(String, String)> {
        containers.iter().map(|c| (labels(c), f(c))).collect()
    };
    let per_dir = |rx: &dyn Fn(&ContainerStats) -> String,
                   tx: &dyn Fn(&ContainerStats) -> String| {
        let mut v = Vec::new();
        for c in containers {
            v.push((format!("{},direction=\"rx\"", labels(c)), rx(c)));
            v.push((format!("{},direction=\"tx\"", labels(c)), tx(c)));
        }
        v
    };
    let per_quota = |f: &dyn Fn(&QuotaState) -> String| -> Vec<(String, String)> {
        containers
            .iter()
            .filter_map(|c| {
                c.quota.as_ref().map(|q| {
                    (
                        format!("{},quota_cgroup=\"{}\"", labels(c), escape(&q.cgroup)),
                        f(q),
                    )
                })
            })
            .collect()
    };
    let us = |v: u64| (v as f64 / 1e6).to_string();
    family(
        "dove_cpu_quota_base_seconds",
        "gauge",
        "CFS quota per period the runtime or orchestrator set (cpumax restores it).",
        &per_quota(&|q| us(q.base_quota_us)),
    );
    family(
        "dove_cpu_quota_effective_seconds",
        "gauge",
        "CFS quota per period in force: the base less the softirq cost cpumax deducts.",
        &per_quota(&|q| us(q.effective_quota_us)),
    );
    family(
        "dove_cpu_quota_period_seconds",
        "gauge",
        "CFS period of the quota cpumax acts on.",
        &per_quota(&|q| us(q.period_us)),
    );
    family(
        "dove_quota_forgiven_seconds_total",
        "counter",
        "Attributed softirq cost cpumax could not deduct: more than the quota above its floor absorbs.",
        &per_quota(&|q| seconds(q.forgiven_ns).to_string()),
    );
    let per_drop = |f: &dyn Fn(&EarlyDropState) -> String| -> Vec<(String, String)> {
        containers
            .iter()
            .filter_map(|c| c.early_drop.as_ref().map(|d| (labels(c), f(d))))
            .collect()
    };
    family(
        "dove_early_drop_packets_total",
        "counter",
        "Packets sent into the container that early drop dropped: its softirq cost outran its quota.",
        &per_drop(&|d| d.dropped_packets.to_string()),
    );
    family(
        "dove_early_drop_bytes_total",
        "counter",
        "Bytes of the packets early drop dropped.",
        &per_drop(&|d| d.dropped_bytes.to_string()),
    );
    family(
        "dove_early_drop_limiting",
        "gauge",
        "1 while early drop limits the traffic into the container.",
        &per_drop(&|d| u8::from(d.limiting).to_string()),
    );
    family(
        "dove_softirq_seconds_total",
        "counter",
        "Softirq (NET_RX/NET_TX) CPU time spent on the container's network traffic.",
        &per(&|c| seconds(c.cost.total_ns).to_string()),
    );
    family(
        "dove_softirq_direction_seconds_total",
        "counter",
        "Softirq CPU time by direction: rx up to deliveries to the container's sockets, tx up to its transmissions.",
        &per_dir(&|c| seconds(c.cost.rx_ns).to_string(), &|c| seconds(c.cost.tx_ns).to_string()),
    );
    family(
        "dove_softirq_packets_total",
        "counter",
        "Packets of the container's sockets processed inside softirq windows.",
        &per_dir(&|c| c.cost.rx_packets.to_string(), &|c| {
            c.cost.tx_packets.to_string()
        }),
    );
    family(
        "dove_softirq_pending_seconds",
        "gauge",
        "Softirq time charged but not yet consumed by an enforcer.",
        &per(&|c| seconds(c.cost.pending_ns).to_string()),
    );
    let plain = |v: String| vec![(String::new(), v)];
    family(
        "dove_unattributed_softirq_seconds_total",
        "counter",
        "Softirq CPU time on traffic with no registered owner (charged to no one).",
        &plain(seconds(stats.unattributed.total_ns).to_string()),
    );
    let h = &stats.health;
    family(
        "dove_irq_time_accounting",
        "gauge",
        "1 for the running kernel's IRQ time accounting state: active means softirq time is kept out of the interrupted task's runtime (nobody paid before DOVE's charge).",
        &crate::irqtime::IrqTimeAccounting::ALL
            .iter()
            .map(|s| {
                (
                    format!("state=\"{}\"", s.as_str()),
                    ((stats.irq_time_accounting == s.as_str()) as u8).to_string(),
                )
            })
            .collect::<Vec<_>>(),
    );
    family(
        "dove_observer_up",
        "gauge",
        "1 when the eBPF observer is loaded and attached.",
        &plain(((stats.observer == "active") as u8).to_string()),
    );
    family(
        "dove_programs_attached",
        "gauge",
        "eBPF program attachments doved holds (tracepoints and cgroup links).",
        &plain(h.programs_attached.to_string()),
    );
    family(
        "dove_hooked_cgroups",
        "gauge",
        "Cgroups DOVE's socket programs are attached at (registered, with no registered ancestor).",
        &plain(h.hooked_cgroups.to_string()),
    );
    family(
        "dove_softirq_windows_total",
        "counter",
        "NET_RX/NET_TX softirq windows observed.",
        &plain(h.windows.to_string()),
    );
    family(
        "dove_packets_outside_softirq_total",
        "counter",
        "Packets seen in process context (already billed to the task; not charged).",
        &plain(h.packets_outside_window.to_string()),
    );
    family(
        "dove_packets_started_total",
        "counter",
        "Received packets that began inside a NET_RX softirq window.",
        &plain(h.packets_started.to_string()),
    );
    family(
        "dove_packets_without_socket_total",
        "counter",
        "Received packets that reached no socket (closed ports, drops, forwarding); their softirq time is unattributed.",
        &plain(h.packets_without_socket.to_string()),
    );
    family(
        "dove_stale_windows_total",
        "counter",
        "Softirq windows whose end was never seen (doved started mid-window); charged to nobody.",
        &plain(h.stale_windows.to_string()),
    );
    family(
        "dove_dropped_stretches_total",
        "counter",
        "Stretches too long to be one packet's processing (a stale mark); charged to nobody.",
        &plain(h.dropped_stretches.to_string()),
    );
    family(
        "dove_xmits_started_total",
        "counter",
        "Packets NET_TX softirq windows handed to a driver (charged to their sending socket's owner).",
        &plain(h.xmits_started.to_string()),
    );
    family(
        "dove_transmit_callbacks_total",
        "counter",
        "Timer, hrtimer, tasklet and BH work callbacks in softirq that transmitted for a socket (charged to it).",
        &plain(h.transmit_callbacks.to_string()),
    );
    family(
        "dove_owner_lookups_total",
        "counter",
        "Packet owner resolutions that missed the programs' per-CPU cache.",
        &plain(h.owner_lookups.to_string()),
    );
    family(
        "dove_cost_slots_used",
        "gauge",
        "Cost map slots in use (one per registered cgroup).",
        &plain(h.slots_used.to_string()),
    );
    family(
        "dove_cost_slots_capacity",
        "gauge",
        "Cost map slots available.",
        &plain(h.slots_capacity.to_string()),
    );
    family(
        "dove_tick_duration_seconds",
        "gauge",
        "How long the last aggregation tick took.",
        &plain(seconds(h.last_tick_ns).to_string()),
    );
    family(
        "dove_registered_containers",
        "gauge",
        "Containers in the registry.",
        &plain(registry.len().to_string()),
    );
    family(
        "dove_containers_dropped_vanished_total",
        "counter",
        "Registrations dropped because their cgroup disappeared without a poststop.",
        &plain(
            registry
                .dropped_vanished
                .load(std::sync::atomic::Ordering::Relaxed)
                .to_string(),
        ),
    );
    family(
        "dove_registry_persist_failures_total",
        "counter",
        "Failed writes of the registry to disk.",
        &plain(
            registry
                .persist_failures
                .load(std::sync::atomic::Ordering::Relaxed)
                .to_string(),
        ),
    );
    out
}

/// Connections the metrics endpoint serves at once; more are closed at accept.
const MAX_METRICS_CONNECTIONS: usize = 64;

/// Serve `GET /metrics` (HTTP/1.1, hyper) until the task is dropped. A connection must
/// send its request head within 5 s and is closed after 30 s whatever it does.
pub async fn serve_metrics(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    registry: Arc<Registry>,
) {
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, max = MAX_METRICS_CONNECTIONS, "metrics connection refused: too many open");
            continue;
        };
        let (telemetry, registry) = (Arc::clone(&telemetry), Arc::clone(&registry));
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let (telemetry, registry) = (Arc::clone(&telemetry), Arc::clone(&registry));
                    async move {
                        let (status, content_type, body) =
                            match (request.method(), request.uri().path()) {
                                (&Method::GET, "/metrics") => (
                                    StatusCode::OK,
                                    "text/plain; version=0.0.4; charset=utf-8",
                                    render(
                                        &telemetry.stats(&registry),
                                        &registry,
                                        &telemetry.recently_removed(),
                                    ),
                                ),
                                (&Method::GET, "/") => (
                                    StatusCode::OK,
                                    "text/plain; charset=utf-8",
                                    "doved: metrics at /metrics\n".to_owned(),
                                ),
                                _ => (
                                    StatusCode::NOT_FOUND,
                                    "text/plain; charset=utf-8",
                                    "not found: try GET /metrics\n".to_owned(),
                                ),
                            };
                        Response::builder()
                            .status(status)
                            .header(hyper::header::CONTENT_TYPE, content_type)
                            .body(http_body_util::Full::new(Bytes::from(body)))
                    }
                },
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                // One scrape per connection, as the endpoint always served.
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }
}
