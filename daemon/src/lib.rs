//! `doved`, the DOVE daemon, as a library; `src/bin/doved.rs` is a thin `main`.
//!
//! The registry (fed by `dove-hook` over the socket, kept in a file beside it, pruned by
//! inotify when a cgroup vanishes) publishes events; the accounting thread applies them
//! to the eBPF observer, aggregates its counters every tick and turns removals into
//! bills in the ledger; telemetry serves the snapshots. `run()` only composes them.

pub mod bills;
pub mod bpf;
pub mod config;
pub mod enforce;
pub mod ingest;
pub mod irqtime;
pub mod registry;
pub mod telemetry;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::bills::Ledger;
use crate::bpf::accounting::{Accounting, AccountingThread};
use crate::bpf::observer::{self, Observer};
use crate::config::Config;
use crate::enforce::cpumax::CpuMax;
use crate::enforce::early_drop::EarlyDrop;
use crate::enforce::Enforcement;
use crate::ingest::replay;
use crate::ingest::server::{self, Access, DaemonInfo, Server};
use crate::registry::store::Store;
use crate::registry::Registry;
use crate::telemetry::{ObserverState, Telemetry};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Cgroup(#[from] dove_cgroup::CgroupError),
    #[error(transparent)]
    Store(#[from] registry::store::StoreError),
    #[error(transparent)]
    Ledger(#[from] bills::LedgerError),
    #[error("starting the accounting thread: {0}")]
    Thread(std::io::Error),
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
    #[error(transparent)]
    Enforce(#[from] enforce::EnforceError),
    #[error("the accounting thread ended (a bug: see the log above); quotas it lowered are restored at the next start or by `doved --restore-quotas`")]
    AccountingEnded,
    #[error("dropping capabilities after setup: {0}")]
    Capabilities(String),
}

/// What doved needs privileges for, acquired before any other thread exists.
struct Privileged {
    mounts: dove_cgroup::Mounts,
    access: Access,
    store: Store,
    ledger: Arc<Ledger>,
    observer: Option<Observer>,
    enforcement: Enforcement,
    cpumax: Option<CpuMax>,
    listener: std::os::unix::net::UnixListener,
    /// The socket path doved bound (and removes at exit); None when systemd passed it.
    bound_path: Option<PathBuf>,
    metrics: Option<std::net::TcpListener>,
}

/// Run the daemon until SIGTERM or SIGINT.
///
/// Everything that needs a capability (loading and attaching programs, mounting bpffs,
/// handing maps to the scheduler, binding sockets) happens first, on this thread alone.
/// Then the accounting thread starts and keeps only what attaching programs at
/// registered cgroups needs; this thread drops everything, and only then does the async
/// runtime start its threads. Capabilities belong to threads: a thread started before
/// the drop would keep them.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let privileged = acquire(&config)?;
    let accounting_thread = match privileged.observer {
        Some(_) => {
            let keep = observer::accounting_capabilities();
            let thread =
                AccountingThread::reserve(keep.clone()).map_err(DaemonError::Capabilities)?;
            tracing::info!(
                kept = ?keep,
                "the accounting thread keeps only these capabilities (attaching programs at registered cgroups)"
            );
            Some(thread)
        }
        None => None,
    };
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    let expected = 1 + usize::from(accounting_thread.is_some());
    if threads != expected {
        return Err(DaemonError::Capabilities(format!(
            "{threads} threads are running where {expected} were expected: the others would keep their capabilities"
        )));
    }
    observer::drop_capabilities(&[]).map_err(DaemonError::Capabilities)?;
    tracing::info!("all capabilities of the serving threads dropped");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Thread)?;
    runtime.block_on(serve(config, privileged, accounting_thread))
}

fn acquire(config: &Config) -> Result<Privileged, DaemonError> {
    let d = &config.daemon;
    raise_open_file_limit();
    let activated = server::activated_listener();
    if activated.is_none() {
        // Before loading anything: a second daemon must not touch the first one's maps.
        server::ensure_free(&d.socket)?;
    }
    let mounts = dove_cgroup::Mounts::discover()?;
    let access = Access::from_config(&d.socket_group, d.rootless).map_err(DaemonError::Access)?;
    // The registry beside the socket (it must not outlive a reboot), the bills in the
    // state directory (they must).
    let run_dir = d
        .socket
        .parent()
        .unwrap_or(std::path::Path::new("/run/dove"));
    // The socket's directory keeps the usual mode (others may need to reach the socket);
    // only the registry's own directory is root-only.
    std::fs::create_dir_all(run_dir).map_err(|source| registry::store::StoreError::Dir {
        path: run_dir.to_owned(),
        source,
    })?;
    let store = Store::open(&run_dir.join("registry"), Some(&d.state_dir))?;
    let ledger = Arc::new(Ledger::open(
        &registry::store::ensure_dir(&d.state_dir)?,
        Duration::from_secs(config.bills.retention_days * 86400),
    )?);

    let mut observer = if config.observer.enabled {
        Some(Observer::start(
            &config.observer.pin_dir,
            &mounts.unified,
            config.observer.egress,
            config.observer.max_containers,
        )?)
    } else {
        tracing::info!("eBPF observer disabled (observer.enabled = false)");
        None
    };
    let enforcement = enforce::start(
        config.enforcement.mode,
        observer.as_mut(),
        mounts.cpu.is_some(),
    )?;
    // Quotas a crashed doved left lowered are restored before anything else runs, whatever
    // the mode now: a doved that stopped enforcing must not leave them lowered.
    match enforce::cpumax::restore_ledger(&d.state_dir) {
        Ok(0) => {}
        Ok(restored) => tracing::warn!(
            restored,
            "CFS quotas a previous doved had lowered were restored to their bases"
        ),
        Err(e) => tracing::error!("{e}"),
    }
    let cpumax = match enforcement {
        Enforcement::CpuMax => Some(
            CpuMax::start(
                &d.state_dir,
                config.enforcement.cpumax_floor_percent,
                Duration::from_millis(config.observer.tick_ms),
            )
            .map_err(enforce::EnforceError::from)?,
        ),
        _ => None,
    };
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
        let metrics_err = |source| DaemonError::Metrics {
            addr: addr.clone(),
            source,
        };
        let listener = std::net::TcpListener::bind(&addr).map_err(metrics_err)?;
        listener.set_nonblocking(true).map_err(metrics_err)?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        Some(listener)
    };
    Ok(Privileged {
        mounts,
        access,
        store,
        ledger,
        observer,
        enforcement,
        cpumax,
        listener,
        bound_path,
        metrics,
    })
}

