//! Fixtures for DOVE's integration suites. Each is an RAII guard that removes what it
//! created (daemon processes, cgroups, containers, temp dirs) when dropped.
//!
//! These suites need root: they create cgroups and run real containers. Without root a
//! test prints a loud SKIP line and returns — except under CI (`CI` set), where it fails.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dove_proto::{Client, Container, Registration, Reply, Request};

pub mod bench;
pub mod containerd;
pub mod docker;

pub const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// Tests of one binary that time softirq work (floods, host-wide softirq shares, quota
/// cuts) take this first: `cargo test` runs a binary's tests on parallel threads, and on
/// a two-core machine one test's flood is another's noise.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

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
    pub config: PathBuf,
    /// bpffs directory of this daemon's maps, when the observer is on.
    pub pin_dir: Option<PathBuf>,
    /// `host:port` of the metrics endpoint, when on.
    pub metrics: Option<String>,
}

impl TempDaemon {
    /// A daemon with the registry only (no eBPF, no metrics port): what most suites need,
    /// and safe to run many of at once.
    pub fn start() -> Result<Self> {
        Self::start_with(
            "[observer]\nenabled = false\n[metrics]\nlisten = \"\"\n",
            None,
            None,
        )
    }

    /// A registry-only daemon with extra `[daemon]` keys (TOML lines).
    pub fn start_with_daemon_settings(daemon_extra: &str) -> Result<Self> {
        Self::start_with(
            &format!(
                "[daemon]\n{daemon_extra}\n[observer]\nenabled = false\n[metrics]\nlisten = \"\"\n"
            ),
            None,
            None,
        )
    }

    /// A daemon with the eBPF observer (own pin directory) and a metrics endpoint.
    pub fn with_observer() -> Result<Self> {
        Self::with_observer_settings("")
    }

    /// As [`Self::with_observer`], with extra `[observer]` keys (TOML lines).
    pub fn with_observer_settings(observer_extra: &str) -> Result<Self> {
        Self::with_observer_config(observer_extra, "none")
    }

    /// As [`Self::with_observer_settings`], in enforcement mode `enforcement`.
    pub fn with_observer_config(observer_extra: &str, enforcement: &str) -> Result<Self> {
        Self::observed(observer_extra, enforcement, "")
    }

    /// A daemon with the observer (as [`Self::with_observer`]) whose configuration also
    /// holds `sections` (whole TOML sections, such as `[nri]`).
    pub fn with_observer_and(sections: &str) -> Result<Self> {
        Self::observed("", "none", sections)
    }

    fn observed(observer_extra: &str, enforcement: &str, sections: &str) -> Result<Self> {
        // The metrics port is found free here and bound by doved later; another process
        // can take it in between, so a start that lost it is tried again on a new one.
        for _ in 0..4 {
            match Self::observed_once(observer_extra, enforcement, sections) {
                Err(e) if format!("{e:#}").contains("Address already in use") => {}
                started => return started,
            }
        }
        Self::observed_once(observer_extra, enforcement, sections)
    }

