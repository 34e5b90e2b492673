//! The plugin's life: connect to the runtime's NRI socket, register, answer its calls,
//! and reconnect with backoff when it goes away (a containerd restart). The handlers only
//! decode the call and hand it to one worker task, so the runtime, which waits for each
//! answer (2 s by default) while a container is being created, never waits on doved's
//! registry, disk or cgroup lookups.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dove_cgroup::Mounts;
use prost::Message;
use tokio::sync::mpsc;
use ttrpc::r#async::{transport, Client, MethodHandler, Server, Service, TtrpcContext};

use super::api::{
    event, ConfigureRequest, ConfigureResponse, Container, Empty, PodSandbox,
    RegisterPluginRequest, StateChangeEvent, SynchronizeRequest, SynchronizeResponse,
    PLUGIN_SERVICE, RUNTIME_SERVICE,
};
use super::{mux, translate};
use crate::registry::{Named, Registry};

/// What a registration made through NRI says in its `stage` field, so a resynchronisation
/// forgets only what NRI itself registered.
pub const STAGE: &str = "nri";
/// The events DOVE subscribes to.
pub const EVENTS: [u32; 4] = [
    event::POST_CREATE_CONTAINER,
    event::START_CONTAINER,
    event::REMOVE_CONTAINER,
    event::REMOVE_POD_SANDBOX,
];
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Containers started while doved is not connected are registered only at the next
/// Synchronize: keep that gap short.
const LAST_RETRY: Duration = Duration::from_secs(5);
/// A runtime that accepted the registration but never synchronizes (a Synchronize it
/// considered failed) never sends events either: reconnect after this long.
const SYNCHRONIZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the runtime may take to answer `RegisterPlugin`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// A session that lasted this long was healthy: the next reconnect starts from
/// [`FIRST_RETRY`] again.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);

/// Where and under which name the plugin registers.
#[derive(Debug, Clone)]
pub struct Settings {
    pub socket: PathBuf,
    pub name: String,
    /// Two digits: the plugin's place in the order the runtime calls plugins in.
    pub index: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("starting the plugin's ttrpc server: {0}")]
    Server(ttrpc::Error),
    #[error("RegisterPlugin: {0}")]
    Register(String),
}

/// A call of the runtime's, for the worker.
#[derive(Debug)]
enum Work {
    /// A new connection: a synchronisation split over calls on an old one is void.
    Session,
    /// The runtime's name for itself, from `Configure`, for the registrations.
    Configure(String),
    Synchronize(SynchronizeRequest),
    Event(Box<StateChangeEvent>),
}

/// Serve NRI until the task is aborted: wait for the socket, connect, register, and
/// reconnect whenever the runtime goes away.
pub async fn run(settings: Settings, registry: Arc<Registry>, mounts: Mounts) {
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    tokio::spawn(worker(work_rx, registry, mounts));
    let mut retry = FIRST_RETRY;
    let mut absent_said = false;
    loop {
        let stream = match tokio::net::UnixStream::connect(&settings.socket).await {
            Ok(stream) => stream,
            Err(e) => {
                if !absent_said {
                    tracing::info!(
                        socket = %settings.socket.display(),
                        "no NRI runtime to connect to ({e}); connecting when one listens there (containerd: enable NRI in its config; nri.enabled = false turns this off)"
                    );
                    absent_said = true;
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LAST_RETRY);
                continue;
            }
        };
        absent_said = false;
        let started = Instant::now();
        match session(stream, &settings, work_tx.clone()).await {
            Ok(()) => tracing::warn!(
                socket = %settings.socket.display(),
                "the NRI runtime closed the connection (restarted?): reconnecting"
            ),
            Err(e) => tracing::warn!(
                socket = %settings.socket.display(),
                "NRI: {e}: reconnecting in {retry:?}"
            ),
        }
        if started.elapsed() >= HEALTHY_SESSION {
            retry = FIRST_RETRY;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LAST_RETRY);
    }
}

