use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;

/// Longest container ID accepted. OCI runtimes use 64 hex characters; this leaves room
/// for human-chosen names without letting an ID become a payload.
pub const MAX_ID_BYTES: usize = 256;
/// Longest cgroup path accepted (PATH_MAX).
pub const MAX_CGROUP_PATH_BYTES: usize = 4096;
/// Total bytes of annotation keys and values kept per container.
pub const MAX_ANNOTATION_BYTES: usize = 64 * 1024;

/// What a client asks of the daemon. Every request travels inside a [`RequestEnvelope`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Register {
        container: Registration,
    },
    Unregister {
        id: String,
        /// The container's cgroup as its runtime configured it, when the client knows it.
        /// Container IDs are unique per runtime and root only: with it, an unregistration
        /// never removes another container that registered the same ID.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup_path: Option<String>,
        /// The container's bundle directory, when the client knows it: it names one
        /// container of one runtime and root, and where both this and the registration
        /// have one, it decides (a runtime may leave a container outside the cgroup its
        /// bundle configures, as rootless podman does).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bundle: Option<String>,
    },
    List,
    Status,
    /// Softirq cost per container, the unattributed bucket, and observer health.
    Stats,
    /// The final bills of containers removed within the retention period, oldest first.
    Bills,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEnvelope {
    pub version: u32,
    pub request: Request,
}

impl RequestEnvelope {
    pub fn new(request: Request) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            request,
        }
    }
}

/// What the hook learned about a container at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The OCI container ID.
    pub id: String,
    /// Path of the container's cgroup in the cgroup v2 hierarchy, relative to its root
    /// (`/system.slice/libpod-….scope`). Attribution keys on this cgroup.
    pub cgroup_path: String,
    /// Inode number of that cgroup v2 directory: the kernel's `cgroup_id()`.
    pub cgroup_id: u64,
    /// Path of the container's cgroup in the hierarchy that holds the `cpu` controller,
    /// relative to that hierarchy's root. Equal to `cgroup_path` on a pure v2 host; on a
    /// hybrid host it is a separate v1 cgroup, where the CFS quota lives.
    #[serde(default)]
    pub cpu_cgroup_path: Option<String>,
    /// Inode number of the `cpu` controller's cgroup directory.
    #[serde(default)]
    pub cpu_cgroup_id: Option<u64>,
    /// The container's init pid as the runtime reported it, when it had one.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The runtime that ran the hook (`runc`, `crun`, …), as best the hook could tell.
    #[serde(default)]
    pub runtime: Option<String>,
    /// The OCI hook stage that registered the container.
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub bundle: Option<String>,
}

/// Why a registration is refused before it reaches the registry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("container id is empty")]
    EmptyId,
    #[error("container id is {0} bytes long; the limit is {MAX_ID_BYTES}")]
    IdTooLong(usize),
    #[error("container id {0:?} has a character outside [A-Za-z0-9_.+-]")]
    IdCharacters(String),
    #[error(
        "{field} {path:?} is not an absolute cgroup path without '.', '..' or empty components"
    )]
    BadCgroupPath { field: &'static str, path: String },
    #[error("{field} is {len} bytes long; the limit is {MAX_CGROUP_PATH_BYTES}")]
    CgroupPathTooLong { field: &'static str, len: usize },
    #[error("cgroup_id is 0, which is never a cgroup's inode number")]
    ZeroCgroupId,
    #[error("annotations total {0} bytes; the limit is {MAX_ANNOTATION_BYTES}")]
    AnnotationsTooLarge(usize),
}

/// Check an OCI container ID as runc does: letters, digits and `_ . + -`.
pub fn validate_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::EmptyId);
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ValidationError::IdTooLong(id.len()));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'+' | b'-'))
        || id == "."
        || id == ".."
    {
        return Err(ValidationError::IdCharacters(id.to_owned()));
    }
    Ok(())
}

