//! `dove-hook`: the OCI hook that tells `doved` about containers.
//!
//! Runtimes (runc, crun, podman, CRI-O, containerd) run it at the stages named in the
//! spec's `hooks` (or in a hooks.d file) with the container's state JSON on stdin. It must
//! be fast and must not block container starts: every failure is logged and, unless
//! `--fail-closed` is given, the hook still exits 0.

// The hook is on the critical path of every container start, so it skips std's runtime
// set-up (which reads /proc/self/maps to find the main thread's stack and installs an
// alternate signal stack: about 0.06 ms of a ~1.2 ms run) and does the two parts of it
// that matter here itself, in `main`.
#![no_main]

use std::collections::BTreeMap;
use std::ffi::{CStr, OsString};
use std::io::Write;
use std::os::raw::{c_char, c_int};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use dove_cgroup::{cgroups_path_to_hierarchy_path, Mounts, Resolved};
use dove_proto::{
    Client, ClientError, ErrorCode, Registration, Reply, Request, DEFAULT_SOCKET,
    MAX_ANNOTATION_BYTES,
};
use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal};

use dove_hook::state::{self, read_state, HookState};

/// OCI hook stages (runtime-spec `config.md#posix-platform-hooks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    #[value(name = "createRuntime")]
    CreateRuntime,
    #[value(name = "createContainer")]
    CreateContainer,
    #[value(name = "startContainer")]
    StartContainer,
    #[value(name = "prestart")]
    Prestart,
    #[value(name = "poststart")]
    Poststart,
    #[value(name = "poststop")]
    Poststop,
    /// Take the stage from the state's `status`: `stopped` unregisters, `creating` and
    /// `created` register. For hooks.d files, which pass the same argv at every stage.
    #[value(name = "auto")]
    Auto,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::CreateRuntime => "createRuntime",
            Stage::CreateContainer => "createContainer",
            Stage::StartContainer => "startContainer",
            Stage::Prestart => "prestart",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
            Stage::Auto => "auto",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "dove-hook",
    version,
    about = "OCI hook: registers a container's cgroups with doved at create, unregisters it at poststop",
    long_about = "OCI hook: registers a container's cgroups with doved at create, unregisters it at poststop.\n\n\
Reads the OCI runtime state JSON on stdin. Fail-open by default: if doved is down, slow or the input is bad, \
the reason is logged (journald, else stderr) and the hook exits 0 so the container still starts; \
a request doved could not take is left in the spool beside its socket, which doved replays when it starts. \
With --fail-closed those cases exit 1 with the reason on stderr. One deadline (--timeout-ms) bounds the whole run."
)]
struct Args {
    /// doved's socket.
    #[arg(long, env = "DOVE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Exit non-zero (blocking the container) when registration fails.
    #[arg(long)]
    fail_closed: bool,
    /// The deadline for the whole hook: reading the state, connecting, asking doved.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    timeout_ms: u64,
    /// Stages at which the container is registered (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "createRuntime,prestart")]
    register_at: Vec<Stage>,
    /// Log filter (tracing syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// The OCI stage this invocation runs at.
    stage: Stage,
}

const SUCCESS: c_int = 0;
const FAILURE: c_int = 1;

