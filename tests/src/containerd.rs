//! A real containerd with NRI enabled, driven through CRI as the kubelet would: the
//! fixture for the NRI plugin's integration tests. Two series, unpacked by
//! `scripts/containerd.sh` ([`Major`]): Debian trixie's 1.7 ([`Containerd::start`]; NRI
//! 0.6, configuration `version = 2`, NRI enabled by the configuration) and Debian sid's
//! 2.x (`Containerd::start_version(Major::Two)`; NRI 0.8, configuration `version = 3` with
//! CRI split into its runtime, images and gRPC plugins, NRI on by default).
//!
//! Everything it runs is private to one fixture: root, state, the gRPC, ttrpc and NRI
//! sockets, runc's state root, the CNI and registry directories (empty: pods use the host
//! network, images are built here and imported, nothing is pulled) and the pods' parent
//! cgroup (`/dove-test-ctd-…`). Dropping it removes the pods, kills containerd, the shims
//! it started and their containers, unmounts what they left mounted and removes the
//! cgroups (in the unified hierarchy and in every v1 hierarchy of a hybrid host).
//!
//! containerd runs with the cgroupfs driver (`SystemdCgroup = false`). On a hybrid host
//! runc makes a container's cgroup in every v1 hierarchy (CPU limits are v1's
//! `cpu.cfs_quota_us`) and in the unified one as well (the `0::` line of
//! `/proc/PID/cgroup`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::{orphaned_fixtures, write_fixture_owner};
use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;
pub use k8s_cri::v1 as cri;
use sha2::Digest;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{run, unified_mount, unique, TestCgroup};

/// The image every pod's sandbox (pause) container runs: busybox `sleep infinity`.
pub const PAUSE_IMAGE: &str = "dove.invalid/pause:1";
/// A busybox image (every applet linked in /bin, `PATH=/bin`, `sh` by default).
pub const BUSYBOX_IMAGE: &str = "dove.invalid/busybox:1";

/// How long containerd may take to serve CRI, and any one CRI call: generous, the suites
/// run on two busy cores.
const TIMEOUT: Duration = Duration::from_secs(30);

/// What a container runs and how it is limited.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    /// An image imported into the fixture ([`BUSYBOX_IMAGE`] unless set).
    pub image: Option<String>,
    /// Overrides the image's entrypoint.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    /// CPU quota/period, shares, memory… as the kubelet would set them.
    pub resources: Option<cri::LinuxContainerResources>,
}

impl ContainerSpec {
    /// A busybox container named `name` running `command` (e.g. `["sleep", "60"]`).
    pub fn busybox(name: &str, command: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            command: command.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        }
    }

    /// With a CPU limit of `quota_us` per `period_us`, as the kubelet sets `limits.cpu`.
    pub fn cpu_limit(mut self, quota_us: i64, period_us: i64) -> Self {
        let r = self.resources.get_or_insert_with(Default::default);
        r.cpu_quota = quota_us;
        r.cpu_period = period_us;
        self
    }
}

/// A container's CRI status with its process (from the verbose info).
#[derive(Debug, Clone)]
pub struct ContainerState {
    pub status: cri::ContainerStatus,
    /// The container's init process as the host sees it, while it runs.
    pub pid: Option<u32>,
    /// containerd's verbose `info` (runtime spec, sandbox ID, pid…).
    pub info: serde_json::Value,
}

impl ContainerState {
    pub fn running(&self) -> bool {
        self.status.state == cri::ContainerState::ContainerRunning as i32
    }

    /// `linux.cgroupsPath` of the container's runtime spec (cgroupfs: a hierarchy path).
    pub fn cgroups_path(&self) -> Option<&str> {
        self.info
            .pointer("/runtimeSpec/linux/cgroupsPath")
            .and_then(|v| v.as_str())
    }
}

/// A containerd series: where its package comes from and which configuration format it
/// reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Major {
    /// 1.7, from Debian trixie: `version = 2`, NRI disabled unless configured.
    One,
    /// 2.x, from Debian sid: `version = 3`, NRI enabled by default.
    Two,
}

impl Major {
    /// The version's first number, also `scripts/containerd.sh`'s argument.
    pub fn number(self) -> u32 {
        match self {
            Major::One => 1,
            Major::Two => 2,
        }
    }