/// A cgroup path as the registry stores it: absolute within its hierarchy, normalised.
pub fn validate_cgroup_path(field: &'static str, path: &str) -> Result<(), ValidationError> {
    if path.len() > MAX_CGROUP_PATH_BYTES {
        return Err(ValidationError::CgroupPathTooLong {
            field,
            len: path.len(),
        });
    }
    let bad = || ValidationError::BadCgroupPath {
        field,
        path: path.to_owned(),
    };
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    if path.contains('\0') {
        return Err(bad());
    }
    if rest.is_empty() {
        return Ok(());
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(())
}

/// Total bytes of annotation keys and values.
pub fn annotation_bytes(annotations: &BTreeMap<String, String>) -> usize {
    annotations.iter().map(|(k, v)| k.len() + v.len()).sum()
}

impl Registration {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_id(&self.id)?;
        validate_cgroup_path("cgroup_path", &self.cgroup_path)?;
        if let Some(p) = &self.cpu_cgroup_path {
            validate_cgroup_path("cpu_cgroup_path", p)?;
        }
        if self.cgroup_id == 0 {
            return Err(ValidationError::ZeroCgroupId);
        }
        let bytes = annotation_bytes(&self.annotations);
        if bytes > MAX_ANNOTATION_BYTES {
            return Err(ValidationError::AnnotationsTooLarge(bytes));
        }
        Ok(())
    }
}

/// A registered container as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    #[serde(flatten)]
    pub registration: Registration,
    /// RFC 3339 UTC time of (the latest) registration.
    pub registered_at: String,
    /// The uid of the peer that registered it (0: root). Only it, or root, may replace
    /// or remove the entry.
    #[serde(default)]
    pub registered_by: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub version: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl ResponseEnvelope {
    pub fn ok(reply: Reply) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            outcome: Outcome::Ok(reply),
        }
    }
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            outcome: Outcome::Error(ProtoError {
                code,
                message: message.into(),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Reply),
    Error(ProtoError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Registered {
        id: String,
        /// True when an entry with this ID already existed and was replaced.
        replaced: bool,
    },
    Unregistered {
        id: String,
        /// False when no entry had this ID (already gone: idempotent).
        existed: bool,
    },
    List {
        containers: Vec<Container>,
    },
    Status(Box<Status>),
    Stats(Box<Stats>),
    Bills {
        bills: Vec<Bill>,
    },
}

/// Why a container left the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemovalReason {
    /// Its runtime said so (the poststop hook).
    Unregistered,
    /// Its cgroup disappeared without a poststop (runtime crash, missed hook, or while
    /// doved was down).
    CgroupRemoved,
    /// A registration with the same ID named another cgroup.
    Replaced,
}

impl RemovalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RemovalReason::Unregistered => "unregistered",
            RemovalReason::CgroupRemoved => "cgroup_removed",
            RemovalReason::Replaced => "replaced",
        }
    }
}

/// A removed container's final softirq cost: what it owes for its whole registered life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bill {
    pub id: String,
    pub cgroup_path: String,
    pub cgroup_id: u64,
    /// RFC 3339, as in [`Container::registered_at`].
    pub registered_at: String,
    /// RFC 3339.
    pub removed_at: String,
    pub reason: RemovalReason,
    pub rx_ns: u64,
    pub tx_ns: u64,
    pub total_ns: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Its Kubernetes names, when its runtime gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesNames>,
}

/// Softirq cost counters. `*_ns` and `*_packets` are cumulative and monotonic while the
/// container is registered; `pending_ns` is what an enforcer has not consumed yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CostCounters {
    pub total_ns: u64,
    pub rx_ns: u64,
    pub tx_ns: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub pending_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub id: String,
    pub cgroup_path: String,
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub cost: CostCounters,
    /// The quota the cpu.max controller acts on for this container, in mode `cpumax`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaState>,
    /// Early drop, for a container it is enabled for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_drop: Option<EarlyDropState>,
    /// Its Kubernetes names, when its runtime gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesNames>,
}

/// A container's names in Kubernetes: from NRI (containerd, CRI-O), or from the CRI
/// annotations its runtime put in the OCI config (seen by the hook).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesNames {
    pub pod: String,
    pub namespace: String,
    pub container: String,
}

/// The registration annotations under which doved's NRI plugin records a container's
/// Kubernetes names.
pub const NRI_POD_NAME: &str = "io.dove.nri.pod";
pub const NRI_POD_NAMESPACE: &str = "io.dove.nri.namespace";
pub const NRI_CONTAINER_NAME: &str = "io.dove.nri.container";

/// The annotations that carry a container's Kubernetes names (pod, namespace, container),
/// by who set them: doved's NRI plugin, CRI-O, containerd's CRI plugin.
const KUBERNETES_ANNOTATIONS: [[&str; 3]; 3] = [
    [NRI_POD_NAME, NRI_POD_NAMESPACE, NRI_CONTAINER_NAME],
    [
        "io.kubernetes.pod.name",
        "io.kubernetes.pod.namespace",
        "io.kubernetes.container.name",
    ],
    [
        "io.kubernetes.cri.sandbox-name",
        "io.kubernetes.cri.sandbox-namespace",
        "io.kubernetes.cri.container-name",
    ],
];

