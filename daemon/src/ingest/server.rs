//! The socket server: admits authorised peers, reads framed requests, answers them.
//! Every connection is its own task, so a slow or silent client holds only itself up.

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dove_proto::{
    check_frame_len, encode_frame, ErrorCode, FrameError, Reply, Request, RequestEnvelope,
    ResponseEnvelope, Status, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};
use nix::unistd::{Gid, Group};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::irqtime::IrqTimeAccounting;
use crate::registry::{Named, RegisterError, Registry};

/// Who may talk to the daemon besides root, and what they may ask.
#[derive(Debug, Clone)]
pub struct Access {
    /// Members may read (list, status, stats, bills).
    pub group: Option<(Gid, String)>,
    /// Any local user may connect, and register or unregister containers in cgroups
    /// delegated to it.
    pub rootless: bool,
}

/// What a peer may do once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Root,
    /// A member of socket_group: reads.
    Reader,
    /// Any other user (rootless mode): writes for its own cgroups.
    Delegate,
}

impl Access {
    /// Resolve `socket_group` (a name or numeric gid; empty for root only).
    pub fn from_config(group: &str, rootless: bool) -> Result<Self, String> {
        if group.is_empty() {
            return Ok(Self {
                group: None,
                rootless,
            });
        }
        let found = match group.parse::<u32>() {
            Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
            Err(_) => Group::from_name(group),
        };
        match found {
            Ok(Some(g)) => Ok(Self {
                group: Some((g.gid, g.name)),
                rootless,
            }),
            Ok(None) => Err(format!(
                "socket_group {group:?} does not exist: create it (groupadd {group}) or leave socket_group empty for root-only access"
            )),
            Err(e) => Err(format!("looking up socket_group {group:?}: {e}")),
        }
    }

    /// `groups`: the peer's supplementary groups (SO_PEERGROUPS).
    fn role(&self, uid: u32, gid: u32, groups: &[u32]) -> Option<Role> {
        if uid == 0 {
            Some(Role::Root)
        } else if self.in_group(gid, groups) {
            Some(Role::Reader)
        } else if self.rootless {
            Some(Role::Delegate)
        } else {
            None
        }
    }

    /// Membership as the peer's credentials hold it when it connected, the same
    /// credentials the kernel checked against the socket file's group and mode: not as
    /// the group database says now (a process keeps the groups it started with, and one
    /// given a group by `setgroups` or `sg` is in it without being listed).
    fn in_group(&self, gid: u32, groups: &[u32]) -> bool {
        let Some((group_gid, _)) = &self.group else {
            return false;
        };
        gid == group_gid.as_raw() || groups.contains(&group_gid.as_raw())
    }

    fn describe(&self) -> String {
        let mut who = match &self.group {
            None => "root".to_owned(),
            Some((_, name)) => format!("root and members of group {name} (reading)"),
        };
        if self.rootless {
            who.push_str(", and any user for containers in cgroups delegated to it");
        }
        who
    }
}

/// What `status` reports that the server does not own itself.
pub struct DaemonInfo {
    pub started: Instant,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub mounts: dove_cgroup::Mounts,
    pub client_timeout: Duration,
    pub max_connections: usize,
    pub access: Access,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another doved is already serving {0}: stop it, or give this one another --socket")]
    InUse(PathBuf),
    #[error("creating socket directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting owner/mode of {path}: {source}")]
    Permissions {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Fail early when another daemon already serves `path`.
pub fn ensure_free(path: &Path) -> Result<(), ListenError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ListenError::InUse(path.to_owned()));
    }
    Ok(())
}

/// Bind the socket: mode 0600 (0660 with a group, 0666 in rootless mode), refusing to
/// steal a live daemon's path.
pub fn bind(path: &Path, access: &Access) -> Result<std::os::unix::net::UnixListener, ListenError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ListenError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    if path.exists() {
        ensure_free(path)?;
        // A stale socket from a daemon that died without cleaning up.
        let _ = std::fs::remove_file(path);
    }
    // Bind under a restrictive umask so the socket is never briefly world-connectable.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|source| ListenError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let perm_err = |source| ListenError::Permissions {
        path: path.to_owned(),
        source,
    };
    if let Some((gid, _)) = &access.group {
        nix::unistd::chown(path, None, Some(*gid)).map_err(|e| perm_err(e.into()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(perm_err)?;
    }
    if access.rootless {
        // Every request is authorised by the peer's credentials (SO_PEERCRED).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(perm_err)?;
    }
    listener
        .set_nonblocking(true)
        .map_err(|source| ListenError::Bind {
            path: path.to_owned(),
            source,
        })?;
    Ok(listener)
}

/// The peer's supplementary groups as they were when it connected (SO_PEERGROUPS).
fn peer_groups(stream: &UnixStream) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    // Twice at most: a first answer of ERANGE says how many there are.
    for _ in 0..2 {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of gid_t that the kernel fills; the fd is
        // the stream's, open for this call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / GID);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
        groups.resize(len as usize / GID, 0);
    }
    Err(std::io::Error::from_raw_os_error(libc::ERANGE))
}

