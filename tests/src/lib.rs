//! Fixtures for DOVE's integration suites. Each is an RAII guard that removes what it
//! created (daemon processes, cgroups, containers, temp dirs) when dropped.
//!
//! These suites need root: they create cgroups and run real containers. Without root a
//! test prints a loud SKIP line and returns — except under CI (`CI` set), where it fails.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dove_proto::{Client, Container, Registration, Reply, Request};

pub const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// True when the test may go on; prints a loud skip otherwise (and fails in CI).
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: this test needs root and CI must run it as root");
    }
    eprintln!("\n*** SKIP {test}: needs root (creates cgroups, runs containers) ***\n");
    false
}

/// The cgroup v2 mount on this host (hybrid hosts mount it at /sys/fs/cgroup/unified).
pub fn unified_mount() -> PathBuf {
    dove_cgroup::Mounts::discover()
        .expect("a cgroup2 hierarchy")
        .unified
        .mount_point
}

/// A built binary of this workspace (`doved`, `dovectl`, `dove-hook`).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("DOVE_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, or --release for benches)",
        path.display()
    );
    path
}

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `doved` on a temporary socket and state directory.
pub struct TempDaemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl TempDaemon {
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("dove-test-").tempdir()?;
        let socket = dir.path().join("run/dove.sock");
        let state_dir = dir.path().join("state");
        let log = dir.path().join("doved.log");
        let mut daemon = Self {
            child: None,
            dir,
            socket,
            state_dir,
            log,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// Start (again) on the same socket and state directory.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("doved"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting doved")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                bail!("doved exited with {status}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "doved did not start serving within 10 s: {}",
            self.log_text()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9` the daemon, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the daemon process is still alive.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket, Duration::from_secs(5)).expect("connect to doved")
    }

    pub fn list(&self) -> Vec<Container> {
        match self.client().call(Request::List).expect("list") {
            Reply::List { containers } => containers,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    pub fn find(&self, id: &str) -> Option<Container> {
        self.list().into_iter().find(|c| c.registration.id == id)
    }

    /// Wait until `cond` holds for the registry, or fail after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&[Container]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.list();
            if cond(&list) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; registry: {list:#?}\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TempDaemon {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        self.kill9();
    }
}

/// A cgroup v2 directory the test owns; removed (with any children, after killing their
/// processes) on drop.
pub struct TestCgroup {
    /// Path within the hierarchy, e.g. `/dove-test-1-0`.
    pub path: String,
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(prefix: &str) -> Result<Self> {
        let path = format!("/{}", unique(prefix));
        Self::at(&path)
    }

    pub fn at(path: &str) -> Result<Self> {
        let dir = unified_mount().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            path: path.to_owned(),
            dir,
        })
    }

    pub fn child(&self, name: &str) -> Result<TestCgroup> {
        Self::at(&format!("{}/{name}", self.path))
    }

    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.dir).expect("cgroup exists").ino()
    }

    /// A registration for this cgroup as the hook would send it.
    pub fn registration(&self, id: &str) -> Registration {
        Registration {
            id: id.to_owned(),
            cgroup_path: self.path.clone(),
            cgroup_id: self.id(),
            cpu_cgroup_path: None,
            cpu_cgroup_id: None,
            pid: None,
            annotations: Default::default(),
            runtime: Some("test".into()),
            stage: Some("createRuntime".into()),
            bundle: None,
        }
    }

    /// Remove the directory now (as a runtime would), leaving the guard harmless.
    pub fn remove(&self) -> Result<()> {
        remove_cgroup_tree(&self.dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = remove_cgroup_tree(&self.dir);
        // Runtimes on a hybrid host create the same path in every v1 hierarchy.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let dir = h.path().join(self.path.trim_start_matches('/'));
                if dir != self.dir && dir.is_dir() {
                    let _ = remove_cgroup_tree(&dir);
                }
            }
        }
    }
}

/// Kill every process under `dir` and remove the cgroup tree bottom-up.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The result of running `dove-hook` once.
#[derive(Debug)]
pub struct HookRun {
    pub code: i32,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Run `dove-hook` with `args` and `stdin`, logging to stderr (not journald) so the
/// test can read what it said.
pub fn run_hook(socket: &Path, args: &[&str], stdin: &[u8]) -> HookRun {
    let start = Instant::now();
    let mut child = Command::new(bin("dove-hook"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("DOVE_LOG_STDERR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dove-hook");
    // The hook may exit before reading everything (oversized input): ignore EPIPE.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    HookRun {
        code: status.code().unwrap_or(-1),
        stderr,
        elapsed: start.elapsed(),
    }
}

/// OCI state JSON as runc writes it to a hook.
pub fn state_json(id: &str, pid: Option<u32>, bundle: &Path) -> Vec<u8> {
    let mut state = serde_json::json!({
        "ociVersion": "1.0.2",
        "id": id,
        "status": if pid.is_some() { "creating" } else { "stopped" },
        "bundle": bundle,
        "annotations": {"io.dove.test": "yes"},
    });
    if let Some(pid) = pid {
        state["pid"] = pid.into();
    }
    serde_json::to_vec(&state).unwrap()
}

/// A busybox root filesystem shared by every container in this test process (read-only).
pub fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &ROOTFS
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("dove-rootfs-")
                .tempdir()
                .unwrap();
            let root = dir.path().join("rootfs");
            for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            let busybox = ["/bin/busybox", "/usr/bin/busybox"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .expect("busybox-static is installed (scripts/deps.sh)");
            std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
            for applet in ["sh", "sleep", "true", "cat", "echo"] {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
            std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
            std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
            (dir, root)
        })
        .1
}

/// Hook entries for a bundle's `config.json`.
pub fn hook_entry(socket: &Path, stage: &str) -> serde_json::Value {
    serde_json::json!({
        "path": bin("dove-hook").display().to_string(),
        "args": ["dove-hook", "--socket", socket.display().to_string(), "--timeout-ms", "5000", "--fail-closed", stage],
        "timeout": 10,
    })
}

/// An OCI bundle whose container runs `args` in the shared busybox rootfs.
pub struct Bundle {
    pub dir: tempfile::TempDir,
}

impl Bundle {
    /// `stages` lists the OCI stages at which dove-hook runs.
    pub fn new(args: &[&str], cgroups_path: &str, socket: &Path, stages: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("dove-bundle-").tempdir()?;
        let mut hooks = serde_json::Map::new();
        for stage in stages {
            hooks.insert(
                (*stage).to_owned(),
                serde_json::Value::Array(vec![hook_entry(socket, stage)]),
            );
        }
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/bin"],
                "cwd": "/",
                "noNewPrivileges": true
            },
            "root": {"path": busybox_rootfs(), "readonly": true},
            "hostname": "dove-test",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=65536k"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
            ],
            "hooks": hooks,
            "linux": {
                "cgroupsPath": cgroups_path,
                "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
                "resources": {"devices": [{"allow": false, "access": "rwm"}]}
            }
        });
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Run a command, failing with its output when it fails. Output goes through files, not
/// pipes: a runtime's `create` leaves the container holding its stdio, and a pipe would
/// never reach EOF.
pub fn run(cmd: &mut Command) -> Result<String> {
    let mut stdout = tempfile::tempfile()?;
    let mut stderr = tempfile::tempfile()?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    let read = |f: &mut std::fs::File| -> String {
        use std::io::Seek;
        let mut s = String::new();
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    };
    let (out, err) = (read(&mut stdout), read(&mut stderr));
    if !status.success() {
        bail!("{cmd:?} failed ({status}):\nstdout: {out}\nstderr: {err}");
    }
    Ok(out)
}