/// A container's Kubernetes names from its registration's annotations, if they hold them.
pub fn kubernetes_names(annotations: &BTreeMap<String, String>) -> Option<KubernetesNames> {
    KUBERNETES_ANNOTATIONS
        .iter()
        .find_map(|[pod, namespace, container]| {
            Some(KubernetesNames {
                pod: annotations.get(*pod)?.clone(),
                namespace: annotations.get(*namespace)?.clone(),
                container: annotations.get(*container).cloned().unwrap_or_default(),
            })
        })
}

/// Early drop for one container: whether its ingress is being limited, and what was
/// dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyDropState {
    /// Its traffic is limited to what its quota can pay for.
    pub limiting: bool,
    /// The host-side interfaces limited.
    pub interfaces: Vec<String>,
    /// Softirq time per second admitted while limiting (ns/s).
    pub rate_ns_per_s: u64,
    /// What one received packet costs it in softirq time, as last measured (ns).
    pub packet_cost_ns: u64,
    /// Packets and bytes dropped so far.
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// A CFS quota under the cpu.max controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaState {
    /// The cgroup whose quota it is: the nearest at or above the container's with one.
    pub cgroup: String,
    pub period_us: u64,
    /// The quota the runtime or orchestrator set, restored when DOVE lets go.
    pub base_quota_us: u64,
    /// The quota now in force: the base less this period's deduction.
    pub effective_quota_us: u64,
    /// Softirq cost attributed in the last control period, per CFS period.
    pub softirq_per_period_us: u64,
    /// Attributed cost not yet deducted.
    pub debt_ns: u64,
    /// Cost forgiven because the quota could not absorb it.
    pub forgiven_ns: u64,
    /// Quota writes so far (each one refills the group's runtime).
    #[serde(default)]
    pub writes: u64,
}

/// How the eBPF observer is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserverHealth {
    /// Tracepoint attachments plus the socket programs' cgroup links.
    pub programs_attached: u64,
    /// Cgroups the socket programs are attached at: each registered cgroup with no
    /// registered ancestor.
    #[serde(default)]
    pub hooked_cgroups: u64,
    pub windows: u64,
    pub packets_in_window: u64,
    /// Packets seen in process context: already billed to the sending task, not charged.
    pub packets_outside_window: u64,
    pub unowned_windows: u64,
    /// Owner resolutions that missed the programs' per-CPU cache (hash lookups done).
    #[serde(default)]
    pub owner_lookups: u64,
    /// Received packets that began inside a NET_RX window.
    #[serde(default)]
    pub packets_started: u64,
    /// Of those, packets that reached no socket hook (closed ports, drops, forwarding,
    /// sockets of unregistered cgroups):
    /// their time is unattributed.
    #[serde(default)]
    pub packets_without_socket: u64,
    /// Windows whose exit was never seen (doved started mid-window): charged to nobody.
    #[serde(default)]
    pub stale_windows: u64,
    /// Stretches too long to be one packet's (a stale mark): charged to nobody.
    #[serde(default)]
    pub dropped_stretches: u64,
    /// Packets NET_TX windows handed to a driver.
    #[serde(default)]
    pub xmits_started: u64,
    /// Timer, hrtimer, tasklet and BH work callbacks that transmitted for a socket.
    #[serde(default)]
    pub transmit_callbacks: u64,
    pub slots_used: u64,
    pub slots_capacity: u64,
    pub ticks: u64,
    pub last_tick_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// `active`, `disabled`, or `failed: <reason>`.
    pub observer: String,
    pub tick_ms: u64,
    pub containers: Vec<ContainerStats>,
    pub unattributed: CostCounters,
    pub health: ObserverHealth,
    /// The running kernel's IRQ time accounting (see [`Status::irq_time_accounting_state`]).
    #[serde(default)]
    pub irq_time_accounting: String,
}