/// The listening socket systemd passed us (socket activation), if any.
pub fn activated_listener() -> Option<std::os::unix::net::UnixListener> {
    const SD_LISTEN_FDS_START: RawFd = 3;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // Only a listening Unix stream socket is ours to take: anything else at fd 3 (a
    // misconfigured unit, an inherited file) is left alone and the path is bound instead.
    use nix::sys::socket::{getsockname, getsockopt, sockopt, UnixAddr};
    // SAFETY: borrowed only for the checks; fd 3 outlives them.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(SD_LISTEN_FDS_START) };
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let stream =
        getsockopt(&fd, sockopt::SockType).ok() == Some(nix::sys::socket::SockType::Stream);
    let unix = getsockname::<UnixAddr>(SD_LISTEN_FDS_START).is_ok();
    if !(listening && stream && unix) {
        tracing::warn!(
            "LISTEN_FDS names fd 3, but it is not a listening Unix stream socket: ignored"
        );
        return None;
    }
    // SAFETY: systemd hands us fd 3 as a listening socket and nothing else owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(SD_LISTEN_FDS_START) };
    listener.set_nonblocking(true).ok()?;
    Some(listener)
}

pub struct Server {
    registry: Arc<Registry>,
    info: DaemonInfo,
    slots: Arc<Semaphore>,
    /// What non-root peers may hold of `slots` between them: in rootless mode any local
    /// user can connect, and must not be able to crowd out root's hooks.
    guest_slots: Arc<Semaphore>,
}

