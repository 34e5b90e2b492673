//! doved and dove-hook under bad input, crashes, bursts and unauthorised peers.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dove_proto::{Reply, Request};
use dove_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A process parked in a fresh cgroup, as a container's init would be.
struct Parked {
    cgroup: TestCgroup,
    child: std::process::Child,
}

impl Parked {
    fn new() -> Self {
        let cgroup = TestCgroup::new("dove-test-parked").unwrap();
        // `sh -c 'echo $$ > procs; exec sleep'` moves itself before becoming the sleeper.
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec sleep 600",
            cgroup.dir.display()
        );
        let child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(cgroup.dir.join("cgroup.procs"))
            .unwrap()
            .contains(&child.id().to_string())
        {
            assert!(Instant::now() < deadline, "process did not join its cgroup");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { cgroup, child }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn hook_registers_from_live_pid() {
    if !require_root("hook_registers_from_live_pid") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let parked = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    // Within the deadline runtimes run the hook with (the hook's default, as hooks.d
    // files and bundles written by dove-runtime leave it): a hook that fails open
    // there leaves the container unregistered.
    let run = run_hook(
        &daemon.socket,
        &["--timeout-ms", "500", "createRuntime"],
        &state_json("live", Some(parked.pid()), bundle.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    let entry = daemon.find("live").expect("registered");
    assert_eq!(entry.registration.cgroup_id, parked.cgroup.id());
    assert_eq!(entry.registration.pid, Some(parked.pid()));
    assert_eq!(
        entry
            .registration
            .annotations
            .get("io.dove.test")
            .map(String::as_str),
        Some("yes")
    );

    // createRuntime then prestart: the second replaces the first, one entry remains.
    let run = run_hook(
        &daemon.socket,
        &["prestart"],
        &state_json("live", Some(parked.pid()), bundle.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(daemon.list().len(), 1);

    // Stages not configured for registration do nothing.
    let run = run_hook(
        &daemon.socket,
        &["poststart"],
        &state_json("other", Some(parked.pid()), bundle.path()),
    );
    assert_eq!(run.code, 0);
    assert!(daemon.find("other").is_none());

    let run = run_hook(
        &daemon.socket,
        &["poststop"],
        &state_json("live", None, bundle.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(daemon.list().is_empty());
}

/// A runtime that writes the state and never closes stdin must not hold the container's
/// start past the hook's deadline.
#[test]
fn stdin_left_open_never_holds_the_hook_past_its_deadline() {
    if !require_root("stdin_left_open_never_holds_the_hook_past_its_deadline") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let parked = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    let state = state_json("open-stdin", Some(parked.pid()), bundle.path());
    for (args, code) in [
        (&["--timeout-ms", "300", "createRuntime"][..], 0),
        (
            &["--timeout-ms", "300", "--fail-closed", "createRuntime"][..],
            1,
        ),
    ] {
        let run = run_hook_stdin(&daemon.socket, args, &state, false);
        eprintln!("{args:?}: exited {} after {:?}", run.code, run.elapsed);
        assert_eq!(run.code, code, "{}", run.stderr);
        assert!(
            run.elapsed < Duration::from_millis(1300),
            "the hook took {:?} with a 300 ms deadline",
            run.elapsed
        );
        assert!(
            run.stderr
                .contains("did not end within the hook's deadline"),
            "{}",
            run.stderr
        );
    }
    assert!(daemon.find("open-stdin").is_none());
}

#[test]
fn bad_state_input_fails_open_fast_and_closed_on_request() {
    if !require_root("bad_state_input_fails_open_fast_and_closed_on_request") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let keep = TestCgroup::new("dove-test-keep").unwrap();
    daemon.register(&keep, "keep");
    let oversized = vec![b'{'; 2 * 1024 * 1024];
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", b"".to_vec(), "stdin is empty"),
        ("malformed", b"{not json".to_vec(), "not valid JSON"),
        (
            "truncated",
            br#"{"ociVersion":"1.0.2","id":"tr","pid":12"#.to_vec(),
            "not valid JSON",
        ),
        ("oversized", oversized, "larger than"),
        (
            "bad id",
            br#"{"id":"../../etc","pid":1,"bundle":"/"}"#.to_vec(),
            "not a valid container ID",
        ),
        ("array", b"[]".to_vec(), "not an object"),
    ];
    for (what, input, reason) in &cases {
        let open = run_hook(&daemon.socket, &["createRuntime"], input);
        assert_eq!(open.code, 0, "{what}: fail-open exits 0: {}", open.stderr);
        assert!(
            open.elapsed < Duration::from_secs(1),
            "{what}: took {:?}",
            open.elapsed
        );
        assert!(
            open.stderr.contains(reason),
            "{what}: log says why: {}",
            open.stderr
        );
        let closed = run_hook(&daemon.socket, &["--fail-closed", "createRuntime"], input);
        assert_eq!(closed.code, 1, "{what}: fail-closed exits 1");
        assert!(
            closed.stderr.contains(reason),
            "{what}: stderr says why: {}",
            closed.stderr
        );
    }
    // Bad arguments are a misconfiguration, not a reason to block containers by default.
    let run = run_hook(&daemon.socket, &["no-such-stage"], b"{}");
    assert_eq!(run.code, 0);
    assert!(run.stderr.contains("no-such-stage"), "{}", run.stderr);
    let run = run_hook(&daemon.socket, &["--fail-closed", "no-such-stage"], b"{}");
    assert_eq!(run.code, 1);

    let ids: Vec<String> = daemon
        .list()
        .into_iter()
        .map(|c| c.registration.id)
        .collect();
    assert_eq!(ids, vec!["keep".to_string()], "registry unchanged");
}

#[test]
fn missing_pid_and_bundle_are_explained() {
    if !require_root("missing_pid_and_bundle_are_explained") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let empty_bundle = tempfile::tempdir().unwrap();
    // A pid that does not exist (beyond pid_max) and a bundle with no config.json.
    let run = run_hook(
        &daemon.socket,
        &["--fail-closed", "createRuntime"],
        &state_json("ghost", Some(4_194_304 + 1), empty_bundle.path()),
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("from its pid") && run.stderr.contains("config.json"),
        "{}",
        run.stderr
    );
    // The bundle's cgroupsPath is the fallback when the pid is gone.
    let cg = TestCgroup::new("dove-test-fallback").unwrap();
    let bundle = Bundle::new(&["true"], &cg.path, &daemon.socket, &[]).unwrap();
    let run = run_hook(
        &daemon.socket,
        &["--fail-closed", "createRuntime"],
        &state_json("fallback", None, bundle.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        daemon.find("fallback").unwrap().registration.cgroup_id,
        cg.id()
    );
    assert!(daemon.list().iter().all(|c| c.registration.id != "ghost"));
}

#[test]
fn daemon_down_or_stuck_fails_open_within_the_timeout() {
    if !require_root("daemon_down_or_stuck_fails_open_within_the_timeout") {
        return;
    }
    let parked = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    let state = state_json("c1", Some(parked.pid()), bundle.path());
    let nowhere = tempfile::tempdir().unwrap();
    let missing = nowhere.path().join("dove.sock");

    let run = run_hook(&missing, &["createRuntime"], &state);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("no doved is listening"),
        "{}",
        run.stderr
    );
    let run = run_hook(&missing, &["--fail-closed", "createRuntime"], &state);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("no doved is listening"),
        "{}",
        run.stderr
    );

    // A daemon that accepts but never answers (stopped): bounded by the timeout.
    let mut daemon = TempDaemon::start().unwrap();
    daemon.freeze();
    let run = run_hook(
        &daemon.socket,
        &["--timeout-ms", "500", "createRuntime"],
        &state,
    );
    daemon.thaw();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.elapsed < Duration::from_secs(2),
        "took {:?}",
        run.elapsed
    );
    assert!(run.stderr.contains("did not answer"), "{}", run.stderr);
    assert!(daemon.running());
}

/// A runtime that stops reading the hook's stderr (or a journal that went away) must not
/// turn a fail-open warning into a SIGPIPE death, which the runtime reads as a failed hook
/// and so fails the container start.
#[test]
fn a_hook_whose_stderr_reader_is_gone_still_fails_open() {
    if !require_root("a_hook_whose_stderr_reader_is_gone_still_fails_open") {
        return;
    }
    let parked = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    let state = state_json("c1", Some(parked.pid()), bundle.path());
    let nowhere = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("dove-hook"))
        .arg("--socket")
        .arg(nowhere.path().join("dove.sock"))
        .arg("createRuntime")
        .env("DOVE_LOG_STDERR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the hook has anything to say: its warning (no doved is
    // listening) then meets a pipe without a reader.
    drop(child.stderr.take());
    child.stdin.take().unwrap().write_all(&state).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "the hook died ({status}) instead of failing open"
    );
}

#[test]
fn daemon_dying_mid_request_is_reported() {
    if !require_root("daemon_dying_mid_request_is_reported") {
        return;
    }
    let parked = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    let state = state_json("c1", Some(parked.pid()), bundle.path());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("dying.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // Reads the request, then goes away without replying, as a crashing daemon does.
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut header = [0u8; 4];
            conn.read_exact(&mut header).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
            conn.read_exact(&mut body).unwrap();
            drop(conn);
        }
    });
    let run = run_hook(&socket, &["createRuntime"], &state);
    assert_eq!(run.code, 0);
    assert!(
        run.stderr.contains("closed the connection before replying"),
        "{}",
        run.stderr
    );
    let run = run_hook(&socket, &["--fail-closed", "createRuntime"], &state);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("closed the connection before replying"),
        "{}",
        run.stderr
    );
    server.join().unwrap();
}

/// A doved from before unregistrations named their bundle refuses the unknown field
/// (its requests deny unknown fields): the hook says it again without, rather than leave
/// the container registered.
#[test]
fn poststop_to_a_doved_that_predates_bundles_still_unregisters() {
    let bundle = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("old.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let request = dove_proto::read_frame(&mut conn, dove_proto::MAX_FRAME_BYTES).unwrap();
            let request: serde_json::Value = serde_json::from_slice(&request).unwrap();
            let reply = if request["request"].get("bundle").is_some() {
                dove_proto::ResponseEnvelope::error(
                    dove_proto::ErrorCode::BadRequest,
                    "unknown field `bundle`",
                )
            } else {
                dove_proto::ResponseEnvelope::ok(Reply::Unregistered {
                    id: "old".into(),
                    existed: true,
                })
            };
            dove_proto::write_frame(&mut conn, &serde_json::to_vec(&reply).unwrap()).unwrap();
            seen.push(request);
        }
        seen
    });
    let run = run_hook(
        &socket,
        &["--fail-closed", "poststop"],
        &state_json("old", None, bundle.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let seen = server.join().unwrap();
    assert_eq!(
        seen[0]["request"]["bundle"],
        bundle.path().display().to_string()
    );
    assert!(seen[1]["request"].get("bundle").is_none(), "{seen:?}");
}

fn raw_exchange(socket: &std::path::Path, bytes: &[u8]) -> Option<serde_json::Value> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut header = [0u8; 4];
    s.read_exact(&mut header).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    s.read_exact(&mut body).ok()?;
    Some(serde_json::from_slice(&body).unwrap())
}