/// One connection: register, then serve until the runtime closes it.
async fn session(
    stream: tokio::net::UnixStream,
    settings: &Settings,
    work: mpsc::UnboundedSender<Work>,
) -> Result<(), SessionError> {
    let (plugin_conn, runtime_conn, mut closed) = mux::split(stream);
    let _ = work.send(Work::Session);
    let (synchronized_tx, synchronized) = tokio::sync::oneshot::channel();
    // The runtime may call Configure before it answers RegisterPlugin: serve first.
    let mut server = Server::new()
        .add_listener(transport::Listener::new(futures_util::stream::iter([
            Ok::<_, std::io::Error>(plugin_conn),
        ])))
        .register_service(HashMap::from([(
            PLUGIN_SERVICE.to_owned(),
            plugin_service(work, synchronized_tx),
        )]));
    server.start().await.map_err(SessionError::Server)?;
    let client = Client::new(transport::Socket::new(runtime_conn));
    let mut request = ttrpc::Request::new();
    request.service = RUNTIME_SERVICE.into();
    request.method = "RegisterPlugin".into();
    request.timeout_nano = REGISTER_TIMEOUT.as_nanos() as i64;
    request.payload = RegisterPluginRequest {
        plugin_name: settings.name.clone(),
        plugin_idx: settings.index.clone(),
    }
    .encode_to_vec();
    let response = tokio::time::timeout(REGISTER_TIMEOUT, client.request(request))
        .await
        .map_err(|_| SessionError::Register(format!("no answer within {REGISTER_TIMEOUT:?}")))?
        .map_err(|e| SessionError::Register(e.to_string()))?;
    let status = response.status();
    if status.code() != ttrpc::Code::OK {
        return Err(SessionError::Register(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        )));
    }
    tracing::info!(
        socket = %settings.socket.display(),
        "registered with the NRI runtime as {}-{}",
        settings.index,
        settings.name
    );
    tokio::select! {
        _ = &mut closed => return Ok(()),
        seen = tokio::time::timeout(SYNCHRONIZE_TIMEOUT, synchronized) => {
            if !matches!(seen, Ok(Ok(()))) {
                return Err(SessionError::Register(format!(
                    "the runtime did not synchronize within {SYNCHRONIZE_TIMEOUT:?} of the registration, so it would send no events"
                )));
            }
        }
    }
    // Both ends of the multiplexer end with the socket.
    let _ = closed.await;
    drop(server);
    Ok(())
}

/// A method: decode the request, answer with the bytes `answer` makes of it. An error
/// is logged and answered OK with an empty message: the runtime fails a container's
/// start on an event a plugin refuses, and drops a plugin whose Synchronize failed from
/// its event list without closing the connection.
struct Method<F>(F);

#[async_trait::async_trait]
impl<F> MethodHandler for Method<F>
where
    F: Fn(&[u8]) -> Result<Vec<u8>, prost::DecodeError> + Send + Sync,
{
    async fn handler(
        &self,
        _ctx: TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let mut response = ttrpc::Response::new();
        match (self.0)(&req.payload) {
            Ok(payload) => {
                response.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
                response.payload = payload;
            }
            Err(e) => {
                tracing::warn!(method = %req.method, "NRI: an undecodable request, ignored: {e}");
                response.set_status(ttrpc::get_status(ttrpc::Code::OK, ""));
                response.payload = Empty {}.encode_to_vec();
            }
        }
        Ok(response)
    }
}

fn method<F>(f: F) -> Box<dyn MethodHandler + Send + Sync>
where
    F: Fn(&[u8]) -> Result<Vec<u8>, prost::DecodeError> + Send + Sync + 'static,
{
    Box::new(Method(f))
}