async fn serve(
    config: Config,
    privileged: Privileged,
    accounting_thread: Option<AccountingThread>,
) -> Result<(), DaemonError> {
    let d = &config.daemon;
    let Privileged {
        mounts,
        access,
        store,
        ledger,
        observer,
        enforcement,
        cpumax,
        listener,
        bound_path,
        metrics,
    } = privileged;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|source| {
        server::ListenError::Bind {
            path: d.socket.clone(),
            source,
        }
    })?;
    let metrics =
        match metrics {
            Some(l) => Some(tokio::net::TcpListener::from_std(l).map_err(|source| {
                DaemonError::Metrics {
                    addr: config.metrics.listen.clone(),
                    source,
                }
            })?),
            None => None,
        };
    // Removals wait for a bill only when something computes bills.
    let registry =
        Registry::start(mounts.clone(), store, observer.is_some()).map_err(DaemonError::Inotify)?;
    let telemetry = Arc::new(Telemetry::new(
        if observer.is_some() {
            ObserverState::Active
        } else {
            ObserverState::Disabled
        },
        enforcement,
        config.observer.tick_ms,
        Arc::clone(&ledger),
        Duration::from_secs(config.metrics.removed_grace_s),
    ));
    let stop_accounting = Arc::new(AtomicBool::new(false));
    let accounting = match (observer, accounting_thread) {
        (Some(observer), Some(thread)) => {
            let subscription = registry.subscribe();
            let registry = Arc::clone(&registry);
            let ledger = Arc::clone(&ledger);
            let telemetry = Arc::clone(&telemetry);
            let enforce_in = match enforcement {
                Enforcement::Kernel | Enforcement::External | Enforcement::CpuMax => {
                    mounts.cpu.clone()
                }
                Enforcement::None => None,
            };
            if config.enforcement.early_drop && cpumax.is_none() {
                tracing::warn!("enforcement.early_drop is on, but early drop acts with the cpu.max controller only (enforcement: {}): nothing will be dropped", enforcement.as_str());
            }
            let tick = Duration::from_millis(config.observer.tick_ms);
            let early_drop =
                EarlyDrop::new(config.enforcement.early_drop, mounts.unified.clone(), tick);
            let stop = Arc::clone(&stop_accounting);
            let (started, ready) = tokio::sync::oneshot::channel();
            let (finished, ended) = tokio::sync::oneshot::channel::<()>();
            let handle = thread.run(move || {
                // Dropped when the thread ends, panics included: doved then exits.
                let _finished = finished;
                let accounting = Accounting::start(
                    observer,
                    &subscription,
                    registry,
                    ledger,
                    telemetry,
                    enforce_in,
                    cpumax.map(|c| (c, early_drop)),
                );
                let _ = started.send(());
                accounting.run(subscription, tick, stop);
            });
            // The first snapshot is published before anything is served.
            if ready.await.is_err() {
                return Err(DaemonError::AccountingEnded);
            }
            Some((handle, ended))
        }
        _ => None,
    };
    if let Some(listener) = metrics {
        tokio::spawn(telemetry::serve_metrics(
            listener,
            Arc::clone(&telemetry),
            Arc::clone(&registry),
        ));
    }

    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    // What hooks could not deliver while doved was down, before serving new requests.
    let spool = dove_proto::spool::spool_dir(&d.socket);
    if let Err(e) = dove_proto::spool::ensure_spool_dir(&spool) {
        tracing::warn!(dir = %spool.display(), "cannot create the hook's spool directory: {e}");
    }
    let replayed = replay::replay_spool(&registry, &spool).await;
    if replayed > 0 {
        tracing::info!(
            replayed,
            "replayed requests hooks spooled while doved was unreachable"
        );
    }
    if d.sweep_interval_s > 0 {
        let registry = Arc::clone(&registry);
        let every = Duration::from_secs(d.sweep_interval_s);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                registry.sweep();
                // Requests spooled while doved was stuck rather than down.
                replay::replay_spool(&registry, &spool).await;
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
    let nri = config.nri.enabled.then(|| {
        tokio::spawn(ingest::nri::plugin::run(
            ingest::nri::plugin::Settings {
                socket: config.nri.socket.clone(),
                name: config.nri.plugin_name.clone(),
                index: config.nri.plugin_index.clone(),
            },
            Arc::clone(&registry),
            mounts.clone(),
        ))
    });
    tracing::info!(
        socket = %d.socket.display(),
        state_dir = %d.state_dir.display(),
        layout = mounts.layout().as_str(),
        cgroup2 = %mounts.unified.mount_point.display(),
        containers = registry.len(),
        "doved ready"
    );
    notify_systemd_ready();

    let (thread, mut ended) = match accounting {
        Some((thread, ended)) => (Some(thread), Some(ended)),
        None => (None, None),
    };
    let accounting_ended = async {
        match ended.as_mut() {
            Some(ended) => {
                let _ = ended.await;
            }
            None => std::future::pending().await,
        }
    };
    let mut outcome = Ok(());
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = accounting_ended => {
            // Nothing would bill, enforce or restore quotas any more: exit, so that the
            // service manager restarts doved (and ExecStopPost restores the quotas).
            tracing::error!("the accounting thread ended; exiting");
            outcome = Err(DaemonError::AccountingEnded);
        }
    }
    serving.abort();
    if let Some(nri) = nri {
        nri.abort();
    }
    if let Some(thread) = thread {
        // It publishes the last counts before the links go away with this process.
        stop_accounting.store(true, Ordering::Release);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    registry.persist_now().await;
    if let Some(path) = bound_path {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

/// Every outermost registered cgroup holds two link fds, next to the clients' sockets: the
/// usual soft limit of 1,024 would run out near 500 containers, and a shell's hard limit
/// (often 4,096 to 20,000) near its half. Root with CAP_SYS_RESOURCE raises the hard limit
/// up to the kernel's `fs.nr_open` (capped here at 1,048,576), over a lower `LimitNOFILE=`
/// too, and says so; otherwise the hard limit the administrator allows (524,288 under
/// systemd) is used.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    const WANTED: u64 = 1 << 20;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = WANTED.min(nr_open).max(hard);
    if target > hard && setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        tracing::info!("open-file limit raised from {soft} (hard {hard}) to {target}: each outermost registered cgroup holds two link fds");
        return;
    }
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("raising the open-file limit from {soft} to {hard}: {e}");
        }
    }
}

/// Tell systemd (Type=notify) we are serving. Without NOTIFY_SOCKET this does nothing.
fn notify_systemd_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!("could not notify systemd: {e}");
    }
}