fn frame(json: &str) -> Vec<u8> {
    dove_proto::encode_frame(json.as_bytes()).unwrap()
}

#[test]
fn garbage_and_oversized_frames_get_clear_errors() {
    if !require_root("garbage_and_oversized_frames_get_clear_errors") {
        return;
    }
    let mut daemon = TempDaemon::start().unwrap();
    let keep = TestCgroup::new("dove-test-keep").unwrap();
    daemon.register(&keep, "keep");

    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            vec![0xff, 0xff, 0xff, 0xff],
            "bad_frame",
            "exceeds the limit",
        ),
        (vec![0, 0, 0, 0], "bad_frame", "empty frame"),
        (frame("garbage!"), "bad_request", "not a JSON object"),
        (
            frame(r#"{"version":99,"request":{"op":"list"}}"#),
            "unsupported_version",
            "speaks version 1",
        ),
        (
            frame(r#"{"request":{"op":"list"}}"#),
            "bad_request",
            "no `version`",
        ),
        (
            frame(r#"{"version":1,"request":{"op":"format_disk"}}"#),
            "bad_request",
            "format_disk",
        ),
        (
            frame(
                r#"{"version":1,"request":{"op":"register","container":{"id":"x/y","cgroup_path":"/a","cgroup_id":5}}}"#,
            ),
            "invalid_container",
            "container id",
        ),
        (
            frame(&format!(
                r#"{{"version":1,"request":{{"op":"register","container":{{"id":"wrongid","cgroup_path":"{}","cgroup_id":1}}}}}}"#,
                keep.path
            )),
            "invalid_container",
            "does not match",
        ),
        (
            frame(
                r#"{"version":1,"request":{"op":"register","container":{"id":"gone","cgroup_path":"/dove-no-such-cgroup","cgroup_id":5}}}"#,
            ),
            "cgroup_gone",
            "does not exist",
        ),
    ];
    for (bytes, code, text) in cases {
        let reply = raw_exchange(&daemon.socket, &bytes).expect("an error reply");
        assert_eq!(reply["error"]["code"], code, "{reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(text), "{message}");
    }
    // A frame cut short, and a client that connects and says nothing: no reply, no harm.
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.write_all(&[0, 0, 0, 100, b'{']).unwrap();
    drop(s);
    let _idle = UnixStream::connect(&daemon.socket).unwrap();

    assert!(daemon.running());
    let ids: Vec<String> = daemon
        .list()
        .into_iter()
        .map(|c| c.registration.id)
        .collect();
    assert_eq!(ids, vec!["keep".to_string()]);
    assert!(
        daemon.log_text().contains("bad frame"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn non_root_peers_are_refused() {
    if !require_root("non_root_peers_are_refused") {
        return;
    }
    let mut daemon = TempDaemon::start().unwrap();
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode");
    let nobody = |socket: &std::path::Path| {
        Command::new(bin("dovectl"))
            .arg("--socket")
            .arg(socket)
            .arg("list")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    use std::os::unix::process::CommandExt;
    // The directories on the way must be traversable for this check to reach the socket.
    for dir in [daemon.dir.path(), daemon.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = nobody(&daemon.socket);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permission denied") && stderr.contains("run as root"),
        "{stderr}"
    );

    // Even if the file mode is loosened, the daemon's SO_PEERCRED check refuses.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = nobody(&daemon.socket);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("uid 65534 is not allowed"), "{stderr}");
    assert!(daemon.running());
    assert!(
        daemon.log_text().contains("peer is not authorised"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn kill_9_loses_no_acknowledged_registration() {
    if !require_root("kill_9_loses_no_acknowledged_registration") {
        return;
    }
    let mut daemon = TempDaemon::start().unwrap();
    let parent = TestCgroup::new("dove-test-crash").unwrap();
    let cgroups: Vec<TestCgroup> = (0..40)
        .map(|i| parent.child(&format!("c{i}")).unwrap())
        .collect();
    for (i, cg) in cgroups.iter().take(20).enumerate() {
        daemon.register(cg, &format!("steady-{i}"));
    }
    daemon.kill9();
    daemon.spawn().unwrap();
    assert_eq!(daemon.list().len(), 20, "all 20 survive kill -9");

    // Now kill it while registrations are in flight: every one that was acknowledged
    // must be there after the restart.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let acked = Arc::clone(&acked);
            let stop = Arc::clone(&stop);
            let socket = daemon.socket.clone();
            let regs: Vec<_> = cgroups[20..]
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 4 == w)
                .map(|(i, cg)| cg.registration(&format!("burst-{i}")))
                .collect();
            std::thread::spawn(move || {
                for reg in regs {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let id = reg.id.clone();
                    let result = dove_proto::Client::connect(&socket, Duration::from_secs(2))
                        .and_then(|mut c| c.call(Request::Register { container: reg }));
                    if let Ok(Reply::Registered { .. }) = result {
                        acked.lock().unwrap().push(id);
                    }
                }
            })
        })
        .collect();
    // Kill it once registrations are being acknowledged, or the test would test nothing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while acked.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    daemon.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    daemon.spawn().unwrap();
    let after: Vec<String> = daemon
        .list()
        .into_iter()
        .map(|c| c.registration.id)
        .collect();
    for id in acked.lock().unwrap().iter() {
        assert!(
            after.contains(id),
            "{id} was acknowledged but lost: {after:?}"
        );
    }
    for i in 0..20 {
        assert!(after.contains(&format!("steady-{i}")));
    }
    assert!(
        !acked.lock().unwrap().is_empty(),
        "no registration was acknowledged before the kill: the test tested nothing"
    );
    eprintln!(
        "acknowledged before kill -9: {}; present after restart: {}",
        acked.lock().unwrap().len(),
        after.len()
    );
}

#[test]
fn restart_drops_containers_whose_cgroup_vanished_while_down() {
    if !require_root("restart_drops_containers_whose_cgroup_vanished_while_down") {
        return;
    }
    let mut daemon = TempDaemon::start().unwrap();
    let a = TestCgroup::new("dove-test-a").unwrap();
    let b = TestCgroup::new("dove-test-b").unwrap();
    daemon.register(&a, "a");
    daemon.register(&b, "b");
    daemon.kill9();
    b.remove().unwrap();
    daemon.spawn().unwrap();
    let ids: Vec<String> = daemon
        .list()
        .into_iter()
        .map(|c| c.registration.id)
        .collect();
    assert_eq!(ids, vec!["a".to_string()]);
    assert!(
        daemon.log_text().contains("dropped at startup"),
        "{}",
        daemon.log_text()
    );
    // The reconciled registry is what is on disk now.
    daemon.kill9();
    daemon.spawn().unwrap();
    assert_eq!(daemon.list().len(), 1);
}

#[test]
fn burst_of_100_hooks_with_slow_clients_connected() {
    if !require_root("burst_of_100_hooks_with_slow_clients_connected") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let parent = TestCgroup::new("dove-test-burst").unwrap();
    // Slow clients: connected, half a header sent, then silence.
    let slow: Vec<UnixStream> = (0..8)
        .map(|_| {
            let mut s = UnixStream::connect(&daemon.socket).unwrap();
            s.write_all(&[0, 0]).unwrap();
            s
        })
        .collect();
    let mut setups = Vec::new();
    for i in 0..100 {
        let cg = parent.child(&format!("c{i}")).unwrap();
        let bundle = Bundle::new(&["true"], &cg.path, &daemon.socket, &[]).unwrap();
        setups.push((cg, bundle));
    }
    let start = Instant::now();
    // All 100 started before any is waited for, as a node starting 100 containers does.
    let children: Vec<_> = setups
        .iter()
        .enumerate()
        .map(|(i, (_, bundle))| {
            let mut child = Command::new(bin("dove-hook"))
                .arg("--socket")
                .arg(&daemon.socket)
                // Not the 500 ms default: this is about nothing lost with stalled
                // clients connected, not about a loaded CI machine's latency.
                .args(["--timeout-ms", "10000", "--fail-closed", "createRuntime"])
                .env("DOVE_LOG_STDERR", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(&state_json(&format!("burst-{i}"), None, bundle.path()))
                .unwrap();
            child
        })
        .collect();
    let mut failures = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    let elapsed = start.elapsed();
    assert!(
        failures.is_empty(),
        "{} hooks failed: {failures:#?}",
        failures.len()
    );
    let list = daemon.list();
    assert_eq!(list.len(), 100, "none lost");
    for (i, (cg, _)) in setups.iter().enumerate() {
        let entry = list
            .iter()
            .find(|c| c.registration.id == format!("burst-{i}"))
            .unwrap();
        assert_eq!(entry.registration.cgroup_id, cg.id());
    }
    eprintln!("100 concurrent hooks with 8 stalled clients connected: {elapsed:?}");
    drop(slow);
}

#[test]
fn dove_socket_env_and_config_errors() {
    if !require_root("dove_socket_env_and_config_errors") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("env.sock");
    let registry_only = dir.path().join("registry-only.toml");
    std::fs::write(
        &registry_only,
        "[observer]\nenabled = false\n[metrics]\nlisten = \"\"\n",
    )
    .unwrap();
    let mut doved = KillOnDrop(
        Command::new(bin("doved"))
            .arg("--config")
            .arg(&registry_only)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("DOVE_SOCKET", &socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "doved did not honour DOVE_SOCKET"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new(bin("dovectl"))
        .arg("status")
        .env("DOVE_SOCKET", &socket)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("cgroup layout"));

    let parked = Parked::new();
    let mut hook = Command::new(bin("dove-hook"))
        .args(["--fail-closed", "createRuntime"])
        .env("DOVE_SOCKET", &socket)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    hook.stdin
        .take()
        .unwrap()
        .write_all(&state_json("env", Some(parked.pid()), dir.path()))
        .unwrap();
    assert!(hook.wait().unwrap().success());
    let list = Command::new(bin("dovectl"))
        .args(["list", "--json"])
        .env("DOVE_SOCKET", &socket)
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let entry = &list[0];
    for key in ["id", "cgroup_path", "cgroup_id", "pid", "registered_at"] {
        assert!(!entry[key].is_null(), "{key} missing from {entry}");
    }
    assert_eq!(entry["id"], "env");

    // A second daemon on the same socket refuses to steal it.
    let second = Command::new(bin("doved"))
        .arg("--config")
        .arg(&registry_only)
        .arg("--state-dir")
        .arg(dir.path().join("s2"))
        .env("DOVE_SOCKET", &socket)
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serving"));
    let _ = kill(Pid::from_raw(doved.0.id() as i32), Signal::SIGTERM);
    assert!(doved.0.wait().unwrap().success(), "clean exit on SIGTERM");
    assert!(!socket.exists(), "socket removed on shutdown");

    let config = dir.path().join("bad.toml");
    for (text, key) in [
        ("[daemon]\nsokcet = \"/x\"\n", "sokcet"),
        ("[daemon]\nmax_connections = -1\n", "max_connections"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = Command::new(bin("doved"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key) && stderr.contains("bad.toml"),
            "{stderr}"
        );
    }
}

#[test]
fn hooks_run_while_doved_is_down_are_replayed_when_it_starts() {
    if !require_root("hooks_run_while_doved_is_down_are_replayed_when_it_starts") {
        return;
    }
    let mut daemon = TempDaemon::start().unwrap();
    let kept = Parked::new();
    let gone = Parked::new();
    let removed_later = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    daemon.register(&removed_later.cgroup, "removed-later");
    daemon.kill9();

    // doved is down: each hook fails open, leaving its request in the spool.
    for (id, parked) in [("kept", &kept), ("gone", &gone)] {
        let run = run_hook(
            &daemon.socket,
            &["createRuntime"],
            &state_json(id, Some(parked.pid()), bundle.path()),
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(run.stderr.contains("spooled"), "{}", run.stderr);
    }
    let run = run_hook(
        &daemon.socket,
        &["poststop"],
        &state_json("removed-later", None, bundle.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("spooled"), "{}", run.stderr);
    // A container that came and went while doved was down: its registration must not
    // come back.
    drop(gone);

    daemon.spawn().unwrap();
    let ids: Vec<String> = daemon
        .list()
        .into_iter()
        .map(|c| c.registration.id)
        .collect();
    assert_eq!(ids, vec!["kept".to_string()], "{}", daemon.log_text());
    let spool = daemon.socket.parent().unwrap().join("spool");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "replayed requests are deleted"
    );
    assert_eq!(
        std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn a_full_accept_queue_never_holds_the_hook_past_its_deadline() {
    if !require_root("a_full_accept_queue_never_holds_the_hook_past_its_deadline") {
        return;
    }
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    // The queue holds up to net.core.somaxconn connections, one descriptor each here:
    // more than the common soft limit of 1024.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let needed = somaxconn + 512;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= needed,
        "this test needs {needed} open files (net.core.somaxconn {somaxconn} + 512) and the hard limit is {hard}: raise it (ulimit -Hn)"
    );
    // No higher than needed: every child of the test process inherits it.
    setrlimit(Resource::RLIMIT_NOFILE, soft.max(needed), hard).unwrap();
    let mut daemon = TempDaemon::start().unwrap();
    let parked = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    daemon.freeze();
    // Fill the stopped daemon's accept queue with idle connections.
    let addr = UnixAddr::new(&daemon.socket).unwrap();
    let mut idle = Vec::new();
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => idle.push(fd),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("connect: {e}"),
        }
        assert!(idle.len() < 100_000, "the accept queue never filled");
    }
    let run = run_hook(
        &daemon.socket,
        &["--timeout-ms", "500", "createRuntime"],
        &state_json("queued", Some(parked.pid()), bundle.path()),
    );
    daemon.thaw();
    eprintln!(
        "{} idle connections queued; hook exited {} after {:?}",
        idle.len(),
        run.code,
        run.elapsed
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.elapsed < Duration::from_millis(1500),
        "the hook took {:?} with a 500 ms deadline",
        run.elapsed
    );
    assert!(
        run.stderr.contains("queue is full") && run.stderr.contains("spooled"),
        "{}",
        run.stderr
    );
    drop(idle);
    // The spooled registration is not lost: the next start replays it.
    daemon.kill9();
    daemon.spawn().unwrap();
    assert!(daemon.find("queued").is_some(), "{}", daemon.log_text());
}

/// Two runtimes (or two roots of one) may both have a container called `web`: the first
/// one's poststop must not unregister the second.
#[test]
fn a_poststop_never_unregisters_another_container_with_the_same_id() {
    if !require_root("a_poststop_never_unregisters_another_container_with_the_same_id") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let first = Parked::new();
    let second = Parked::new();
    let (bundle_a, bundle_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (bundle, parked) in [(&bundle_a, &first), (&bundle_b, &second)] {
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"cgroupsPath": parked.cgroup.path},
        });
        std::fs::write(bundle.path().join("config.json"), config.to_string()).unwrap();
        let run = run_hook(
            &daemon.socket,
            &["createRuntime"],
            &state_json("web", Some(parked.pid()), bundle.path()),
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let registered = daemon.find("web").expect("registered");
    assert_eq!(registered.registration.cgroup_path, second.cgroup.path);

    // The first container stops: its poststop names its own cgroup.
    let run = run_hook(
        &daemon.socket,
        &["poststop"],
        &state_json("web", None, bundle_a.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let still = daemon
        .find("web")
        .expect("the second container stays registered");
    assert_eq!(still.registration.cgroup_path, second.cgroup.path);

    // The second one's poststop removes it.
    let run = run_hook(
        &daemon.socket,
        &["poststop"],
        &state_json("web", None, bundle_b.path()),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(daemon.find("web").is_none(), "{}", daemon.log_text());
}

/// Rootless mode: any user may connect, but may only register and unregister containers
/// whose cgroup is delegated to it, and may read nothing.
#[test]
fn rootless_peers_write_only_their_own_cgroups() {
    if !require_root("rootless_peers_write_only_their_own_cgroups") {
        return;
    }
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let daemon = TempDaemon::start_with_daemon_settings("rootless = true").unwrap();
    for dir in [daemon.dir.path(), daemon.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666, "socket mode");
    let mine = Parked::new();
    nix::unistd::chown(
        &mine.cgroup.dir,
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        None,
    )
    .unwrap();
    let roots = Parked::new();
    let bundle = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bundle.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new(bin("dove-hook"))
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args)
            .env("DOVE_LOG_STDERR", "1")
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, stderr) = as_nobody(
        &["createRuntime"],
        &state_json("users", Some(mine.pid()), bundle.path()),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        daemon.find("users").is_some(),
        "{stderr}\n{}",
        daemon.log_text()
    );

    // Someone else's cgroup: refused (the hook still fails open).
    let (code, stderr) = as_nobody(
        &["createRuntime"],
        &state_json("not-users", Some(roots.pid()), bundle.path()),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("delegated to it"), "{stderr}");
    assert!(daemon.find("not-users").is_none());

    // Nor may it remove root's containers, take over their IDs, or read anything.
    daemon.register(&roots.cgroup, "roots");
    let (_, stderr) = as_nobody(&["poststop"], &state_json("roots", None, bundle.path()));
    assert!(stderr.contains("delegated to it"), "{stderr}");
    assert!(daemon.find("roots").is_some());
    let (_, stderr) = as_nobody(
        &["createRuntime"],
        &state_json("roots", Some(mine.pid()), bundle.path()),
    );
    assert!(stderr.contains("registered by uid 0"), "{stderr}");
    assert_eq!(
        daemon.find("roots").unwrap().registration.cgroup_path,
        roots.cgroup.path,
        "root's entry was replaced"
    );
    let out = Command::new(bin("dovectl"))
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("list")
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("need root or socket_group"), "{stderr}");

    // Its own container it may remove.
    let (code, stderr) = as_nobody(&["poststop"], &state_json("users", None, bundle.path()));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(daemon.find("users").is_none(), "{stderr}");
}

/// socket_group: a member may read and nothing more, and membership is the peer's own
/// credentials (what the kernel checked against the socket's mode), not the group
/// database: `nobody` given the group as a supplementary group is a member, though
/// /etc/group does not list it.
#[test]
fn socket_group_members_read_by_their_credentials_and_never_write() {
    if !require_root("socket_group_members_read_by_their_credentials_and_never_write") {
        return;
    }
    const NOBODY: &str = "65534";
    let group = format!("dove-readers-{}", std::process::id());
    run(Command::new("groupadd").arg(&group)).unwrap();
    struct RemoveGroup(String);
    impl Drop for RemoveGroup {
        fn drop(&mut self) {
            let _ = Command::new("groupdel").arg(&self.0).status();
        }
    }
    let _group = RemoveGroup(group.clone());
    let gid = nix::unistd::Group::from_name(&group)
        .unwrap()
        .unwrap()
        .gid
        .to_string();
    let daemon =
        TempDaemon::start_with_daemon_settings(&format!("socket_group = \"{group}\"")).unwrap();
    for dir in [daemon.dir.path(), daemon.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let keep = TestCgroup::new("dove-test-keep").unwrap();
    daemon.register(&keep, "keep");
    let socket = daemon.socket.display().to_string();
    // nobody, with or without the group as a supplementary group.
    let as_nobody = |groups: &str, program: &str, args: &[&str], stdin: &[u8]| {
        let mut child = Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                &format!("--groups={groups}"),
            ])
            .arg(bin(program))
            .args(["--socket", &socket])
            .args(args)
            .env("DOVE_LOG_STDERR", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = as_nobody(&gid, "dovectl", &["list"], b"");
    assert!(ok && out.contains("keep"), "a member lists: {out}");
    let (ok, out) = as_nobody(NOBODY, "dovectl", &["list"], b"");
    assert!(!ok, "a non-member is refused: {out}");
    let bundle = tempfile::tempdir().unwrap();
    let (ok, out) = as_nobody(
        &gid,
        "dove-hook",
        &["--fail-closed", "poststop"],
        &state_json("keep", None, bundle.path()),
    );
    assert!(
        !ok && out.contains("may read"),
        "a member may not write: {out}"
    );
    assert!(daemon.find("keep").is_some());
    // Not even in a cgroup delegated to it: that is rootless mode's, and it is off.
    let own = Parked::new();
    nix::unistd::chown(
        &own.cgroup.dir,
        Some(nix::unistd::Uid::from_raw(65534)),
        None,
    )
    .unwrap();
    let (ok, out) = as_nobody(
        &gid,
        "dove-hook",
        &["--fail-closed", "createRuntime"],
        &state_json("members", Some(own.pid()), bundle.path()),
    );
    assert!(
        !ok && out.contains("may read"),
        "a member may not register: {out}"
    );
    assert!(daemon.find("members").is_none());
}

/// A doved that is stopped (SIGTERM) when the test is done with it, or fails.
struct Stopped(std::process::Child);

impl Stopped {
    fn stop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Started by systemd's socket activation: doved serves the socket it is handed (a
/// connection made before it started included), says READY=1 on NOTIFY_SOCKET, leaves
/// the socket file to systemd at exit, and ignores an fd 3 that is not a listening Unix
/// socket.
#[test]
fn socket_activation_and_readiness_notification() {
    if !require_root("socket_activation_and_readiness_notification") {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("doved.toml");
    std::fs::write(
        &config,
        "[observer]\nenabled = false\n[metrics]\nlisten = \"\"\n",
    )
    .unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = |socket: &std::path::Path, fd3: std::os::fd::RawFd| {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\""])
            .arg(bin("doved"))
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("NOTIFY_SOCKET", &notify_path)
            .stderr(std::fs::File::create(dir.path().join("doved.log")).unwrap());
        // SAFETY: dup2 and fcntl are async-signal-safe; fd3 is open in the parent.
        unsafe {
            cmd.pre_exec(move || {
                // When the descriptor already is 3 (another test thread freed it first),
                // dup2 does nothing and close-on-exec would still close it at exec.
                let passed = if fd3 == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0)
                } else {
                    nix::libc::dup2(fd3, 3)
                };
                if passed < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Stopped(cmd.stdout(Stdio::null()).spawn().unwrap())
    };

    let socket = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // A hook that connects while the daemon is still starting waits in the queue.
    let mut early = UnixStream::connect(&socket).unwrap();
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    dove_proto::write_frame(
        &mut early,
        &serde_json::to_vec(&dove_proto::RequestEnvelope::new(Request::Status)).unwrap(),
    )
    .unwrap();
    let mut child = start(&socket, listener.as_raw_fd());
    let reply = dove_proto::read_frame(&mut early, dove_proto::MAX_FRAME_BYTES)
        .unwrap_or_else(|e| panic!("no reply: {e}"));
    let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    assert!(
        reply["status"].is_object() || reply.to_string().contains("daemon_version"),
        "{reply}"
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "READY=1");
    child.stop();
    assert!(socket.exists(), "doved removed the socket systemd owns");

    // fd 3 is a regular file: not ours to take; doved binds its own socket instead.
    let file = std::fs::File::create(dir.path().join("not-a-socket")).unwrap();
    let own = dir.path().join("own.sock");
    let mut child = start(&own, file.as_raw_fd());
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&own).is_err() {
        assert!(
            Instant::now() < deadline,
            "doved did not bind its own socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.stop();
    let log = std::fs::read_to_string(dir.path().join("doved.log")).unwrap();
    assert!(log.contains("not a listening Unix stream socket"), "{log}");
}