/// The `Plugin` service. Calls DOVE does not subscribe to are answered with no
/// adjustments and no updates (an empty message), in case a runtime calls them anyway.
fn plugin_service(
    work: mpsc::UnboundedSender<Work>,
    synchronized: tokio::sync::oneshot::Sender<()>,
) -> Service {
    let synchronized = std::sync::Mutex::new(Some(synchronized));
    let mut methods: HashMap<String, Box<dyn MethodHandler + Send + Sync>> = HashMap::new();
    let configure_work = work.clone();
    methods.insert(
        "Configure".into(),
        method(move |bytes| {
            let request = ConfigureRequest::decode(bytes)?;
            tracing::info!(
                runtime = %request.runtime_name,
                version = %request.runtime_version,
                "NRI runtime configured the plugin"
            );
            let _ = configure_work.send(Work::Configure(translate::runtime_label(
                &request.runtime_name,
                &request.runtime_version,
            )));
            Ok(ConfigureResponse {
                events: event::mask(&EVENTS),
            }
            .encode_to_vec())
        }),
    );
    let sync_work = work.clone();
    methods.insert(
        "Synchronize".into(),
        method(move |bytes| {
            let request = SynchronizeRequest::decode(bytes)?;
            let more = request.more;
            if let Some(tx) = synchronized
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                let _ = tx.send(());
            }
            let _ = sync_work.send(Work::Synchronize(request));
            Ok(SynchronizeResponse { more }.encode_to_vec())
        }),
    );
    methods.insert(
        "StateChange".into(),
        method(move |bytes| {
            let _ = work.send(Work::Event(Box::new(StateChangeEvent::decode(bytes)?)));
            Ok(Empty {}.encode_to_vec())
        }),
    );
    for name in [
        "Shutdown",
        "CreateContainer",
        "UpdateContainer",
        "StopContainer",
    ] {
        methods.insert(name.into(), method(|_| Ok(Empty {}.encode_to_vec())));
    }
    Service {
        methods,
        streams: HashMap::new(),
    }
}