/// The process's entry, called by the C runtime.
///
/// # Safety
/// `argv` holds `argc` valid NUL-terminated strings, as the C runtime guarantees.
#[no_mangle]
pub unsafe extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    let started = Instant::now();
    // What std's set-up would have done and the hook needs: a doved that closes the
    // connection mid-request must be an error the hook fails open on, not a SIGPIPE that
    // kills it (and fails the container start); and a runtime that starts the hook with
    // 0, 1 or 2 closed must not get the socket as fd 1 for a message to land on.
    // SAFETY: no other thread exists yet; SIG_IGN installs no handler code.
    let _ = unsafe { nix::sys::signal::signal(Signal::SIGPIPE, SigHandler::SigIgn) };
    for fd in 0..=2 {
        // SAFETY: F_GETFD only asks whether `fd` is open; it touches no memory.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } == -1 {
            // open(2) returns the lowest free descriptor, which is `fd`: 0..fd are open.
            let _ = nix::fcntl::open("/dev/null", OFlag::O_RDWR, nix::sys::stat::Mode::empty())
                .map(std::mem::forget);
        }
    }
    // The arguments from the C runtime itself: std would read them from glibc's
    // .init_array call, which other C libraries (musl) do not make.
    let args: Vec<OsString> = (0..usize::try_from(argc).unwrap_or(0))
        .map(|i| {
            // SAFETY: the C runtime hands main `argc` valid NUL-terminated strings.
            let arg = unsafe { CStr::from_ptr(*argv.add(i)) };
            OsString::from_vec(arg.to_bytes().to_vec())
        })
        .collect();
    let fail_closed = args.iter().any(|a| a == "--fail-closed");
    // A panic must not unwind out of `main` (that aborts) and, like every other failure,
    // must not block the container unless the operator asked for that.
    let code = std::panic::catch_unwind(|| hook_main(args, started)).unwrap_or_else(|_| {
        start_logging();
        tracing::error!(
            "dove-hook panicked; the container proceeds unregistered unless --fail-closed"
        );
        if fail_closed {
            FAILURE
        } else {
            SUCCESS
        }
    });
    let _ = std::io::stdout().flush();
    code
}

fn hook_main(argv: Vec<OsString>, started: Instant) -> c_int {
    let fail_closed = argv.iter().any(|a| a == "--fail-closed");
    let args = match Args::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return SUCCESS;
        }
        Err(e) => {
            // A misconfigured hook must not block containers unless the operator asked.
            dove_logging::init("dove-hook", "info", dove_logging::Target::Auto);
            let msg = e.to_string();
            let msg = msg.trim_end();
            tracing::error!("bad arguments, container not registered: {msg}");
            // Not eprintln!, which panics when stderr has no reader.
            let _ = writeln!(std::io::stderr(), "dove-hook: {msg}");
            return if fail_closed { FAILURE } else { SUCCESS };
        }
    };
    let _ = LOG_LEVEL.set(args.log_level.clone());
    if verbose(&args.log_level) {
        start_logging();
    }
    let deadline = started + Duration::from_millis(args.timeout_ms);
    match run(&args, deadline) {
        Ok(()) => SUCCESS,
        Err(e) if args.fail_closed => {
            start_logging();
            let e = dove_logging::describe(e.as_ref());
            tracing::error!(stage = args.stage.name(), "{e}");
            let _ = writeln!(std::io::stderr(), "dove-hook ({}): {e}", args.stage.name());
            FAILURE
        }
        Err(e) => {
            start_logging();
            let e = dove_logging::describe(e.as_ref());
            tracing::warn!(
                stage = args.stage.name(),
                "{e} (fail-open: the container proceeds unregistered)"
            );
            SUCCESS
        }
    }
}

fn refused_as_bad_request(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<ClientError>(),
        Some(ClientError::Daemon(e)) if e.code == ErrorCode::BadRequest
    )
}

/// The log filter from the command line, for a logger set up on first use.
static LOG_LEVEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Set up logging, once. A hook that succeeds says nothing at the default level (doved
/// logs every registration it takes), so the logger is set up when there is a warning to
/// give, or at start when the operator asked for more: connecting to the journal and
/// building the filter are a good part of what the hook costs over a process start.
fn start_logging() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let level = LOG_LEVEL.get().map_or("info", String::as_str);
        dove_logging::init("dove-hook", level, dove_logging::Target::Auto);
    });
}

/// Whether the operator asked for more than warnings (and the default `info`, at which
/// the hook has nothing more to say than warnings).
fn verbose(level: &str) -> bool {
    // RUST_LOG, when set, overrides --log-level (as in `dove_logging::init`).
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_owned());
    !matches!(
        level.trim().to_ascii_lowercase().as_str(),
        "" | "off" | "error" | "warn" | "info"
    )
}