    /// The Debian suite `scripts/containerd.sh` fetches the series from.
    pub fn suite(self) -> &'static str {
        match self {
            Major::One => "trixie",
            Major::Two => "sid",
        }
    }

    /// The variable naming an unpacked package of the series, overriding the script.
    pub fn dir_variable(self) -> &'static str {
        match self {
            Major::One => "DOVE_CONTAINERD_DIR",
            Major::Two => "DOVE_CONTAINERD2_DIR",
        }
    }
}

/// A containerd with NRI and CRI on private sockets; see the module documentation.
pub struct Containerd {
    child: Option<Child>,
    /// The series it belongs to.
    pub major: Major,
    /// What `containerd --version` says its version is (e.g. `2.1.9+unknown`).
    pub version: String,
    /// Everything the fixture writes (root, state, sockets, log, images).
    pub dir: tempfile::TempDir,
    /// The unpacked package's `usr/bin` (containerd, ctr, containerd-shim-runc-v2).
    pub bin_dir: PathBuf,
    pub config: PathBuf,
    /// containerd's gRPC socket (CRI and containerd's own API).
    pub socket: PathBuf,
    nri_socket: PathBuf,
    pub log: PathBuf,
    /// runc's state root; CRI's containers are in `<runc_root>/k8s.io`.
    pub runc_root: PathBuf,
    /// The cgroup (hierarchy path) every pod of this fixture is made under.
    pub cgroup_parent: String,
    /// How long the last (re)start took until CRI answered.
    pub started_in: Duration,
    /// How long building and importing the images took.
    pub images_in: Duration,
    rt: tokio::runtime::Runtime,
    channel: Mutex<Option<Channel>>,
    /// Every pod's config, which CreateContainer must be given again.
    pods: Mutex<HashMap<String, cri::PodSandboxConfig>>,
}

/// The directory of an unpacked containerd package of series `major`: its
/// [`Major::dir_variable`] (`DOVE_CONTAINERD_DIR`, `DOVE_CONTAINERD2_DIR`) if set, else
/// what `scripts/containerd.sh <major>` prints (the newest version of the series under
/// /var/cache/dove/containerd, fetched from the series' Debian suite first if there is
/// none).
pub fn containerd_dir(major: Major) -> Result<PathBuf> {
    let variable = major.dir_variable();
    if let Some(dir) = std::env::var_os(variable) {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            dir.join("usr/bin/containerd").exists(),
            "{variable}={} holds no usr/bin/containerd",
            dir.display()
        );
        return Ok(dir);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/containerd.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(major.number().to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !dir.join("usr/bin/containerd").exists() {
        bail!(
            "no containerd {}.x: {} {} failed ({}). It fetches Debian {}'s containerd into \
             /var/cache/dove/containerd (as root, from deb.debian.org); run it (or \
             scripts/fixtures.sh), or set {variable} to an unpacked containerd package",
            major.number(),
            script.display(),
            major.number(),
            out.status,
            major.suite()
        );
    }
    Ok(dir)
}

/// The version `containerd --version` prints (its third word: `containerd
/// github.com/containerd/containerd/v2 2.1.9+unknown`).
fn containerd_version(containerd: &Path) -> Result<String> {
    let out = run(Command::new(containerd).arg("--version"))?;
    out.split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .with_context(|| format!("{} --version printed {out:?}", containerd.display()))
}

/// The runc the shims run: `DOVE_CONTAINERD_RUNC` (e.g. a wrapper that logs), else
/// Debian's.
pub fn runc() -> PathBuf {
    std::env::var_os("DOVE_CONTAINERD_RUNC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/runc"))
}

/// containerd's configuration in the format of series `major`: everything under `d`,
/// NRI on, CRI without CNI or registry.
fn config_toml(major: Major, d: &Path, runc_root: &Path) -> String {
    match major {
        Major::One => config_toml_1(d, runc_root),
        Major::Two => config_toml_2(d, runc_root),
    }
}

/// containerd 1.7's configuration (`version = 2`).
fn config_toml_1(d: &Path, runc_root: &Path) -> String {
    let d = d.display();
    let runc_root = runc_root.display();
    let runc = runc().display().to_string();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters this host cannot have (and aufs would modprobe), tracing.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/run/containerd.sock"
[ttrpc]
  address = "{d}/run/containerd.sock.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.runtime.v1.linux"]
  runtime_root = "{d}/runc-v1"