/// The daemon's view of itself, for `dovectl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub daemon_version: String,
    pub protocol_version: u32,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub containers: usize,
    pub socket: String,
    pub state_dir: String,
    /// `unified` (pure cgroup v2) or `hybrid` (cgroup2 beside v1 controllers).
    pub cgroup_layout: String,
    pub cgroup2_mount: String,
    /// Where the `cpu` controller (CFS bandwidth) is mounted.
    pub cpu_controller_mount: Option<String>,
    /// Which enforcement mode is active (`none` until an enforcer is running).
    pub enforcement: String,
    /// The eBPF observer: `active`, `disabled`, or `failed: <reason>`.
    #[serde(default)]
    pub observer: String,
    /// Whether the kernel is built to account IRQ time apart from tasks (kept for older
    /// clients; [`Self::irq_time_accounting_state`] says whether it is running).
    pub irq_time_accounting: bool,
    /// `active`, `unconfirmed` (built, nothing shows it running), `disabled-at-boot`,
    /// `disabled-tsc-unstable`, `not-built` or `unknown`: whether softirq time is kept out
    /// of the interrupted task's runtime, i.e. whether anyone already paid for what DOVE
    /// charges.
    #[serde(default)]
    pub irq_time_accounting_state: String,
    /// Registrations dropped because their cgroup vanished without a poststop.
    pub dropped_vanished: u64,
    /// Writes of the registry to disk that failed since start.
    pub persist_failures: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    BadRequest,
    UnsupportedVersion,
    PermissionDenied,
    InvalidContainer,
    CgroupGone,
    PersistFailed,
    Busy,
    Internal,
    /// A code this client does not know (sent by a newer daemon).
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registration {
        Registration {
            id: "abc".into(),
            cgroup_path: "/a/b".into(),
            cgroup_id: 42,
            cpu_cgroup_path: None,
            cpu_cgroup_id: None,
            pid: Some(7),
            annotations: BTreeMap::new(),
            runtime: None,
            stage: None,
            bundle: None,
        }
    }

    #[test]
    fn request_wire_shape() {
        let env = RequestEnvelope::new(Request::Unregister {
            id: "x".into(),
            cgroup_path: None,
            bundle: None,
        });
        let json = serde_json::to_string(&env).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"request":{"op":"unregister","id":"x"}}"#
        );
        let env = RequestEnvelope::new(Request::Register { container: reg() });
        let back: RequestEnvelope =
            serde_json::from_slice(&serde_json::to_vec(&env).unwrap()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn response_wire_shape() {
        let ok = ResponseEnvelope::ok(Reply::Registered {
            id: "x".into(),
            replaced: false,
        });
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"version":1,"ok":{"kind":"registered","id":"x","replaced":false}}"#
        );
        let err = ResponseEnvelope::error(ErrorCode::BadRequest, "nope");
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"version":1,"error":{"code":"bad_request","message":"nope"}}"#
        );
        let future: ResponseEnvelope =
            serde_json::from_str(r#"{"version":1,"error":{"code":"something_new","message":"m"}}"#)
                .unwrap();
        assert!(matches!(
            future.outcome,
            Outcome::Error(ProtoError {
                code: ErrorCode::Unknown,
                ..
            })
        ));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<RequestEnvelope, _> =
            serde_json::from_str(r#"{"version":1,"request":{"op":"list"},"x":1}"#);
        assert!(r.is_err());
    }

    #[test]
    fn id_rules() {
        for ok in ["a", "abc-DEF_1.2+3", &"f".repeat(64)] {
            validate_id(ok).unwrap();
        }
        assert_eq!(validate_id(""), Err(ValidationError::EmptyId));
        assert!(matches!(
            validate_id(&"a".repeat(300)),
            Err(ValidationError::IdTooLong(300))
        ));
        for bad in ["a/b", "..", ".", "a b", "é", "a\0"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cgroup_path_rules() {
        for ok in ["/", "/a", "/system.slice/x.scope"] {
            validate_cgroup_path("p", ok).unwrap();
        }
        for bad in ["", "a", "/a/../b", "/a//b", "/a/", "/./a", "/a\0"] {
            assert!(validate_cgroup_path("p", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn registration_validation() {
        reg().validate().unwrap();
        let mut r = reg();
        r.cgroup_id = 0;
        assert_eq!(r.validate(), Err(ValidationError::ZeroCgroupId));
        let mut r = reg();
        r.annotations
            .insert("k".into(), "v".repeat(MAX_ANNOTATION_BYTES));
        assert!(matches!(
            r.validate(),
            Err(ValidationError::AnnotationsTooLarge(_))
        ));
    }
}