/// Applies the runtime's calls to the registry, in the order they came.
async fn worker(mut work: mpsc::UnboundedReceiver<Work>, registry: Arc<Registry>, mounts: Mounts) {
    let mut pods: HashMap<String, PodSandbox> = HashMap::new();
    let mut runtime = translate::runtime_label("", "");
    // A synchronisation the runtime split over several calls (`more`).
    let mut synchronizing: Option<(Vec<PodSandbox>, Vec<Container>)> = None;
    while let Some(item) = work.recv().await {
        match item {
            Work::Session => synchronizing = None,
            Work::Configure(name) => runtime = name,
            Work::Synchronize(request) => {
                let (all_pods, all_containers) = synchronizing.get_or_insert_with(Default::default);
                all_pods.extend(request.pods);
                all_containers.extend(request.containers);
                if request.more {
                    continue;
                }
                let (all_pods, all_containers) = synchronizing.take().unwrap_or_default();
                pods = all_pods.into_iter().map(|p| (p.id.clone(), p)).collect();
                synchronize(&registry, &mounts, &pods, all_containers, &runtime).await;
            }
            Work::Event(change) => {
                let change = *change;
                if let Some(pod) = &change.pod {
                    pods.insert(pod.id.clone(), pod.clone());
                }
                let event = change.event as u32;
                match (event, change.container) {
                    // containerd creates the task (runc create: the cgroup and the init
                    // process) only at StartContainer, before the process runs its
                    // command; CRI-O already at CreateContainer. Either is early enough.
                    (event::POST_CREATE_CONTAINER, Some(c)) => {
                        let pod = pods.get(&c.pod_sandbox_id);
                        register(&registry, &mounts, &c, pod, &runtime, Missing::Expected).await;
                    }
                    (event::START_CONTAINER, Some(c)) => {
                        let pod = pods.get(&c.pod_sandbox_id);
                        register(&registry, &mounts, &c, pod, &runtime, Missing::Warn).await;
                    }
                    (event::REMOVE_CONTAINER, Some(c)) => forget(&registry, &c.id).await,
                    (event::REMOVE_POD_SANDBOX, _) => {
                        if let Some(pod) = change.pod {
                            pods.remove(&pod.id);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// `Container.state` values of containers that have (or are about to have) processes.
fn is_live(container: &Container) -> bool {
    // CREATED = 1, PAUSED = 2, RUNNING = 3; STOPPED = 4 has none left.
    (1..=3).contains(&container.state)
}

/// Bring the registry in line with the runtime's whole state: register every live
/// container it has, and forget what NRI registered that it no longer has.
async fn synchronize(
    registry: &Registry,
    mounts: &Mounts,
    pods: &HashMap<String, PodSandbox>,
    containers: Vec<Container>,
    runtime: &str,
) {
    let live: HashSet<String> = containers
        .iter()
        .filter(|c| is_live(c))
        .map(|c| c.id.clone())
        .collect();
    let mut forgotten = 0;
    for gone in registry.list().into_iter().filter(|c| {
        c.registration.stage.as_deref() == Some(STAGE) && !live.contains(&c.registration.id)
    }) {
        forget(registry, &gone.registration.id).await;
        forgotten += 1;
    }
    let mut registered = 0;
    for container in containers.iter().filter(|c| is_live(c)) {
        let pod = pods.get(&container.pod_sandbox_id);
        // A CREATED container on containerd has no cgroup until it starts.
        let missing = if container.state == 1 {
            Missing::Expected
        } else {
            Missing::Warn
        };
        if register(registry, mounts, container, pod, runtime, missing).await {
            registered += 1;
        }
    }
    tracing::info!(
        containers = containers.len(),
        live = live.len(),
        registered,
        forgotten,
        "synchronized with the NRI runtime"
    );
}

/// Whether a container whose cgroup cannot be found is worth a warning.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// Not yet: it is registered when it starts.
    Expected,
    Warn,
}

/// Register `container` unless it is already registered with the same cgroup; returns
/// whether a registration was made.
async fn register(
    registry: &Registry,
    mounts: &Mounts,
    container: &Container,
    pod: Option<&PodSandbox>,
    runtime: &str,
    missing: Missing,
) -> bool {
    let proc_root = std::path::Path::new("/proc");
    let registration = match translate::registration_of(mounts, proc_root, container, pod, runtime)
    {
        Ok(registration) => registration,
        Err(e) if missing == Missing::Expected => {
            tracing::debug!(id = %container.id, "NRI: no cgroup yet, registered when it starts: {e}");
            return false;
        }
        Err(e) => {
            tracing::warn!(id = %container.id, "NRI: container not registered: {e}");
            return false;
        }
    };
    if let Some(known) = registry.find(&container.id) {
        // The same cgroup, registered by the hook (CRI-O runs both; its registration has
        // the bundle and the OCI annotations) or by NRI with the same names and runtime:
        // kept.
        let ours = known.registration.stage.as_deref() == Some(STAGE);
        if known.registration.cgroup_id == registration.cgroup_id
            && (!ours
                || (known.registration.annotations == registration.annotations
                    && known.registration.runtime == registration.runtime))
        {
            return false;
        }
    }
    let id = registration.id.clone();
    let cgroup = registration.cgroup_path.clone();
    match registry.register(registration, 0).await {
        Ok(replaced) => {
            tracing::info!(%id, %cgroup, replaced, "registered (NRI)");
            true
        }
        Err(e) => {
            tracing::warn!(%id, "NRI registration refused: {e}");
            false
        }
    }
}

async fn forget(registry: &Registry, id: &str) {
    let named = Named {
        cgroup_path: None,
        bundle: None,
    };
    match registry.unregister(id, named, 0).await {
        Ok(true) => tracing::info!(%id, "unregistered (NRI)"),
        Ok(false) => {}
        Err(e) => tracing::warn!(%id, "NRI unregistration failed: {e}"),
    }
}