[plugins."io.containerd.nri.v1.nri"]
  disable = false
  disable_connections = false
  socket_path = "{d}/run/nri.sock"
  plugin_path = "{d}/nri/plugins"
  plugin_config_path = "{d}/nri/conf"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "2s"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # CRI gives a sandbox oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE, which
  # some hosts (and CI sandboxes) withhold even from root: runc's init then fails with
  # "can't get final child's PID from pipe". Never below containerd's own score.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#
    )
}

/// containerd 2.x's configuration (`version = 3`): CRI is three plugins (the runtime, the
/// images, the gRPC service), the sandbox image is pinned in the images plugin, NRI is
/// enabled by default (only its paths are set). Everything 1.7 has none of is private
/// too: the temp directory, CDI (off), the image verifiers, the transfer service's
/// registry hosts.
fn config_toml_2(d: &Path, runc_root: &Path) -> String {
    let d = d.display();
    let runc_root = runc_root.display();
    let runc = runc().display().to_string();
    format!(
        r#"version = 3
root = "{d}/root"
state = "{d}/state"
temp = "{d}/tmp"
# Snapshotters this host cannot have (erofs needs mkfs.erofs), tracing.
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{d}/run/containerd.sock"
[ttrpc]
  address = "{d}/run/containerd.sock.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.image-verifier.v1.bindir"]
  bin_dir = "{d}/image-verifier"
[plugins."io.containerd.transfer.v1.local"]
  config_path = "{d}/certs.d"

# On by default (`disable = false`, `disable_connections = false`).
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "{d}/run/nri.sock"
  plugin_path = "{d}/nri/plugins"
  plugin_config_path = "{d}/nri/conf"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "2s"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{d}/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  # CRI gives a sandbox oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE, which
  # some hosts (and CI sandboxes) withhold even from root: runc's init then fails with
  # "can't get final child's PID from pipe". Never below containerd's own score.
  restrict_oom_score_adj = true
  enable_cdi = false
  cdi_spec_dirs = ["{d}/cdi"]
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{d}/cni/bin"]
    conf_dir = "{d}/cni/net.d"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#
    )
}

impl Containerd {
    /// Start containerd 1.7 ([`Major::One`]); see [`Containerd::start_version`].
    pub fn start() -> Result<Self> {
        Self::start_version(Major::One)
    }

