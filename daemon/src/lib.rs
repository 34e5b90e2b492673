//! `doved`, the DOVE daemon, as a library; `src/bin/doved.rs` is a thin `main`.
//!
//! This crate owns the container registry (fed by `dove-hook` over the socket, kept on
//! disk, pruned by inotify when a cgroup vanishes) and serves the socket protocol from
//! `dove-proto`. Later stages (the eBPF observer, enforcers, metrics) hang off the
//! registry here.

pub mod config;
pub mod observer;
pub mod registry;
pub mod server;
pub mod store;
pub mod telemetry;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::config::{Config, EnforcementMode};
use crate::observer::{Observer, ObserverMembership, SharedObserver};
use crate::registry::{Membership, Registry};
use crate::server::{Access, DaemonInfo, Server};
use crate::store::Store;
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup(#[from] dove_cgroup::CgroupError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Listen(#[from] server::ListenError),
    #[error("{0}")]
    Access(String),
    #[error("setting up inotify for cgroup removal: {0}")]
    Inotify(std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("eBPF observer: {0} (set observer.enabled = false to run the registry alone)")]
    Observer(#[from] observer::ObserverError),
    #[error(
        "metrics endpoint {addr}: {source} (change metrics.listen, or set it to \"\" to disable)"
    )]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("dropping capabilities after setup: {0}")]
    Capabilities(String),
}

/// Run the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let d = &config.daemon;
    let activated = server::activated_listener();
    if activated.is_none() {
        // Before loading anything: a second daemon must not touch the first one's maps.
        server::ensure_free(&d.socket)?;
    }
    let mounts = dove_cgroup::Mounts::discover()?;
    let access = Access::from_config(&d.socket_group).map_err(DaemonError::Access)?;
    let store = Store::open(&d.state_dir)?;

    let observer: Option<SharedObserver> = if config.observer.enabled {
        let o = Observer::start(
            &config.observer.pin_dir,
            &mounts.unified.mount_point,
            config.observer.egress,
        )?;
        Some(Arc::new(std::sync::Mutex::new(o)))
    } else {
        tracing::info!("eBPF observer disabled (observer.enabled = false)");
        None
    };
    let kernel_enforcement = match (config.enforcement.mode, &observer) {
        (EnforcementMode::None, _) | (_, None) => false,
        (EnforcementMode::Kernel, Some(_)) if !observer::kernel_patched() => {
            return Err(observer::ObserverError::KernelUnpatched.into());
        }
        (EnforcementMode::Auto, Some(_)) if !observer::kernel_patched() => {
            tracing::info!(
                "the kernel has no DOVE scheduler patch ({} is missing): measuring only, quotas are not charged",
                observer::SLOT_SYSCTL
            );
            false
        }
        (_, Some(_)) => true,
    };
    let membership = observer.as_ref().map(|o| {
        Arc::new(ObserverMembership {
            observer: Arc::clone(o),
            enforce_in: if kernel_enforcement {
                mounts.cpu.clone()
            } else {
                None
            },
        }) as Arc<dyn Membership>
    });
    let registry =
        Registry::start(mounts.clone(), store, membership).map_err(DaemonError::Inotify)?;
    if let Some(o) = &observer {
        // Slots pinned by a previous run for containers that are gone now.
        let mut o = o.lock().unwrap_or_else(|p| p.into_inner());
        o.retain(&registry.cgroup_ids());
        if kernel_enforcement {
            o.hand_to_kernel()?;
            tracing::info!("enforcement: kernel (cost maps handed to the patched scheduler)");
        }
    }
    let telemetry = Arc::new(Telemetry::new(
        if observer.is_some() {
            "active"
        } else {
            "disabled"
        }
        .into(),
        if kernel_enforcement { "kernel" } else { "none" }.into(),
        config.observer.tick_ms,
    ));
    if let Some(o) = &observer {
        // Serve real numbers from the first request on, not an empty snapshot.
        telemetry.publish(o.lock().unwrap_or_else(|p| p.into_inner()).tick());
    }

    let (listener, bound_path) = match activated {
        Some(l) => {
            tracing::info!("using the socket systemd passed (socket activation)");
            (l, None)
        }
        None => (server::bind(&d.socket, &access)?, Some(d.socket.clone())),
    };
    let metrics = if config.metrics.listen.is_empty() {
        None
    } else {
        let addr = config.metrics.listen.clone();
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| DaemonError::Metrics {
                addr: addr.clone(),
                source,
            })?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        Some(listener)
    };
    // Everything privileged is done: programs attached, maps mapped, sockets bound.
    observer::drop_capabilities().map_err(|e| DaemonError::Capabilities(e.to_string()))?;
    tracing::info!("all capabilities dropped");

    if let Some(o) = &observer {
        let (o, telemetry) = (Arc::clone(o), Arc::clone(&telemetry));
        let every = Duration::from_millis(config.observer.tick_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let snapshot = o.lock().unwrap_or_else(|p| p.into_inner()).tick();
                telemetry.publish(snapshot);
            }
        });
    }
    if let Some(listener) = metrics {
        tokio::spawn(telemetry::serve_metrics(
            listener,
            Arc::clone(&telemetry),
            Arc::clone(&registry),
        ));
    }

    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    if d.sweep_interval_s > 0 {
        let registry = Arc::clone(&registry);
        let every = Duration::from_secs(d.sweep_interval_s);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                registry.sweep();
            }
        });
    }

    let server = Server::new(
        Arc::clone(&registry),
        DaemonInfo {
            started: Instant::now(),
            socket: d.socket.clone(),
            state_dir: d.state_dir.clone(),
            mounts: mounts.clone(),
            client_timeout: Duration::from_millis(d.client_timeout_ms),
            max_connections: d.max_connections,
            access,
            telemetry: Arc::clone(&telemetry),
        },
    );
    let serving = tokio::spawn(server.serve(listener));
    tracing::info!(
        socket = %d.socket.display(),
        state_dir = %d.state_dir.display(),
        layout = mounts.layout().as_str(),
        cgroup2 = %mounts.unified.mount_point.display(),
        containers = registry.len(),
        "doved ready"
    );
    notify_systemd_ready();

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    serving.abort();
    if let Some(o) = &observer {
        // Publish the last counts before the links go away with this process.
        telemetry.publish(o.lock().unwrap_or_else(|p| p.into_inner()).tick());
    }
    registry.persist_now().await;
    if let Some(path) = bound_path {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Tell systemd (Type=notify) we are serving. Without NOTIFY_SOCKET this does nothing.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    // Abstract sockets are written with a leading '@'.
    let sent = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
        }
        None => sock.send_to(b"READY=1", &path),
    };
    if let Err(e) = sent {
        tracing::warn!("could not notify systemd: {e}");
    }
}