impl Server {
    pub fn new(registry: Arc<Registry>, info: DaemonInfo) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(info.max_connections));
        let guest_slots = Arc::new(Semaphore::new((info.max_connections / 4).max(1)));
        Arc::new(Self {
            registry,
            info,
            slots,
            guest_slots,
        })
    }

    /// Accept until the listener fails; each connection gets its own task.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let server = Arc::clone(&self);
                    tokio::spawn(async move { server.connection(stream).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    tracing::error!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, mut stream: UnixStream) {
        let Ok(_slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            tracing::warn!(
                max = self.info.max_connections,
                "connection refused: too many clients"
            );
            let _ = send(
                &mut stream,
                &ResponseEnvelope::error(
                    ErrorCode::Busy,
                    format!(
                        "doved is serving its maximum of {} connections; retry shortly (daemon.max_connections)",
                        self.info.max_connections
                    ),
                ),
            )
            .await;
            return;
        };
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("cannot read peer credentials, connection dropped: {e}");
                return;
            }
        };
        // Only a non-root peer's role can depend on its groups, and only with a
        // socket_group: every hook call from a root runtime skips the syscall.
        let groups = if cred.uid() == 0 || self.info.access.group.is_none() {
            Ok(Vec::new())
        } else {
            peer_groups(&stream)
        };
        let groups = match groups {
            Ok(groups) => groups,
            Err(e) => {
                tracing::warn!("cannot read the peer's groups, connection dropped: {e}");
                return;
            }
        };
        let Some(role) = self.info.access.role(cred.uid(), cred.gid(), &groups) else {
            tracing::warn!(
                uid = cred.uid(),
                gid = cred.gid(),
                pid = cred.pid(),
                "connection refused: peer is not authorised"
            );
            let _ = send(
                &mut stream,
                &ResponseEnvelope::error(
                    ErrorCode::PermissionDenied,
                    format!(
                        "uid {} is not allowed to use doved's socket (allowed: {}); run as root, or set socket_group in doved.toml",
                        cred.uid(),
                        self.info.access.describe()
                    ),
                ),
            )
            .await;
            return;
        };
        let _guest_slot = if role == Role::Root {
            None
        } else {
            let Ok(slot) = Arc::clone(&self.guest_slots).try_acquire_owned() else {
                tracing::warn!(
                    uid = cred.uid(),
                    "connection refused: non-root peers hold their share of connections"
                );
                let _ = send(
                    &mut stream,
                    &ResponseEnvelope::error(
                        ErrorCode::Busy,
                        "doved is serving as many non-root connections as it allows (a quarter of daemon.max_connections); retry shortly",
                    ),
                )
                .await;
                return;
            };
            Some(slot)
        };
        loop {
            let frame = tokio::time::timeout(
                self.info.client_timeout,
                read_frame(&mut stream, MAX_REQUEST_BYTES),
            )
            .await;
            let payload = match frame {
                Err(_) => {
                    tracing::debug!(pid = cred.pid(), "client idle past the timeout; closed");
                    return;
                }
                Ok(Err(FrameError::Closed)) => return,
                Ok(Err(FrameError::Io(e))) => {
                    tracing::debug!(pid = cred.pid(), "connection error: {e}");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(pid = cred.pid(), "bad frame from client: {e}");
                    let _ = send(
                        &mut stream,
                        &ResponseEnvelope::error(
                            ErrorCode::BadFrame,
                            format!("{e}: a frame is a 4-byte big-endian length then a JSON request of at most {MAX_REQUEST_BYTES} bytes"),
                        ),
                    )
                    .await;
                    return;
                }
                Ok(Ok(p)) => p,
            };
            let response = self.handle(&payload, role, cred.uid()).await;
            let refused = matches!(&response.outcome, dove_proto::Outcome::Error(e) if e.code == ErrorCode::PermissionDenied);
            if send(&mut stream, &response).await.is_err() || (refused && role != Role::Root) {
                return;
            }
        }
    }

    async fn handle(&self, payload: &[u8], role: Role, uid: u32) -> ResponseEnvelope {
        // Read the version first so that a newer client gets a version error, not a
        // confusing schema error.
        #[derive(serde::Deserialize)]
        struct VersionOnly {
            version: Option<u32>,
        }
        match serde_json::from_slice::<VersionOnly>(payload) {
            Ok(VersionOnly {
                version: Some(PROTOCOL_VERSION),
            }) => {}
            Ok(VersionOnly { version: Some(v) }) => {
                return ResponseEnvelope::error(
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {v} is not supported; this doved speaks version {PROTOCOL_VERSION}: use a dove-hook/dovectl from the same release"),
                )
            }
            Ok(VersionOnly { version: None }) => {
                return ResponseEnvelope::error(
                    ErrorCode::BadRequest,
                    "request has no `version` field: expected {\"version\":1,\"request\":{\"op\":...}}",
                )
            }
            Err(e) => {
                return ResponseEnvelope::error(
                    ErrorCode::BadRequest,
                    format!("request is not a JSON object: {e}"),
                )
            }
        }
        let envelope: RequestEnvelope = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                return ResponseEnvelope::error(
                    ErrorCode::BadRequest,
                    format!("malformed request: {e}"),
                )
            }
        };
        if let Err(refusal) = self.authorise(&envelope.request, role, uid) {
            tracing::warn!(uid, "request refused: {refusal}");
            return ResponseEnvelope::error(ErrorCode::PermissionDenied, refusal);
        }
        match envelope.request {
            Request::Register { mut container } => {
                if role == Role::Delegate && container.cpu_cgroup_path.is_some() {
                    // A rootless container has no `cpu` cgroup of its own on a hybrid
                    // host: what its pid is in belongs to someone else. It is measured,
                    // not enforced.
                    container.cpu_cgroup_path = None;
                    container.cpu_cgroup_id = None;
                }
                let id = container.id.clone();
                let cgroup_id = container.cgroup_id;
                match self.registry.register(container, uid).await {
                    Ok(replaced) => {
                        tracing::info!(%id, cgroup_id, replaced, "registered");
                        ResponseEnvelope::ok(Reply::Registered { id, replaced })
                    }
                    Err(e) => {
                        tracing::warn!(%id, "registration refused: {e}");
                        ResponseEnvelope::error(register_error_code(&e), e.to_string())
                    }
                }
            }
            Request::Unregister {
                id,
                cgroup_path,
                bundle,
            } => {
                if let Err(e) = dove_proto::validate_id(&id) {
                    return ResponseEnvelope::error(ErrorCode::InvalidContainer, e.to_string());
                }
                let named = Named {
                    cgroup_path: cgroup_path.as_deref(),
                    bundle: bundle.as_deref(),
                };
                match self.registry.unregister(&id, named, uid).await {
                    Ok(existed) => {
                        tracing::info!(%id, existed, "unregistered");
                        ResponseEnvelope::ok(Reply::Unregistered { id, existed })
                    }
                    Err(e) => ResponseEnvelope::error(register_error_code(&e), e.to_string()),
                }
            }
            Request::List => ResponseEnvelope::ok(Reply::List {
                containers: self.registry.list(),
            }),
            Request::Status => ResponseEnvelope::ok(Reply::Status(Box::new(self.status()))),
            Request::Stats => ResponseEnvelope::ok(Reply::Stats(Box::new(
                self.info.telemetry.stats(&self.registry),
            ))),
            Request::Bills => ResponseEnvelope::ok(Reply::Bills {
                bills: self.info.telemetry.ledger().list(),
            }),
        }
    }

    /// Root may do anything; socket_group members may read; any other peer (rootless
    /// mode) may register and unregister containers whose cgroup is delegated to it.
    fn authorise(&self, request: &Request, role: Role, uid: u32) -> Result<(), String> {
        let writes_cgroup = match request {
            Request::Register { container } => Some(Some(container.cgroup_path.clone())),
            // Nothing registered under the ID: the answer reveals and changes nothing.
            Request::Unregister { id, .. } => {
                Some(self.registry.find(id).map(|c| c.registration.cgroup_path))
            }
            Request::List | Request::Status | Request::Stats | Request::Bills => None,
        };
        let cgroup_path = match (role, writes_cgroup) {
            (Role::Root, _) | (Role::Reader, None) | (_, Some(None)) => return Ok(()),
            (Role::Reader, Some(Some(_))) if !self.info.access.rootless => {
                return Err(format!(
                    "uid {uid} is in socket_group, which may read doved's state but not register or unregister containers: run the hook as root, or set rootless = true to let users register containers in cgroups delegated to them"
                ))
            }
            (Role::Delegate, None) => {
                return Err(format!(
                    "uid {uid} may register and unregister its own containers but not read doved's state: list, status, stats and bills need root or socket_group"
                ))
            }
            (Role::Reader | Role::Delegate, Some(Some(path))) => path,
        };
        let dir = self
            .info
            .mounts
            .unified
            .dir(&cgroup_path)
            .map_err(|e| e.to_string())?;
        if dove_cgroup::delegated_to(&dir, &self.info.mounts.unified.mount_point, uid) {
            Ok(())
        } else {
            Err(format!(
                "uid {uid} may register and unregister only containers in cgroups delegated to it (owned by uid {uid}); {cgroup_path} is not"
            ))
        }
    }

    fn status(&self) -> Status {
        let info = &self.info;
        let irq_time = IrqTimeAccounting::probe();
        Status {
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            protocol_version: PROTOCOL_VERSION,
            pid: std::process::id(),
            uptime_seconds: info.started.elapsed().as_secs(),
            containers: self.registry.len(),
            socket: info.socket.display().to_string(),
            state_dir: info.state_dir.display().to_string(),
            cgroup_layout: info.mounts.layout().as_str().into(),
            cgroup2_mount: info.mounts.unified.mount_point.display().to_string(),
            cpu_controller_mount: info
                .mounts
                .cpu
                .as_ref()
                .map(|h| h.mount_point.display().to_string()),
            enforcement: info.telemetry.enforcement.as_str().into(),
            observer: info.telemetry.observer_state.as_str().into(),
            irq_time_accounting: !matches!(
                irq_time,
                IrqTimeAccounting::NotBuilt | IrqTimeAccounting::Unknown
            ),
            irq_time_accounting_state: irq_time.as_str().into(),
            dropped_vanished: self
                .registry
                .dropped_vanished
                .load(std::sync::atomic::Ordering::Relaxed),
            persist_failures: self
                .registry
                .persist_failures
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

fn register_error_code(e: &RegisterError) -> ErrorCode {
    match e {
        RegisterError::Invalid(_)
        | RegisterError::Path(_)
        | RegisterError::IdMismatch { .. }
        | RegisterError::RootCgroup => ErrorCode::InvalidContainer,
        RegisterError::Gone { .. } => ErrorCode::CgroupGone,
        RegisterError::Watch { .. } => ErrorCode::Internal,
        RegisterError::Persist(_) => ErrorCode::PersistFailed,
        RegisterError::NotOwner { .. } | RegisterError::TooMany { .. } => {
            ErrorCode::PermissionDenied
        }
    }
}

async fn read_frame(stream: &mut UnixStream, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut header[got..]).await? {
            0 if got == 0 => return Err(FrameError::Closed),
            0 => return Err(FrameError::Truncated { got, want: 4 }),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    check_frame_len(len, max)?;
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match stream.read(&mut payload[got..]).await? {
            0 => return Err(FrameError::Truncated { got, want: len }),
            n => got += n,
        }
    }
    Ok(payload)
}

async fn send(stream: &mut UnixStream, response: &ResponseEnvelope) -> std::io::Result<()> {
    let payload = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    let frame = encode_frame(&payload).map_err(std::io::Error::other)?;
    stream.write_all(&frame).await
}