    /// Start a containerd of series `major`, wait until CRI answers and import the pause
    /// and busybox images.
    pub fn start_version(major: Major) -> Result<Self> {
        let pkg = containerd_dir(major)?;
        let version = containerd_version(&pkg.join("usr/bin/containerd"))?;
        anyhow::ensure!(
            version.starts_with(&format!("{}.", major.number())),
            "{} holds containerd {version}, not of the {}.x series",
            pkg.display(),
            major.number()
        );
        reap_stale();
        let dir = tempfile::Builder::new().prefix("dove-ctd-").tempdir()?;
        let d = dir.path();
        for sub in [
            "run",
            "nri/plugins",
            "nri/conf",
            "opt",
            "cni/bin",
            "cni/net.d",
            "certs.d",
            "cdi",
            "image-verifier",
            "tmp",
            "pods",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let config = d.join("config.toml");
        let runc_root = d.join("runc");
        std::fs::write(&config, config_toml(major, d, &runc_root))?;
        let cgroup_parent = format!("/{}", unique("dove-test-ctd"));
        write_fixture_owner(d, &[&cgroup_parent])?;
        let mut ctd = Self {
            child: None,
            major,
            version,
            bin_dir: pkg.join("usr/bin"),
            config,
            socket: d.join("run/containerd.sock"),
            nri_socket: d.join("run/nri.sock"),
            log: d.join("containerd.log"),
            runc_root,
            cgroup_parent,
            started_in: Duration::ZERO,
            images_in: Duration::ZERO,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            channel: Mutex::new(None),
            pods: Mutex::new(HashMap::new()),
            dir,
        };
        ctd.spawn()?;
        let begin = Instant::now();
        ctd.import_images()?;
        ctd.images_in = begin.elapsed();
        Ok(ctd)
    }

    /// containerd's NRI socket, where plugins connect.
    pub fn nri_socket(&self) -> &Path {
        &self.nri_socket
    }

    /// The directory containerd starts NRI plugins from (empty unless a test puts one
    /// there before a restart).
    pub fn nri_plugin_dir(&self) -> PathBuf {
        self.dir.path().join("nri/plugins")
    }

    /// Everything containerd logged (across restarts).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// containerd's process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop containerd (SIGTERM, as systemd would) and start it again on the same
    /// directories; the shims, and the containers they run, live on. Returns how long the
    /// new containerd took to answer CRI.
    pub fn restart(&mut self) -> Result<Duration> {
        self.stop();
        self.spawn()?;
        Ok(self.started_in)
    }

    /// SIGTERM containerd and wait for it (SIGKILL after 10 s). Its shims keep running.
    pub fn stop(&mut self) {
        *self.channel.lock().unwrap() = None;
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let begin = Instant::now();
        let _ = std::fs::remove_file(&self.socket);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(log, "=== dove test fixture: starting containerd ===")?;
        // The shim (containerd-shim-runc-v2) is found on PATH.
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.bin_dir.display()
        );
        let child = Command::new(self.bin_dir.join("containerd"))
            .arg("--config")
            .arg(&self.config)
            .env("PATH", path)
            // containerd mounts layers in TMPDIR while it unpacks them.
            .env("TMPDIR", self.dir.path().join("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        let mut last = String::from("no socket yet");
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                bail!("containerd exited with {status}:\n{}", self.log_text());
            }
            if self.socket.exists() {
                match self.ready() {
                    Ok(()) => break,
                    Err(e) => last = format!("{e:#}"),
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd's CRI did not answer within {TIMEOUT:?} ({last}):\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.started_in = begin.elapsed();
        Ok(())
    }

    /// Ok once CRI reports the runtime ready (not the network: there is no CNI, and
    /// host-network pods need none).
    fn ready(&self) -> Result<()> {
        *self.channel.lock().unwrap() = None;
        let status = self.cri(|mut c| async move {
            c.status(cri::StatusRequest { verbose: false })
                .await
                .map(|r| r.into_inner())
        })?;
        let ready = status
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .any(|c| c.r#type == "RuntimeReady" && c.status);
        anyhow::ensure!(ready, "runtime not ready: {status:?}");
        Ok(())
    }

    fn channel(&self) -> Result<Channel> {
        let mut cached = self.channel.lock().unwrap();
        if let Some(ch) = &*cached {
            return Ok(ch.clone());
        }
        let socket = self.socket.clone();
        let ch = self.rt.block_on(async move {
            // The URI is a placeholder: the connector dials the unix socket.
            Endpoint::try_from("http://[::]:0")?
                .timeout(TIMEOUT)
                .connect_timeout(TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                }))
                .await
        })?;
        *cached = Some(ch.clone());
        Ok(ch)
    }

    /// Run one call on CRI's runtime service (for what the wrappers below lack).
    pub fn cri<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let client = RuntimeServiceClient::new(self.channel()?);
        self.rt
            .block_on(call(client))
            .map_err(|s| anyhow!("CRI: {:?}: {}", s.code(), s.message()))
    }

    /// Run one call on CRI's image service.
    pub fn cri_images<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: FnOnce(ImageServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let client = ImageServiceClient::new(self.channel()?);
        self.rt
            .block_on(call(client))
            .map_err(|s| anyhow!("CRI: {:?}: {}", s.code(), s.message()))
    }

    /// Build the images (an OCI archive) and import them with the package's `ctr`, then
    /// wait until CRI's image store has them (it learns of them from events).
    fn import_images(&self) -> Result<()> {
        let archive = self.dir.path().join("images.tar");
        build_image_archive(&archive)?;
        run(Command::new(self.bin_dir.join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive))
        .context("importing the test images")?;
        let deadline = Instant::now() + TIMEOUT;
        for image in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
            loop {
                let status = self.cri_images(|mut c| async move {
                    c.image_status(cri::ImageStatusRequest {
                        image: Some(cri::ImageSpec {
                            image: image.to_owned(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
                    .map(|r| r.into_inner())
                })?;
                if status.image.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "CRI does not see the imported {image}:\n{}",
                        self.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The cgroup parent of the pod with UID `uid` (as the kubelet's cgroupfs driver would
    /// name it, under this fixture's parent).
    pub fn pod_cgroup_parent(&self, uid: &str) -> String {
        format!("{}/pod{uid}", self.cgroup_parent)
    }

    /// Run a pod sandbox on the host network (no CNI); returns its ID.
    pub fn run_pod_sandbox(&self, name: &str, namespace: &str, uid: &str) -> Result<String> {
        let log_directory = self.dir.path().join("pods").join(uid);
        std::fs::create_dir_all(&log_directory)?;
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_owned(),
                uid: uid.to_owned(),
                namespace: namespace.to_owned(),
                attempt: 0,
            }),
            log_directory: log_directory.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.pod_cgroup_parent(uid),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .cri(|mut c| async move { c.run_pod_sandbox(request).await })
            .with_context(|| format!("RunPodSandbox {namespace}/{name}"))?
            .into_inner()
            .pod_sandbox_id;
        self.pods.lock().unwrap().insert(id.clone(), config);
        Ok(id)
    }

    /// Create (not start) a container in pod `pod`; returns its ID.
    pub fn create_container(&self, pod: &str, spec: &ContainerSpec) -> Result<String> {
        let sandbox = self
            .pods
            .lock()
            .unwrap()
            .get(pod)
            .cloned()
            .with_context(|| format!("pod {pod} was not run by this fixture"))?;
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: spec.image.as_deref().unwrap_or(BUSYBOX_IMAGE).to_owned(),
                ..Default::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            labels: spec.labels.clone(),
            annotations: spec.annotations.clone(),
            log_path: format!("{}.log", spec.name),
            linux: Some(cri::LinuxContainerConfig {
                resources: spec.resources.clone(),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.to_owned(),
            config: Some(config),
            sandbox_config: Some(sandbox),
        };
        Ok(self
            .cri(|mut c| async move { c.create_container(request).await })
            .with_context(|| format!("CreateContainer {}", spec.name))?
            .into_inner()
            .container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let container_id = id.to_owned();
        self.cri(|mut c| async move {
            c.start_container(cri::StartContainerRequest { container_id })
                .await
        })
        .with_context(|| format!("StartContainer {id}"))?;
        Ok(())
    }

    /// Stop a container: its stop signal, then SIGKILL after `timeout_s` (0: at once).
    pub fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let container_id = id.to_owned();
        self.cri(|mut c| async move {
            c.stop_container(cri::StopContainerRequest {
                container_id,
                timeout: timeout_s,
            })
            .await
        })
        .with_context(|| format!("StopContainer {id}"))?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let container_id = id.to_owned();
        self.cri(|mut c| async move {
            c.remove_container(cri::RemoveContainerRequest { container_id })
                .await
        })
        .with_context(|| format!("RemoveContainer {id}"))?;
        Ok(())
    }

    /// Stop a pod: its containers are killed, its sandbox stopped.
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let pod_sandbox_id = id.to_owned();
        self.cri(|mut c| async move {
            c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id })
                .await
        })
        .with_context(|| format!("StopPodSandbox {id}"))?;
        Ok(())
    }

    /// Remove a (stopped) pod and its containers.
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let pod_sandbox_id = id.to_owned();
        self.cri(|mut c| async move {
            c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id })
                .await
        })
        .with_context(|| format!("RemovePodSandbox {id}"))?;
        self.pods.lock().unwrap().remove(id);
        Ok(())
    }

    pub fn list_containers(&self) -> Result<Vec<cri::Container>> {
        Ok(self
            .cri(|mut c| async move {
                c.list_containers(cri::ListContainersRequest { filter: None })
                    .await
            })?
            .into_inner()
            .containers)
    }

    pub fn list_pod_sandboxes(&self) -> Result<Vec<cri::PodSandbox>> {
        Ok(self
            .cri(|mut c| async move {
                c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                    .await
            })?
            .into_inner()
            .items)
    }

    /// A container's status, with its pid and containerd's verbose info.
    pub fn container_status(&self, id: &str) -> Result<ContainerState> {
        let container_id = id.to_owned();
        let reply = self
            .cri(|mut c| async move {
                c.container_status(cri::ContainerStatusRequest {
                    container_id,
                    verbose: true,
                })
                .await
            })
            .with_context(|| format!("ContainerStatus {id}"))?
            .into_inner();
        let info: serde_json::Value = reply
            .info
            .get("info")
            .map(|s| serde_json::from_str(s))
            .transpose()
            .context("ContainerStatus verbose info")?
            .unwrap_or_default();
        let pid = info
            .get("pid")
            .and_then(|p| p.as_u64())
            .filter(|&p| p > 0)
            .map(|p| p as u32);
        Ok(ContainerState {
            status: reply.status.context("ContainerStatus without status")?,
            pid,
            info,
        })
    }

    /// Change a running container's resources (e.g. its CPU quota), as the kubelet does
    /// for an in-place resize.
    pub fn update_container_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<()> {
        let container_id = id.to_owned();
        self.cri(|mut c| async move {
            c.update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id,
                linux: Some(resources),
                ..Default::default()
            })
            .await
        })
        .with_context(|| format!("UpdateContainerResources {id}"))?;
        Ok(())
    }