/// Send `request`; when doved cannot be reached (and the hook fails open), leave it in
/// the spool for doved to replay at its next start.
fn deliver(args: &Args, deadline: Instant, request: Request) -> Result<Reply> {
    let result =
        Client::connect_until(&args.socket, deadline).and_then(|mut c| c.call(request.clone()));
    let error = match result {
        Ok(reply) => return Ok(reply),
        Err(e) => e,
    };
    let unreachable = matches!(
        &error,
        ClientError::NotRunning(_)
            | ClientError::Timeout { .. }
            | ClientError::QueueFull { .. }
            | ClientError::Closed { .. }
            | ClientError::Io { .. }
    ) || matches!(&error, ClientError::Daemon(e) if e.code == ErrorCode::Busy);
    if !unreachable || args.fail_closed {
        return Err(error.into());
    }
    let dir = dove_proto::spool::spool_dir(&args.socket);
    match dove_proto::spool::spool(&dir, &request) {
        Ok(path) => Err(anyhow::Error::new(error).context(format!(
            "request spooled to {}; doved replays it when it starts",
            path.display()
        ))),
        Err(e) => Err(anyhow::Error::new(error).context(format!(
            "and it could not be spooled in {}: {e}",
            dir.display()
        ))),
    }
}

fn run(args: &Args, deadline: Instant) -> Result<()> {
    let input = read_stdin_until(deadline, state::MAX_STATE_BYTES + 1)?;
    let state = read_state(&input)?;
    let stage = match (args.stage, state.status.as_deref()) {
        (Stage::Auto, Some("stopped")) => Stage::Poststop,
        (Stage::Auto, Some("creating" | "created")) => Stage::CreateRuntime,
        (Stage::Auto, other) => {
            tracing::debug!(status = ?other, "stage auto: nothing to do for this status");
            return Ok(());
        }
        (stage, _) => stage,
    };

    if stage == Stage::Poststop {
        let cgroup_path = configured_cgroup_path(&state);
        let unregister = |bundle| Request::Unregister {
            id: state.id.clone(),
            cgroup_path: cgroup_path.clone(),
            bundle,
        };
        let reply = match deliver(
            args,
            deadline,
            unregister(Some(state.bundle.display().to_string())),
        ) {
            // A doved from before `bundle` existed refuses the field it does not know:
            // say it the old way rather than leave the container registered.
            Err(e) if refused_as_bad_request(&e) => deliver(args, deadline, unregister(None))?,
            other => other?,
        };
        match reply {
            Reply::Unregistered { existed, .. } => {
                tracing::debug!(id = %state.id, existed, "unregistered");
            }
            other => anyhow::bail!("doved answered unregister with {other:?}"),
        }
        return Ok(());
    }
    if args.stage != Stage::Auto && !args.register_at.contains(&stage) {
        tracing::debug!(stage = stage.name(), "nothing to do at this stage");
        return Ok(());
    }

    let resolved = resolve(&state)?;
    let registration = Registration {
        id: state.id.clone(),
        cgroup_path: resolved.cgroup_path,
        cgroup_id: resolved.cgroup_id,
        cpu_cgroup_path: resolved.cpu_cgroup_path,
        cpu_cgroup_id: resolved.cpu_cgroup_id,
        pid: state.pid,
        annotations: bounded_annotations(state.annotations),
        runtime: parent_command(),
        stage: Some(stage.name().to_owned()),
        bundle: Some(state.bundle.display().to_string()),
    };
    let (id, cgroup_id) = (registration.id.clone(), registration.cgroup_id);
    match deliver(
        args,
        deadline,
        Request::Register {
            container: registration,
        },
    )? {
        Reply::Registered { replaced, .. } => {
            tracing::debug!(%id, cgroup_id, replaced, "registered");
            Ok(())
        }
        other => anyhow::bail!("doved answered register with {other:?}"),
    }
}

