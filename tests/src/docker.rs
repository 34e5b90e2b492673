//! A private Docker daemon for the Docker suite (`tests/tests/docker.rs`): Debian
//! bookworm's dockerd 20.10, unpacked by `scripts/docker.sh` (not installed), on its own
//! data root, exec root, pid file, socket, configuration file and cgroup parent, with the
//! containerd it starts for itself. Nothing it does is seen by a Docker on the host, and
//! dropping it removes everything it made: containers, its network, its containerd and
//! shims, the mounts under its directories, its cgroups.
//!
//! Networking: no iptables, no default bridge (`--iptables=false --bridge=none`); a
//! test that needs traffic into a container asks for a bridge network of its own
//! ([`Dockerd::bridge_network`]): the host reaches the containers on it directly, on the
//! bridge's subnet, without NAT.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{bin, orphaned_fixtures, remove_cgroup_tree, unique, write_fixture_owner};

/// The directory `scripts/docker.sh` unpacked Docker into (it fetches it the first time).
pub fn docker_dir() -> Result<PathBuf> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = DIR.get() {
        return Ok(dir.clone());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/docker.sh");
    let out = crate::run(Command::new("bash").arg(&script))
        .context("fetching Docker with scripts/docker.sh")?;
    let dir = PathBuf::from(out.lines().last().unwrap_or_default().trim());
    anyhow::ensure!(
        dir.join("usr/sbin/dockerd").exists(),
        "{} printed {dir:?}, which holds no usr/sbin/dockerd",
        script.display()
    );
    Ok(DIR.get_or_init(|| dir).clone())
}

/// A bridge network of the daemon's own.
#[derive(Debug, Clone)]
pub struct BridgeNetwork {
    /// The network's name for `docker run --network`.
    pub name: String,
    /// The host's bridge interface.
    pub interface: String,
    /// The host's address on it (the gateway).
    pub gateway: String,
}

/// A running dockerd of the test's own.
pub struct Dockerd {
    child: Option<Child>,
    /// Data root, exec root, socket, pid file, configuration, log: all in here.
    pub dir: tempfile::TempDir,
    /// Where Docker was unpacked.
    pub docker_dir: PathBuf,
    pub socket: PathBuf,
    pub pidfile: PathBuf,
    /// The `--config-file`, which tests may edit and then [`Dockerd::reload`].
    pub config: PathBuf,
    pub log: PathBuf,
    /// Containers' cgroups are `<cgroup_parent>/<full container ID>` in every hierarchy.
    pub cgroup_parent: String,
    /// How long dockerd took from spawn to answering `/_ping`.
    pub started_in: Duration,
    networks: Vec<BridgeNetwork>,
}

impl Dockerd {
    /// Start dockerd with a `daemon.json` made of `settings` (a JSON object) and the
    /// keys the fixture needs; returns once it answers on its socket.
    pub fn start(settings: serde_json::Value) -> Result<Self> {
        let docker_dir = docker_dir()?;
        reap_stale();
        let dir = tempfile::Builder::new().prefix(PREFIX).tempdir()?;
        let config = dir.path().join("daemon.json");
        let mut json = serde_json::json!({
            // dockerd 20.10 writes its identity key to /etc/docker unless told otherwise.
            "deprecated-key-path": dir.path().join("key.json"),
        });
        if let serde_json::Value::Object(extra) = settings {
            json.as_object_mut().expect("an object").extend(extra);
        }
        std::fs::write(&config, serde_json::to_vec_pretty(&json)?)?;
        let cgroup_parent = format!("/{}", unique("dove-docker"));
        write_owner(dir.path(), &cgroup_parent, &[])?;
        let mut dockerd = Self {
            child: None,
            socket: dir.path().join("docker.sock"),
            pidfile: dir.path().join("docker.pid"),
            log: dir.path().join("dockerd.log"),
            config,
            cgroup_parent,
            started_in: Duration::ZERO,
            networks: Vec::new(),
            docker_dir,
            dir,
        };
        dockerd.spawn()?;
        Ok(dockerd)
    }