    fn observed_once(observer_extra: &str, enforcement: &str, sections: &str) -> Result<Self> {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("dove-test")));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let config = format!(
            // Never `auto`: on a patched kernel a test daemon would take the scheduler's
            // cost maps from a DOVE installed on the host.
            "[observer]\npin_dir = \"{}\"\ntick_ms = 50\n{observer_extra}\n[metrics]\nlisten = \"{metrics}\"\n[enforcement]\nmode = \"{enforcement}\"\n{sections}\n",
            pin_dir.display()
        );
        Self::start_with(&config, Some(pin_dir), Some(metrics))
    }

    fn start_with(config: &str, pin_dir: Option<PathBuf>, metrics: Option<String>) -> Result<Self> {
        // A test daemon never registers the containers of a runtime that happens to run on
        // the host, unless its test asks for NRI.
        let config = &if config.contains("[nri]") {
            config.to_owned()
        } else {
            format!("{config}\n[nri]\nenabled = false\n")
        };
        let dir = tempfile::Builder::new().prefix("dove-test-").tempdir()?;
        let socket = dir.path().join("run/dove.sock");
        let state_dir = dir.path().join("state");
        let log = dir.path().join("doved.log");
        let config_path = dir.path().join("doved.toml");
        std::fs::write(&config_path, config)?;
        let mut daemon = Self {
            child: None,
            dir,
            socket,
            state_dir,
            log,
            config: config_path,
            pin_dir,
            metrics,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// Register `cgroup` under container ID `id` through the socket protocol.
    pub fn register(&self, cgroup: &TestCgroup, id: &str) {
        self.register_as(cgroup.registration(id));
    }

    /// Send `registration` through the socket protocol; it must be accepted.
    pub fn register_as(&self, registration: Registration) {
        match self
            .client()
            .call(Request::Register {
                container: registration,
            })
            .expect("register")
        {
            Reply::Registered { .. } => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// Unregister container `id` (in `cgroup_path`, when given) as the poststop hook
    /// would; it must have been registered.
    pub fn unregister(&self, id: &str, cgroup_path: Option<&str>) {
        match self
            .client()
            .call(Request::Unregister {
                id: id.into(),
                cgroup_path: cgroup_path.map(str::to_owned),
                bundle: None,
            })
            .expect("unregister")
        {
            Reply::Unregistered { existed: true, .. } => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// The daemon's `stats` reply.
    pub fn stats(&self) -> dove_proto::Stats {
        match self.client().call(Request::Stats).expect("stats") {
            Reply::Stats(s) => *s,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// GET /metrics.
    pub fn scrape(&self) -> Result<String> {
        let addr = self
            .metrics
            .as_ref()
            .context("metrics are off for this daemon")?;
        let mut conn = std::net::TcpStream::connect(addr)?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no HTTP header end")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "metrics answered {head}");
        Ok(body.to_owned())
    }

    /// Start (again) on the same socket and state directory.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("doved"))
            .arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .env("RUST_LOG", "info")
            // Under a systemd-run test runner doved would log to the journal, and the
            // tests read its log from stderr.
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting doved")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Serving, not merely bound: doved binds before it loads its registry and
            // replays the spool, and a hook that came in between would spend its
            // deadline waiting.
            if Client::connect(&self.socket, Duration::from_secs(1))
                .and_then(|mut c| c.call(Request::Stats))
                .is_ok()
            {
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

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal)
            .unwrap_or_else(|e| panic!("{signal} to doved: {e}"));
    }

    /// SIGSTOP the daemon and return once every one of its threads is stopped. `kill`
    /// returns before the signal is delivered, and a thread already past `accept` would
    /// otherwise still answer the next request, so a test of a stalled daemon would see a
    /// live one.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match thread_states(self.pid()) {
                Some(states) if states.iter().all(|&s| s == 'Z') => {
                    panic!("doved exited: {}", self.log_text())
                }
                // `t`: stopped as well, under a tracer.
                Some(states) if states.iter().all(|&s| matches!(s, 'T' | 't')) => return,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "doved was not stopped 10 s after SIGSTOP: {:?}",
                thread_states(self.pid())
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Undo [`TempDaemon::freeze`].
    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGTERM the daemon and wait for it to exit (at most 10 s, then `kill -9`); returns
    /// how long the shutdown took.
    pub fn terminate(&mut self) -> Duration {
        let start = Instant::now();
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    return start.elapsed();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        start.elapsed()
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

/// The state letter of each of `pid`'s threads (`R`, `S`, `T`, `Z`, …), or None when
/// they could not all be read (a thread exited meanwhile; the process is gone).
fn thread_states(pid: u32) -> Option<Vec<char>> {
    let states = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            // The state follows the parenthesised command name, which may hold ") ".
            stat.rsplit_once(") ")?.1.chars().next()
        })
        .collect::<Option<Vec<char>>>()?;
    (!states.is_empty()).then_some(states)
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
        if let Some(pin_dir) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(pin_dir);
        }
    }
}

/// Two network namespaces joined by a veth pair: `a` (10.77.N.1, fd77::N:1) is the
/// peer that sends, `b` (10.77.N.2, fd77::N:2) is where the "containers" listen.
pub struct NetPair {
    pub a: String,
    pub b: String,
    /// The veth ends in namespaces `a` and `b`.
    pub dev_a: String,
    pub dev_b: String,
    pub addr_a: String,
    pub addr_b: String,
    pub addr6_b: String,
}

impl NetPair {
    pub fn new() -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(1);
        let n = (std::process::id() + N.fetch_add(1, Ordering::Relaxed)) % 250 + 1;
        let a = unique("dove-na");
        let b = unique("dove-nb");
        let pair = Self {
            addr_a: format!("10.77.{n}.1"),
            addr_b: format!("10.77.{n}.2"),
            addr6_b: format!("fd77::{n}:2"),
            dev_a: format!("dva{n}"),
            dev_b: format!("dvb{n}"),
            a,
            b,
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["netns", "add", &pair.a])?;
        ip(&["netns", "add", &pair.b])?;
        let (va, vb) = (pair.dev_a.clone(), pair.dev_b.clone());
        ip(&[
            "-n", &pair.a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ])?;
        for (ns, dev, v4, v6) in [
            (&pair.a, &va, pair.addr_a.clone(), format!("fd77::{n}:1")),
            (&pair.b, &vb, pair.addr_b.clone(), pair.addr6_b.clone()),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Steer every packet `b` receives to `cpu`'s backlog (RPS): it is then processed in
    /// NET_RX windows on that CPU, in batches when the sender outpaces it.
    pub fn steer_b_to(&self, cpu: usize) -> Result<()> {
        self.rps_mask(1u64 << cpu)
    }

    /// Stop steering: packets are processed where they arrive again.
    pub fn rps_off(&self) -> Result<()> {
        self.rps_mask(0)
    }

    fn rps_mask(&self, mask: u64) -> Result<()> {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.b,
            "sh",
            "-c",
            &format!(
                "echo {mask:x} > /sys/class/net/{}/queues/rx-0/rps_cpus",
                self.dev_b
            ),
        ]))
        .map(drop)
    }

    /// Start `dove-traffic ARGS` in namespace `ns`, inside `cgroup` if given; waits for
    /// `ready` when `wait_ready`.
    pub fn spawn(
        &self,
        ns: &str,
        cgroup: Option<&TestCgroup>,
        args: &[&str],
        wait_ready: bool,
    ) -> Result<Child> {
        self.spawn_on(None, ns, cgroup, args, wait_ready)
    }

    /// As [`Self::spawn`], pinned to `cpu` when given (on veth a sender's packets are
    /// processed in softirq on the sender's CPU).
    pub fn spawn_on(
        &self,
        cpu: Option<usize>,
        ns: &str,
        cgroup: Option<&TestCgroup>,
        args: &[&str],
        wait_ready: bool,
    ) -> Result<Child> {
        spawn_traffic(cpu, ns, cgroup, args, wait_ready)
    }
}

/// Start `dove-traffic ARGS` in network namespace `ns`, pinned to `cpu` and inside
/// `cgroup` when given; waits for `ready` when `wait_ready`.
pub fn spawn_traffic(
    cpu: Option<usize>,
    ns: &str,
    cgroup: Option<&TestCgroup>,
    args: &[&str],
    wait_ready: bool,
) -> Result<Child> {
    // Join the cgroup before `ip netns exec`, which remounts /sys for the namespace.
    let mut script = String::new();
    if let Some(cg) = cgroup {
        script.push_str(&format!("echo $$ > {}/cgroup.procs && ", cg.dir.display()));
    }
    if let Some(cpu) = cpu {
        script.push_str(&format!("taskset -pc {cpu} $$ >/dev/null && "));
    }
    script.push_str("exec ip netns exec \"$0\" \"$@\"");
    let mut child = Command::new("sh")
        .args(["-c", &script, ns])
        .arg(bin("dove-traffic"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    if wait_ready {
        let mut line = [0u8; 6];
        child.stdout.as_mut().unwrap().read_exact(&mut line)?;
        anyhow::ensure!(&line == b"ready\n", "traffic sink did not start");
    }
    Ok(child)
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Wait for a child and return what it printed last (a count), failing on error.
pub fn finish(child: Child) -> Result<u64> {
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "traffic helper failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .last()
        .unwrap_or("0")
        .trim()
        .parse()
        .context("traffic helper output")
}

/// A private ftrace instance (tracefs mounted in a temporary directory, so the host's own
/// tracing is untouched): the tests' instrument that is not DOVE's programs. Events are
/// disabled, the instance removed and tracefs unmounted on drop.
pub struct TraceInstance {
    mount: tempfile::TempDir,
    instance: PathBuf,
    events: Vec<String>,
}

/// One line of an ftrace instance's `trace`.
pub struct TraceLine<'a> {
    pub cpu: u32,
    /// Seconds.
    pub ts: f64,
    /// The event's name and fields, e.g. `softirq_entry: vec=3 [action=NET_RX]`.
    pub event: &'a str,
}

impl<'a> TraceLine<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        if line.starts_with('#') {
            return None;
        }
        let cpu = line
            .split('[')
            .nth(1)?
            .split(']')
            .next()?
            .trim()
            .parse()
            .ok()?;
        let (before, event) = line.split_once(": ")?;
        let ts = before.rsplit(' ').next()?.parse().ok()?;
        Some(Self { cpu, ts, event })
    }

    /// Nanoseconds from `since` (seconds) to this line.
    pub fn ns_since(&self, since: f64) -> u64 {
        ((self.ts - since) * 1e9) as u64
    }
}

impl TraceInstance {
    /// Start tracing `events` (`system/name`), each with its filter if given, after
    /// writing `settings` (file, value) into the instance.
    pub fn start(settings: &[(&str, &str)], events: &[(&str, Option<&str>)]) -> Result<Self> {
        let mount = tempfile::Builder::new().prefix("dove-tracefs-").tempdir()?;
        nix::mount::mount(
            Some("nodev"),
            mount.path(),
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting tracefs")?;
        let instance = mount.path().join("instances").join(unique("dove"));
        let trace = Self {
            mount,
            instance,
            events: events.iter().map(|(e, _)| (*e).to_owned()).collect(),
        };
        std::fs::create_dir(&trace.instance)?;
        let w = |p: &str, v: &str| {
            std::fs::write(trace.instance.join(p), v).with_context(|| format!("writing {p}"))
        };
        for (file, value) in settings {
            w(file, value)?;
        }
        for (event, filter) in events {
            if let Some(filter) = filter {
                w(&format!("events/{event}/filter"), filter)?;
            }
            w(&format!("events/{event}/enable"), "1")?;
        }
        w("tracing_on", "1")?;
        Ok(trace)
    }

    /// Stop tracing and return what was recorded.
    pub fn stop(&self) -> Result<String> {
        std::fs::write(self.instance.join("tracing_on"), "0")?;
        Ok(std::fs::read_to_string(self.instance.join("trace"))?)
    }

    /// The recorded lines of `text` (from [`Self::stop`]).
    pub fn lines(text: &str) -> impl Iterator<Item = TraceLine<'_>> {
        text.lines().filter_map(TraceLine::parse)
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        let _ = std::fs::write(self.instance.join("tracing_on"), "0");
        for event in &self.events {
            let _ = std::fs::write(self.instance.join(format!("events/{event}/enable")), "0");
        }
        let _ = std::fs::remove_dir(&self.instance);
        let _ = nix::mount::umount2(self.mount.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// NET_RX/NET_TX softirq entry and exit on every CPU: an independent measure of softirq
/// time.
pub struct SoftirqTrace(TraceInstance);

impl SoftirqTrace {
    pub fn start() -> Result<Self> {
        let net = Some("vec == 2 || vec == 3");
        TraceInstance::start(
            &[("buffer_size_kb", "65536")],
            &[("irq/softirq_entry", net), ("irq/softirq_exit", net)],
        )
        .map(Self)
    }

    /// Stop and return total NET softirq nanoseconds (µs resolution per event).
    pub fn stop(&self) -> Result<u64> {
        Ok(self.stop_by_cpu()?.values().map(|c| c.ns).sum())
    }

    /// Stop and return NET softirq time and windows per CPU.
    pub fn stop_by_cpu(&self) -> Result<std::collections::BTreeMap<u32, CpuSoftirq>> {
        let text = self.0.stop()?;
        let mut open: std::collections::HashMap<u32, f64> = Default::default();
        let mut by_cpu: std::collections::BTreeMap<u32, CpuSoftirq> = Default::default();
        for line in TraceInstance::lines(&text) {
            if line.event.starts_with("softirq_entry") {
                open.insert(line.cpu, line.ts);
            } else if line.event.starts_with("softirq_exit") {
                if let Some(start) = open.remove(&line.cpu) {
                    let c = by_cpu.entry(line.cpu).or_default();
                    c.ns += line.ns_since(start);
                    c.windows += 1;
                }
            }
        }
        Ok(by_cpu)
    }
}

/// One CPU's NET softirq time and window count, as ftrace saw them.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSoftirq {
    pub ns: u64,
    pub windows: u64,
}

/// NET softirq windows and the start of every received packet (`net:netif_receive_skb`):
/// an independent measure of what each packet's processing cost inside batched windows.
/// A packet's span runs from its start to the next packet's start or the window's end
/// (the backlog path hands the stack one packet at a time); time before a window's first
/// packet is kept apart. Packets are told apart by their length ([`PacketTrace::stop`])
/// or by the device they arrived on ([`PacketTrace::stop_by_device`]).
pub struct PacketTrace(TraceInstance);

/// What [`PacketTrace`] saw, by packet key (length, or device name).
#[derive(Debug, Clone)]
pub struct PacketSpans<K = u32> {
    /// Packet key → (packets, ns).
    pub by_key: std::collections::BTreeMap<K, (u64, u64)>,
    /// Window time before the first packet.
    pub prelude_ns: u64,
    /// The same, by the key of the packet the window began with: the owner of a
    /// window's first packet pays for waking the window (DOVE's rule too), which matters
    /// when the softirq keeps up and every packet has a window of its own.
    pub prelude_by_key: std::collections::BTreeMap<K, u64>,
    /// Windows with no packet.
    pub empty_ns: u64,
    pub windows: u64,
    /// Packets that began right after a packet of another key in the same window:
    /// the places where a window changes owner, which are what a per-packet attribution
    /// rule must get right and a per-window one cannot.
    pub handovers: u64,
    /// Packets received outside a NET_RX window (threaded NAPI, busy polling, a NET_TX
    /// window): neither this instrument nor DOVE times them.
    pub outside: u64,
}

impl<K> Default for PacketSpans<K> {
    fn default() -> Self {
        Self {
            by_key: Default::default(),
            prelude_ns: 0,
            prelude_by_key: Default::default(),
            empty_ns: 0,
            windows: 0,
            handovers: 0,
            outside: 0,
        }
    }
}

impl<K: Ord> PacketSpans<K> {
    /// Packets and time of one key.
    pub fn of<Q: Ord + ?Sized>(&self, key: &Q) -> (u64, u64)
    where
        K: std::borrow::Borrow<Q>,
    {
        self.by_key.get(key).copied().unwrap_or_default()
    }

    /// Packets and time of one key, with the preludes of the windows they began.
    pub fn of_with_prelude<Q: Ord + ?Sized>(&self, key: &Q) -> (u64, u64)
    where
        K: std::borrow::Borrow<Q>,
    {
        let (n, ns) = self.of(key);
        (
            n,
            ns + self.prelude_by_key.get(key).copied().unwrap_or_default(),
        )
    }

    pub fn total_ns(&self) -> u64 {
        self.by_key.values().map(|(_, ns)| ns).sum::<u64>() + self.prelude_ns + self.empty_ns
    }

    /// Build from a trace's text, keying each packet by `key` of its
    /// `netif_receive_skb` fields; windows are followed on each CPU apart.
    fn parse(text: &str, key: impl Fn(&str) -> Option<K>) -> Self
    where
        K: Clone + PartialEq,
    {
        let mut spans = Self::default();
        // Per CPU while a window is open: (mark, whether it is NET_RX's, key of the packet
        // in flight).
        let mut open: std::collections::HashMap<u32, (f64, bool, Option<K>)> = Default::default();
        for line in TraceInstance::lines(text) {
            let (ts, event) = (line.ts, line.event);
            if event.starts_with("softirq_entry") {
                let rx = trace_field(event, "vec") == Some("3");
                open.insert(line.cpu, (ts, rx, None));
                spans.windows += 1;
            } else if event.starts_with("softirq_exit") {
                match open.remove(&line.cpu) {
                    Some((mark, _, Some(k))) => {
                        let e = spans.by_key.entry(k).or_default();
                        e.0 += 1;
                        e.1 += line.ns_since(mark);
                    }
                    Some((mark, _, None)) => spans.empty_ns += line.ns_since(mark),
                    None => {}
                }
            } else if event.starts_with("netif_receive_skb") {
                let Some(k) = key(event) else {
                    continue;
                };
                match open.remove(&line.cpu) {
                    Some((mark, true, Some(prev))) => {
                        spans.handovers += u64::from(prev != k);
                        let e = spans.by_key.entry(prev).or_default();
                        e.0 += 1;
                        e.1 += line.ns_since(mark);
                    }
                    Some((mark, true, None)) => {
                        let ns = line.ns_since(mark);
                        spans.prelude_ns += ns;
                        *spans.prelude_by_key.entry(k.clone()).or_default() += ns;
                    }
                    other => {
                        // Outside a NET_RX window, or in one that began before the
                        // trace: counted, not timed.
                        if let Some(window) = other {
                            open.insert(line.cpu, window);
                        }
                        spans.outside += 1;
                        continue;
                    }
                }
                open.insert(line.cpu, (ts, true, Some(k)));
            }
        }
        spans
    }
}

impl<K: Ord> std::ops::AddAssign for PacketSpans<K> {
    fn add_assign(&mut self, o: PacketSpans<K>) {
        // Destructured so that a new field does not compile until it is summed here.
        let PacketSpans {
            by_key,
            prelude_ns,
            prelude_by_key,
            empty_ns,
            windows,
            handovers,
            outside,
        } = o;
        for (k, (n, ns)) in by_key {
            let e = self.by_key.entry(k).or_default();
            e.0 += n;
            e.1 += ns;
        }
        for (k, ns) in prelude_by_key {
            *self.prelude_by_key.entry(k).or_default() += ns;
        }
        self.prelude_ns += prelude_ns;
        self.empty_ns += empty_ns;
        self.windows += windows;
        self.handovers += handovers;
        self.outside += outside;
    }
}

/// One field of a trace event's text (`name=value`).
fn trace_field<'a>(event: &'a str, name: &str) -> Option<&'a str> {
    event
        .split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
}

impl PacketTrace {
    /// NET_RX windows on `cpu` alone.
    pub fn start(cpu: usize) -> Result<Self> {
        let rx = Some("vec == 3");
        TraceInstance::start(
            &[
                ("buffer_size_kb", "131072"),
                ("tracing_cpumask", &format!("{:x}", 1u64 << cpu)),
            ],
            &[
                ("irq/softirq_entry", rx),
                ("irq/softirq_exit", rx),
                ("net/netif_receive_skb", None),
            ],
        )
        .map(Self)
    }

    /// NET_RX and NET_TX windows on every CPU: all the time [`SoftirqTrace`] counts.
    pub fn start_every_cpu() -> Result<Self> {
        let net = Some("vec == 2 || vec == 3");
        TraceInstance::start(
            &[("buffer_size_kb", "65536")],
            &[
                ("irq/softirq_entry", net),
                ("irq/softirq_exit", net),
                ("net/netif_receive_skb", None),
            ],
        )
        .map(Self)
    }

    /// Stop; packets by their length (IP header onwards).
    pub fn stop(&self) -> Result<PacketSpans> {
        let text = self.0.stop()?;
        Ok(PacketSpans::parse(&text, |event| {
            trace_field(event, "len")?.parse().ok()
        }))
    }

    /// Stop; packets by the device they arrived on.
    pub fn stop_by_device(&self) -> Result<PacketSpans<String>> {
        let text = self.0.stop()?;
        Ok(PacketSpans::parse(&text, |event| {
            trace_field(event, "dev").map(str::to_owned)
        }))
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

/// The cgroup v2 ID (inode) of the cgroup at hierarchy path `path`, without taking
/// ownership of it (a [`TestCgroup`] guard would remove it, and kill what runs there).
pub fn cgroup_id_of(path: &str) -> u64 {
    let dir = unified_mount().join(path.trim_start_matches('/'));
    std::fs::metadata(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .ino()
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

/// A child process killed (SIGKILL) and reaped on drop, so a failing test leaves no
/// stray process behind.
/// A local user made for one test (with subordinate ID ranges, as `useradd` gives every
/// regular user), removed with its processes on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    pub fn new(prefix: &str) -> Self {
        // Users a killed test run left behind (their name ends in its pid).
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        for line in passwd.lines() {
            let mut fields = line.split(':');
            let (Some(name), Some(uid)) = (fields.next(), fields.nth(1)) else {
                continue;
            };
            let stale = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if let (true, Ok(uid)) = (stale, uid.parse()) {
                Self::remove(name, uid);
            }
        }
        let name = format!("{prefix}-{}", std::process::id());
        run(Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin"])
            .arg(&name))
        .expect("useradd");
        let uid = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .expect("the user just added")
            .uid
            .as_raw();
        Self { name, uid }
    }
}

impl TestUser {
    /// Kill the user's processes and remove it, its subordinate ID ranges (userdel does)
    /// and what rootless podman leaves in /dev/shm.
    fn remove(name: &str, uid: u32) {
        for _ in 0..50 {
            // Rootless podman leaves a pause process holding its user namespace.
            let _ = Command::new("pkill")
                .args(["-KILL", "-U", &uid.to_string()])
                .status();
            let removed = Command::new("userdel")
                .arg(name)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if removed {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(format!("/dev/shm/libpod_rootless_lock_{uid}"));
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        Self::remove(&self.name, self.uid);
    }
}

pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
    run_hook_stdin(socket, args, stdin, true)
}

/// As [`run_hook`]; with `close_stdin` false the pipe stays open until the hook exits, as
/// a runtime that never closes it would leave it.
pub fn run_hook_stdin(socket: &Path, args: &[&str], stdin: &[u8], close_stdin: bool) -> HookRun {
    let start = Instant::now();
    // The hook's own 500 ms default is for a node's container starts; a test that is not
    // about the deadline must not fail open because the suite loads the machine.
    let deadline: &[&str] = if args.iter().any(|a| a.starts_with("--timeout-ms")) {
        &[]
    } else {
        &["--timeout-ms", "5000"]
    };
    let mut child = Command::new(bin("dove-hook"))
        .arg("--socket")
        .arg(socket)
        .args(deadline)
        .args(args)
        .env("DOVE_LOG_STDERR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dove-hook");
    // A hook that hangs (the defect its deadline exists for) fails the test instead of
    // hanging the suite.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let finished = std::sync::Arc::clone(&finished);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if finished.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        })
    };
    // The hook may exit before reading everything (oversized input): ignore EPIPE.
    let mut pipe = child.stdin.take();
    let _ = pipe.as_mut().unwrap().write_all(stdin);
    if close_stdin {
        drop(pipe.take());
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    drop(pipe);
    finished.store(true, std::sync::atomic::Ordering::Release);
    let _ = watchdog.join();
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

/// A busybox root filesystem shared by every test container (mounted read-only), kept in
/// the build's `target/tmp` so test runs reuse it and leave nothing in /tmp.
pub fn busybox_rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> → target/tmp
        let target = exe.ancestors().nth(3).expect("target dir");
        let root = target.join("tmp/dove-rootfs");
        if root.join("bin/busybox").exists() {
            return root;
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is installed (scripts/deps.sh)");
        let staging = target.join(format!("tmp/{}", unique("dove-rootfs-staging")));
        for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
            std::fs::create_dir_all(staging.join(d)).unwrap();
        }
        std::fs::copy(busybox, staging.join("bin/busybox")).unwrap();
        for applet in ["sh", "sleep", "true", "cat", "echo"] {
            std::os::unix::fs::symlink("busybox", staging.join("bin").join(applet)).unwrap();
        }
        std::fs::write(staging.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
        std::fs::write(staging.join("etc/group"), "root:x:0:\n").unwrap();
        // Another test process may have won the race; either copy is the same.
        if std::fs::rename(&staging, &root).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        root
    })
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

/// A registered container's counters in a `stats` reply.
pub fn cost(stats: &dove_proto::Stats, id: &str) -> dove_proto::CostCounters {
    stats
        .containers
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("{id} not in stats: {stats:#?}"))
        .cost
}

/// Stats once a tick has passed after the traffic.
pub fn settled(daemon: &TempDaemon) -> dove_proto::Stats {
    let before = daemon.stats().health.ticks;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        std::thread::sleep(Duration::from_millis(60));
        let s = daemon.stats();
        if s.health.ticks >= before + 2 || Instant::now() > deadline {
            return s;
        }
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    (0..nix::sched::CpuSet::count())
        .filter(|&cpu| allowed.is_set(cpu).unwrap_or(false))
        .collect()
}

pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Datagrams the kernel dropped at UDP sockets in namespace `ns` (the `drops` column of
/// /proc/net/udp): zero means every datagram sent reached its socket.
pub fn udp_drops(ns: &str) -> u64 {
    let table =
        run(Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/udp"])).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// The file in a fixture's temporary directory naming the test process that owns it and
/// what its cleanup needs (a cgroup parent, interfaces): written when the fixture starts,
/// so the next fixture can clean up after a test process killed before its drops ran.
pub const FIXTURE_OWNER: &str = "owner";

/// Record the owner of fixture directory `dir`: this process, then `lines`.
pub fn write_fixture_owner(dir: &Path, lines: &[&str]) -> Result<()> {
    let mut text = format!("{}\n", std::process::id());
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(dir.join(FIXTURE_OWNER), text)?;
    Ok(())
}

/// Fixture directories under the temporary directory whose name starts with `prefix` and
/// whose owning test process is gone, with the lines recorded after its pid.
pub fn orphaned_fixtures(prefix: &str) -> Vec<(PathBuf, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| {
            let owner = std::fs::read_to_string(e.path().join(FIXTURE_OWNER)).ok()?;
            let mut lines = owner.lines();
            let pid: u32 = lines.next()?.parse().ok()?;
            if Path::new(&format!("/proc/{pid}")).exists() {
                return None;
            }
            eprintln!(
                "cleaning up fixture {} (its test process {pid} is gone)",
                e.path().display()
            );
            Some((e.path(), lines.map(str::to_owned).collect()))
        })
        .collect()
}

/// A container's cpumax state in doved's stats.
pub fn quota_state(daemon: &TempDaemon, id: &str) -> Option<dove_proto::QuotaState> {
    daemon
        .stats()
        .containers
        .into_iter()
        .find(|c| c.id == id)
        .and_then(|c| c.quota)
}