/// Up to `limit` bytes of stdin, to its end or until `deadline`: a runtime that never
/// closes the pipe must not hold the container's start beyond the hook's deadline.
fn read_stdin_until(deadline: Instant, limit: usize) -> Result<Vec<u8>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    // The descriptor itself, not std's buffered handle, so that what poll sees is all
    // there is.
    let stdin = std::io::stdin();
    let stdin = stdin.as_fd();
    let mut input = Vec::with_capacity(8 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    while input.len() < limit {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(left.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(stdin, PollFlags::POLLIN)];
        // A writer that trickles bytes keeps poll answering: the deadline still holds.
        let ready = if left.is_zero() {
            Ok(0)
        } else {
            poll(&mut fds, timeout)
        };
        match ready {
            Ok(0) => anyhow::bail!(
                "the OCI state on stdin did not end within the hook's deadline ({} bytes read): the runtime kept stdin open",
                input.len()
            ),
            Ok(_) => {}
            // Poll again with what is left of the deadline; a read now could block.
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for the OCI state on stdin"),
        }
        match nix::unistd::read(stdin, &mut chunk) {
            Ok(0) => break,
            Ok(n) => input.extend_from_slice(&chunk[..n.min(limit - input.len())]),
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(e).context("reading the OCI state from stdin"),
        }
    }
    Ok(input)
}

/// The container's cgroup as its bundle configures it, when the bundle is still readable:
/// it tells doved which of two containers with the same ID (from two runtimes or roots)
/// this poststop is about.
fn configured_cgroup_path(state: &HookState) -> Option<String> {
    let configured = configured_cgroups_path(state).ok()?;
    cgroups_path_to_hierarchy_path(configured.as_deref(), &state.id).ok()
}

/// Where the container's processes are accounted: from the live pid when there is one,
/// else from the bundle's `linux.cgroupsPath`.
fn resolve(state: &HookState) -> Result<Resolved> {
    // The common case without reading mountinfo; anything it cannot resolve gets the
    // whole discovery below.
    if let (Some(mounts), Some(pid)) = (Mounts::at_standard_places(), state.pid) {
        if let Ok(resolved) = mounts.resolve_pid(pid) {
            return Ok(resolved);
        }
    }
    let mounts = Mounts::discover()?;
    // The bundle is read only when the pid does not resolve.
    let mut unreadable = None;
    let resolved = mounts.resolve_container(
        std::path::Path::new("/proc"),
        state.pid,
        || {
            configured_cgroups_path(state)
                .map_err(|e| unreadable = Some(e))
                .ok()
                .flatten()
        },
        &state.id,
    );
    match (resolved, unreadable) {
        (Ok(r), _) => Ok(r),
        // Say why the bundle did not help: it is the fallback the operator can fix.
        (Err(e), Some(config_err)) => Err(anyhow::Error::new(e).context(config_err)),
        (Err(e), None) => Err(e.into()),
    }
}

/// The bundle's `linux.cgroupsPath` (None: the runtime's default), or why the bundle
/// could not be read.
fn configured_cgroups_path(state: &HookState) -> std::result::Result<Option<String>, String> {
    let config = state.bundle.join("config.json");
    let spec = oci_spec::runtime::Spec::load(&config)
        .map_err(|e| format!("the bundle's {} is unreadable ({e})", config.display()))?;
    Ok(spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned()))
}

/// Keep annotations within the protocol's budget, dropping the largest first: they are
/// useful labels, never worth failing a registration over.
fn bounded_annotations(mut annotations: BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut total = dove_proto::annotation_bytes(&annotations);
    if total <= MAX_ANNOTATION_BYTES {
        return annotations;
    }
    let mut by_size: Vec<(usize, String)> = annotations
        .iter()
        .map(|(k, v)| (k.len() + v.len(), k.clone()))
        .collect();
    by_size.sort_unstable_by(|a, b| b.cmp(a));
    for (size, key) in by_size {
        if total <= MAX_ANNOTATION_BYTES {
            break;
        }
        annotations.remove(&key);
        total -= size;
        start_logging();
        tracing::warn!(%key, size, "annotation dropped: annotations exceed {MAX_ANNOTATION_BYTES} bytes");
    }
    annotations
}

/// The runtime that ran us, by its command name (`runc`, `crun`, …).
fn parent_command() -> Option<String> {
    let ppid = std::os::unix::process::parent_id();
    std::fs::read_to_string(format!("/proc/{ppid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