    /// Stop and remove every pod (and so every container) through CRI.
    pub fn remove_all_pods(&self) -> Result<()> {
        for pod in self.list_pod_sandboxes()? {
            self.stop_pod_sandbox(&pod.id)?;
            self.remove_pod_sandbox(&pod.id)?;
        }
        Ok(())
    }

    /// The shims this fixture's containerd started.
    pub fn shim_pids(&self) -> Vec<i32> {
        shims_of(&self.socket)
    }

    /// Kill what the fixture started, unmount what it mounted; see [`Drop`].
    fn teardown(&mut self) {
        // The shims exit by themselves once their pod is removed, but not at once.
        let shims = self.shim_pids();
        if self.child.is_some() {
            let _ = self.remove_all_pods();
        }
        self.stop();
        clean_up(self.dir.path(), &self.cgroup_parent, shims);
    }
}

/// Clean up after fixtures whose test process died without dropping them (a test binary
/// killed by a timeout): their containerd, shims, containers, mounts, cgroups and
/// directory.
fn reap_stale() {
    for (dir, owner) in orphaned_fixtures("dove-ctd-") {
        let Some(parent) = owner.first() else {
            continue;
        };
        // Its containerd, found by its configuration file.
        let config = dir.join("config.toml");
        for pid in processes_with_args(|args| {
            args.windows(2)
                .any(|w| w[0] == b"--config" && w[1] == config.as_os_str().as_encoded_bytes())
        }) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        clean_up(&dir, parent, Vec::new());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// With containerd stopped: kill the containers (runc) and shims left in fixture
/// directory `dir` (also `shims`, found before they began to exit), remove the shims'
/// sockets and the cgroups under `cgroup_parent`, unmount everything under `dir`.
fn clean_up(dir: &Path, cgroup_parent: &str, mut shims: Vec<i32>) {
    // Containers a test (or a crash) left: runc kills them and removes their cgroups.
    let runc_ns = dir.join("runc/k8s.io");
    if let Ok(entries) = std::fs::read_dir(&runc_ns) {
        for e in entries.flatten() {
            let _ = Command::new(runc())
                .arg("--root")
                .arg(&runc_ns)
                .args(["delete", "--force"])
                .arg(e.file_name())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    // The shims (and the sockets they made in /run/containerd/s).
    shims.extend(shims_of(&dir.join("run/containerd.sock")));
    for &pid in &shims {
        if alive(pid as u32) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while shims.iter().any(|&pid| alive(pid as u32)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    for socket in shim_sockets(dir) {
        let _ = std::fs::remove_file(socket);
    }
    // The pods' cgroups, in the unified hierarchy and every v1 one (TestCgroup's drop
    // kills what is left in them and removes them bottom-up).
    if cgroup_parent.len() > 1 && cgroup_parent.starts_with("/dove-test-ctd-") {
        drop(TestCgroup {
            path: cgroup_parent.to_owned(),
            dir: unified_mount().join(cgroup_parent.trim_start_matches('/')),
        });
    }
    unmount_under(dir);
}

/// The sockets (in /run/containerd/s) of the shims serving the tasks of fixture directory
/// `dir`, as their bundles name them: `bootstrap.json`'s `address` (containerd 2.x) or
/// the `address` file (1.7).
pub fn shim_sockets(dir: &Path) -> Vec<PathBuf> {
    let tasks = dir.join("state/io.containerd.runtime.v2.task/k8s.io");
    let Ok(bundles) = std::fs::read_dir(&tasks) else {
        return Vec::new();
    };
    let mut sockets: Vec<PathBuf> = bundles
        .flatten()
        .filter_map(|bundle| {
            let bootstrap = std::fs::read(bundle.path().join("bootstrap.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("address")?.as_str().map(str::to_owned));
            let address = bootstrap
                .or_else(|| std::fs::read_to_string(bundle.path().join("address")).ok())?;
            let address = address.trim();
            Some(PathBuf::from(
                address.strip_prefix("unix://").unwrap_or(address),
            ))
        })
        .collect();
    // A pod's containers share their sandbox's shim.
    sockets.sort();
    sockets.dedup();
    sockets
}

/// The shims started by the containerd serving `socket` (their `-address`).
fn shims_of(socket: &Path) -> Vec<i32> {
    let socket = socket.as_os_str().as_encoded_bytes();
    processes_with_args(|args| {
        let ours = args
            .windows(2)
            .any(|w| w[0] == b"-address" && w[1] == socket);
        ours && args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
    })
}

/// The live processes whose command line (split at NULs) satisfies `matches`.
fn processes_with_args(matches: impl Fn(&[&[u8]]) -> bool) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if matches(&args) {
            pids.push(pid);
        }
    }
    pids
}

impl Drop for Containerd {
    /// Remove the pods through CRI, stop containerd, kill its shims and any container
    /// left, remove the shims' sockets and the pods' cgroups, unmount everything under
    /// the fixture's directory, which the temp dir's drop then removes.
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Whether process `pid` exists and has not exited (an exited one stays a zombie until
/// its parent, for a shim init, reaps it).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_comm = &stat[stat.rfind(')')? + 1..];
            after_comm
                .split_whitespace()
                .next()
                .map(|s| s != "Z" && s != "X")
        })
        .unwrap_or(false)
}

/// Host network, a PID namespace per container, IPC shared in the pod: what the kubelet
/// asks for a `hostNetwork: true` pod.
fn namespace_options() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// Unmount (lazily, deepest first) every mount at or under `dir`.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = (b[i] == b'\\')
            .then(|| b.get(i + 1..i + 4))
            .flatten()
            .and_then(|o| std::str::from_utf8(o).ok())
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The OCI architecture name of this build's target.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// One image layer (an uncompressed tar): Debian's static busybox with every applet
/// linked in /bin, /etc/passwd and /etc/group, and the directories a container mounts on.
/// Deterministic (owner root, mtime 0), so its digest only changes with busybox.
fn busybox_layer() -> Result<Vec<u8>> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("busybox-static is installed (scripts/deps.sh)")?;
    let binary = std::fs::read(busybox)?;
    let applets = run(Command::new(busybox).arg("--list"))?;
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    };
    for (d, mode) in [
        ("bin/", 0o755),
        ("dev/", 0o755),
        ("etc/", 0o755),
        ("proc/", 0o555),
        ("sys/", 0o555),
        ("tmp/", 0o1777),
    ] {
        tar.append_data(
            &mut header(tar::EntryType::Directory, mode, 0),
            d,
            std::io::empty(),
        )?;
    }
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, binary.len() as u64),
        "bin/busybox",
        &binary[..],
    )?;
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        tar.append_link(
            &mut header(tar::EntryType::Symlink, 0o777, 0),
            format!("bin/{applet}"),
            "busybox",
        )?;
    }
    for (f, text) in [
        ("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
    ] {
        tar.append_data(
            &mut header(tar::EntryType::Regular, 0o644, text.len() as u64),
            f,
            text.as_bytes(),
        )?;
    }
    Ok(tar.into_inner()?)
}

/// Write an OCI image-layout archive holding [`PAUSE_IMAGE`] (`sleep infinity`) and
/// [`BUSYBOX_IMAGE`] (`sh`), both of the one busybox layer, named by the
/// `io.containerd.image.name` annotation `ctr images import` reads.
pub fn build_image_archive(path: &Path) -> Result<()> {
    let layer = busybox_layer()?;
    let layer_digest = format!("sha256:{}", sha256_hex(&layer));
    let mut blobs: Vec<Vec<u8>> = vec![layer.clone()];
    let mut manifests = Vec::new();
    for (name, entrypoint, cmd) in [
        (PAUSE_IMAGE, vec!["/bin/sleep", "infinity"], vec![]),
        (BUSYBOX_IMAGE, vec![], vec!["sh"]),
    ] {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": oci_arch(),
            "os": "linux",
            "config": {
                "Env": ["PATH=/bin"],
                "Entrypoint": entrypoint,
                "Cmd": cmd,
                "WorkingDir": "/",
            },
            // An uncompressed layer's diff ID is its digest.
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "dove tests: busybox-static"}],
        }))?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{}", sha256_hex(&config)),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))?;
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "platform": {"architecture": oci_arch(), "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap(),
            },
        }));
        blobs.push(config);
        blobs.push(manifest);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(path)?));
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for blob in &blobs {
        add(&format!("blobs/sha256/{}", sha256_hex(blob)), blob)?;
    }
    tar.into_inner()?.flush()?;
    Ok(())
}