    fn path_env(&self) -> std::ffi::OsString {
        let mut paths = vec![
            self.docker_dir.join("usr/bin"),
            self.docker_dir.join("usr/sbin"),
        ];
        paths.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::join_paths(paths).expect("PATH entries without ':'")
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let start = Instant::now();
        let d = self.dir.path();
        let child = Command::new(self.docker_dir.join("usr/sbin/dockerd"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(&self.pidfile)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--config-file")
            .arg(&self.config)
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .arg(format!("--cgroup-parent={}", self.cgroup_parent))
            // Containers left at drop are removed first; this only bounds a stuck one.
            .args(["--shutdown-timeout", "2"])
            .env("PATH", self.path_env())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        self.child = Some(child);
        let deadline = start + Duration::from_secs(60);
        loop {
            if self.ping() {
                self.started_in = start.elapsed();
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait()? {
                self.child = None;
                bail!("dockerd exited with {status}:\n{}", self.log_tail(40));
            }
            if Instant::now() > deadline {
                bail!("dockerd did not answer within 60 s:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether dockerd answers `GET /_ping` with OK.
    pub fn ping(&self) -> bool {
        let Ok(mut conn) = UnixStream::connect(&self.socket) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        if conn
            .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut response = String::new();
        let _ = conn.read_to_string(&mut response);
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
    }

    /// dockerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether dockerd is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The `docker` CLI aimed at this daemon, with a private client configuration.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.docker_dir.join("usr/bin/docker"));
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.path().join("client"))
            .env("PATH", self.path_env());
        cmd
    }

    /// Run `docker args…`; its stdout, or an error with both outputs and dockerd's log.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self.docker_output(args)?;
        if !out.status.success() {
            bail!(
                "docker {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndockerd log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(30)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Run `docker args…` and return what it did, failing or not.
    pub fn docker_output(&self, args: &[&str]) -> Result<Output> {
        self.cli(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running docker {args:?}"))
    }

    /// `docker inspect --format FORMAT container`, trimmed.
    pub fn inspect(&self, container: &str, format: &str) -> Result<String> {
        Ok(self
            .docker(&["inspect", "--format", format, container])?
            .trim()
            .to_owned())
    }

    /// How many configuration reloads dockerd has finished (a refused one logs only
    /// its error).
    pub fn reloads(&self) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("Reloaded configuration"))
            .count()
    }

    /// Wait until dockerd has finished more than `before` reloads.
    pub fn wait_reloaded(&self, before: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.reloads() <= before {
            if Instant::now() > deadline {
                bail!(
                    "dockerd finished no reload in 10 s (refused, or no SIGHUP):\n{}",
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGHUP dockerd, as `systemctl reload docker` does, and wait for the reload.
    pub fn reload(&self) -> Result<()> {
        let before = self.reloads();
        let pid = self.pid().context("dockerd is not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )?;
        self.wait_reloaded(before)
    }

    /// The last `lines` lines of dockerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Import a busybox image (every applet linked) as `name` with `docker import`.
    pub fn import_busybox(&self, name: &str) -> Result<()> {
        let root = self.dir.path().join("busybox-root");
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("busybox-static is installed (scripts/deps.sh)")?;
        std::fs::copy(busybox, root.join("bin/busybox"))?;
        let applets = crate::run(Command::new(busybox).arg("--list"))?;
        for applet in applets.lines().map(str::trim) {
            if !applet.is_empty() && applet != "busybox" {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
            }
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
        std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
        let tarball = self.dir.path().join("busybox.tar");
        crate::run(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tarball)
                .arg("."),
        )?;
        self.docker(&["import", &tarball.display().to_string(), name])?;
        std::fs::remove_file(&tarball)?;
        Ok(())
    }

    /// A bridge network of this daemon's own on a /24 of 10.78.0.0/16, with the host on
    /// `.1`. Removed (network and interface) on drop.
    pub fn bridge_network(&mut self) -> Result<BridgeNetwork> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() + N.fetch_add(1, Ordering::Relaxed)) % 250 + 1;
        let network = BridgeNetwork {
            name: unique("dove-net"),
            interface: format!("dvdk{n}"),
            gateway: format!("10.78.{n}.1"),
        };
        // A bridge a killed run left behind.
        let _ = crate::run(Command::new("ip").args(["link", "del", &network.interface]));
        self.networks.push(network.clone());
        let interfaces: Vec<String> = self.networks.iter().map(|n| n.interface.clone()).collect();
        write_owner(self.dir.path(), &self.cgroup_parent, &interfaces)?;
        self.docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--subnet",
            &format!("10.78.{n}.0/24"),
            "--gateway",
            &network.gateway,
            "-o",
            &format!("com.docker.network.bridge.name={}", network.interface),
            &network.name,
        ])?;
        Ok(network)
    }

    /// The cgroup of a container (full ID) in the v1 `cpu` hierarchy.
    pub fn cpu_cgroup_dir(&self, id: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup/cpu")
            .join(self.cgroup_parent.trim_start_matches('/'))
            .join(id)
    }

    fn stop(&mut self) {
        if self.running() && self.ping() {
            if let Ok(ids) = self.docker(&["ps", "-aq"]) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = self.docker_output(&args);
                }
            }
            for network in std::mem::take(&mut self.networks) {
                let _ = self.docker_output(&["network", "rm", &network.name]);
                self.networks.push(network);
            }
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// The processes whose command line names `dir`: a fixture's dockerd, its containerd
/// and the shims (found by that unique path, so only this fixture's own).
fn processes_naming(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Everything a fixture in `dir` may have left once its dockerd is stopped (or its test
/// process died): processes, shims' sockets, containers and their cgroups, mounts, bridges.
fn clean_up(dir: &Path, cgroup_parent: &str, interfaces: &[String]) {
    let pids = processes_naming(dir);
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    // A killed shim leaves its socket in /run/containerd/s; its task directory says where.
    let tasks = dir.join("exec/containerd/daemon/io.containerd.runtime.v2.task/moby");
    for task in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
        if let Ok(address) = std::fs::read_to_string(task.path().join("address")) {
            if let Some(socket) = address.trim().strip_prefix("unix://") {
                let _ = std::fs::remove_file(socket);
            }
        }
    }
    // Container processes (their cgroups hold them), then the cgroups, in every
    // hierarchy (runc makes the same path in each on this hybrid host).
    if cgroup_parent.starts_with("/dove-docker-") {
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let cgroup = h.path().join(cgroup_parent.trim_start_matches('/'));
            if cgroup.is_dir() {
                let _ = remove_cgroup_tree(&cgroup);
            }
        }
    }
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    for interface in interfaces {
        if Path::new("/sys/class/net").join(interface).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", interface])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Fixture directories are `$TMPDIR/dove-docker-*`.
const PREFIX: &str = "dove-docker-";
fn write_owner(dir: &Path, cgroup_parent: &str, interfaces: &[String]) -> Result<()> {
    let mut lines = vec![cgroup_parent];
    lines.extend(interfaces.iter().map(String::as_str));
    write_fixture_owner(dir, &lines)
}

/// Clean up after fixtures whose test process died without dropping them (a test binary
/// killed by a timeout): their dockerd and everything [`clean_up`] removes, and the
/// directory.
fn reap_stale() {
    for (dir, owner) in orphaned_fixtures(PREFIX) {
        let Some((parent, interfaces)) = owner.split_first() else {
            continue;
        };
        clean_up(&dir, parent, interfaces);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        let interfaces: Vec<String> = self.networks.iter().map(|n| n.interface.clone()).collect();
        clean_up(self.dir.path(), &self.cgroup_parent, &interfaces);
    }
}

/// `dovectl` with `args`, aimed at the doved on `socket`: its stdout, or an error with
/// both outputs.
pub fn dovectl(socket: &Path, args: &[&str]) -> Result<String> {
    crate::run(
        Command::new(bin("dovectl"))
            .arg("--socket")
            .arg(socket)
            .args(args),
    )
}
