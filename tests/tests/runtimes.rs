//! Real runtimes (runc, crun, podman) call dove-hook; doved registers and forgets.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dove_tests::*;

const WAIT: Duration = Duration::from_secs(10);

struct Runc {
    root: tempfile::TempDir,
    id: String,
}

impl Runc {
    fn new(id: &str) -> Self {
        Self {
            root: tempfile::Builder::new()
                .prefix("dove-runc-")
                .tempdir()
                .unwrap(),
            id: id.to_owned(),
        }
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(self.root.path()).args(args);
        c
    }
    fn create(&self, bundle: &Path) -> anyhow::Result<String> {
        run(self.cmd(&["create", "--bundle"]).arg(bundle).arg(&self.id))
    }
    fn state_pid(&self) -> u32 {
        let out = run(&mut self.cmd(&["state", &self.id])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }
    fn delete(&self) {
        let _ = run(&mut self.cmd(&["kill", &self.id, "KILL"]));
        let _ = run(&mut self.cmd(&["delete", "--force", &self.id]));
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        self.delete();
    }
}

#[test]
fn runc_registers_at_create_and_unregisters_at_poststop() {
    if !require_root("runc_registers_at_create_and_unregisters_at_poststop") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let parent = TestCgroup::new("dove-test-runc").unwrap();
    let id = unique("runc");
    let cgroups_path = format!("{}/{id}", parent.path);
    let bundle = Bundle::new(
        &["sleep", "1000"],
        &cgroups_path,
        &daemon.socket,
        &["createRuntime", "poststop"],
    )
    .unwrap();
    let runc = Runc::new(&id);
    runc.create(bundle.path()).unwrap();

    let entry = daemon.find(&id).expect("registered at createRuntime");
    let dir = unified_mount().join(cgroups_path.trim_start_matches('/'));
    let inode = run(Command::new("stat").args(["-c", "%i"]).arg(&dir)).unwrap();
    assert_eq!(
        entry.registration.cgroup_id.to_string(),
        inode.trim(),
        "cgroup ID is the v2 directory's inode"
    );
    assert_eq!(entry.registration.cgroup_path, cgroups_path);
    assert_eq!(entry.registration.pid, Some(runc.state_pid()));
    assert_eq!(entry.registration.runtime.as_deref(), Some("runc"));
    assert_eq!(entry.registration.stage.as_deref(), Some("createRuntime"));
    if dove_cgroup::Mounts::discover().unwrap().layout() == dove_cgroup::Layout::Hybrid {
        // The v1 cpu cgroup where CFS bandwidth lives on this host.
        assert_eq!(
            entry.registration.cpu_cgroup_path.as_deref(),
            Some(cgroups_path.as_str())
        );
        let cpu_dir = Path::new("/sys/fs/cgroup/cpu").join(cgroups_path.trim_start_matches('/'));
        let cpu_inode = run(Command::new("stat").args(["-c", "%i"]).arg(&cpu_dir)).unwrap();
        assert_eq!(
            entry
                .registration
                .cpu_cgroup_id
                .map(|i| i.to_string())
                .as_deref(),
            Some(cpu_inode.trim())
        );
    }

    runc.delete();
    assert!(
        daemon.find(&id).is_none(),
        "unregistered at poststop: {:?}",
        daemon.list()
    );
    assert!(
        daemon.log_text().contains("unregistered"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn runc_container_dropped_when_cgroup_vanishes_without_poststop() {
    if !require_root("runc_container_dropped_when_cgroup_vanishes_without_poststop") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let parent = TestCgroup::new("dove-test-runc").unwrap();
    let id = unique("runc-nopoststop");
    let cgroups_path = format!("{}/{id}", parent.path);
    // No poststop hook: the runtime "forgets" to tell us.
    let bundle = Bundle::new(
        &["sleep", "1000"],
        &cgroups_path,
        &daemon.socket,
        &["createRuntime"],
    )
    .unwrap();
    let runc = Runc::new(&id);
    runc.create(bundle.path()).unwrap();
    assert!(daemon.find(&id).is_some());
    runc.delete();
    daemon.wait_for("the vanished cgroup's container to be dropped", WAIT, |l| {
        l.iter().all(|c| c.registration.id != id)
    });
    assert!(daemon
        .log_text()
        .contains("cgroup removed without a poststop"));
}

/// crun refuses hybrid hosts unless cgroup2 is out of its sight, so run it in a private
/// mount namespace with the unified mount lazily unmounted, inside a
/// v2 cgroup of ours. The hook then finds cgroup2 through PID 1's mount namespace.
fn crun(root: &Path, v2_cgroup: Option<&TestCgroup>, args: &[&str]) -> anyhow::Result<String> {
    let hybrid = dove_cgroup::Mounts::discover().unwrap().layout() == dove_cgroup::Layout::Hybrid;
    let mut script = String::new();
    if let Some(cg) = v2_cgroup {
        script.push_str(&format!("echo $$ > {}/cgroup.procs && ", cg.dir.display()));
    }
    if hybrid {
        script.push_str(&format!("umount -l {UNIFIED} && "));
    }
    script.push_str("exec crun --root \"$0\" \"$@\"");
    run(Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .arg(root)
        .args(args))
}

#[test]
fn crun_registers_and_unregisters() {
    if !require_root("crun_registers_and_unregisters") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let parent = TestCgroup::new("dove-test-crun").unwrap();
    let v2 = parent.child("ctr").unwrap();
    let id = unique("crun");
    let cgroups_path = format!("{}/{id}", parent.path);
    let bundle = Bundle::new(
        &["sleep", "1000"],
        &cgroups_path,
        &daemon.socket,
        &["createRuntime", "poststop"],
    )
    .unwrap();
    let root = tempfile::Builder::new()
        .prefix("dove-crun-")
        .tempdir()
        .unwrap();
    let bundle_arg = bundle.path().display().to_string();

    crun(
        root.path(),
        Some(&v2),
        &["create", "--bundle", &bundle_arg, &id],
    )
    .unwrap();
    let cleanup = scopeguard(|| {
        let _ = crun(root.path(), None, &["delete", "--force", &id]);
    });
    let entry = daemon.find(&id).expect("registered at createRuntime");
    // On a hybrid host crun manages v1 cgroups; its container stays in the v2 cgroup it
    // was started from. On a unified host crun creates the v2 cgroup itself.
    let expected =
        if dove_cgroup::Mounts::discover().unwrap().layout() == dove_cgroup::Layout::Hybrid {
            v2.id()
        } else {
            cgroup_id_of(&cgroups_path)
        };
    assert_eq!(entry.registration.cgroup_id, expected);
    assert_eq!(entry.registration.runtime.as_deref(), Some("crun"));

    crun(root.path(), None, &["kill", &id, "KILL"]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    crun(root.path(), None, &["delete", "--force", &id]).unwrap();
    drop(cleanup);
    assert!(
        daemon.find(&id).is_none(),
        "unregistered at poststop: {:?}",
        daemon.list()
    );
}

#[test]
fn podman_with_hooks_dir_registers_and_unregisters() {
    if !require_root("podman_with_hooks_dir_registers_and_unregisters") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let work = tempfile::Builder::new()
        .prefix("dove-podman-")
        .tempdir()
        .unwrap();
    let hooks_dir = work.path().join("hooks.d");
    std::fs::create_dir_all(&hooks_dir).unwrap();
    write_hooks_d(&hooks_dir, &daemon.socket);

    let name = unique("podman");
    let parent = TestCgroup::new("dove-test-podman").unwrap();
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(work.path().join("root"))
            .arg("--runroot")
            .arg(work.path().join("runroot"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--runtime",
                "runc",
            ])
            .arg("--hooks-dir")
            .arg(&hooks_dir)
            .args(args);
        c
    };
    let rootfs = busybox_rootfs().display().to_string();
    let mut child = podman(&[
        "run",
        "--rm",
        "--name",
        &name,
        "--network",
        "none",
        "--cgroup-parent",
        &parent.path,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        "--rootfs",
        &rootfs,
        "sleep",
        "3",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::fs::File::create(work.path().join("podman.err")).unwrap())
    .spawn()
    .unwrap();

    daemon.wait_for(
        "podman's container to register",
        Duration::from_secs(30),
        |l| !l.is_empty(),
    );
    let entry = daemon.list().remove(0);
    let dir = unified_mount().join(entry.registration.cgroup_path.trim_start_matches('/'));
    let inode = run(Command::new("stat").args(["-c", "%i"]).arg(&dir)).unwrap();
    assert_eq!(entry.registration.cgroup_id.to_string(), inode.trim());
    assert_eq!(
        entry
            .registration
            .annotations
            .get("io.container.manager")
            .map(String::as_str),
        Some("libpod")
    );

    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "podman run failed: {}",
        std::fs::read_to_string(work.path().join("podman.err")).unwrap_or_default()
    );
    daemon.wait_for("podman's container to unregister", WAIT, |l| l.is_empty());
    let _ = podman(&["rm", "-f", &name]).output();
}

/// Rootless podman: the hook runs as the user (root only inside podman's user
/// namespace), doved in rootless mode sees the user's uid and accepts the container
/// because its cgroup is delegated to that user, and the user's poststop removes it.
#[test]
fn rootless_podman_registers_in_a_delegated_cgroup() {
    if !require_root("rootless_podman_registers_in_a_delegated_cgroup") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let user = TestUser::new("dove-rootless");
    let daemon = TempDaemon::start_with_daemon_settings("rootless = true").unwrap();
    for dir in [daemon.dir.path(), daemon.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let work = tempfile::Builder::new()
        .prefix("dove-rootless-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = work.path().join("home");
    let hooks_dir = work.path().join("hooks.d");
    for dir in [&home, &hooks_dir] {
        std::fs::create_dir_all(dir).unwrap();
    }
    write_hooks_d(&hooks_dir, &daemon.socket);
    // The user's own copy of the root filesystem: a user namespace cannot use root's.
    let rootfs = home.join("rootfs");
    run(Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(&rootfs))
    .unwrap();
    run(Command::new("chown")
        .arg("-R")
        .arg(format!("{0}:{0}", user.uid))
        .arg(&home))
    .unwrap();
    // What systemd gives a user session: a cgroup it owns (cgroup v2 delegation).
    let session = TestCgroup::new("dove-test-rootless").unwrap();
    for file in [
        "",
        "cgroup.procs",
        "cgroup.subtree_control",
        "cgroup.threads",
    ] {
        nix::unistd::chown(
            &session.dir.join(file),
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.uid)),
        )
        .unwrap();
    }

    // Root moves the shell into the session, which then becomes the user: rootless podman
    // without systemd leaves its containers in the caller's cgroup.
    let name = unique("rootless");
    let script = format!(
        "echo $$ > {procs} && exec setpriv --reuid={uid} --regid={uid} --init-groups \\
         env HOME={home} XDG_RUNTIME_DIR={home} \\
         podman --root {home}/root --runroot {home}/runroot --storage-driver vfs \\
           --cgroup-manager cgroupfs --events-backend file --runtime runc \\
           --hooks-dir {hooks} \\
           run --rm --name {name} --network none --rootfs {rootfs} sleep 3",
        procs = session.dir.join("cgroup.procs").display(),
        uid = user.uid,
        home = home.display(),
        hooks = hooks_dir.display(),
        rootfs = rootfs.display(),
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .current_dir(&home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.path().join("podman.err")).unwrap())
        .spawn()
        .unwrap();
    let podman_err = || std::fs::read_to_string(work.path().join("podman.err")).unwrap_or_default();
    let child = KillOnDrop(child);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let entry = loop {
        if let Some(entry) = daemon.list().into_iter().next() {
            break entry;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rootless podman's container never registered\npodman: {}\ndoved: {}",
            podman_err(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(entry.registered_by, user.uid, "registered by the user");
    assert_eq!(entry.registration.cgroup_path, session.path);
    assert_eq!(entry.registration.cgroup_id, session.id());
    let mut child = child;
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "rootless podman run failed: {}",
        podman_err()
    );
    daemon.wait_for("the user's poststop to unregister it", WAIT, |l| {
        l.is_empty()
    });
}

/// The shipped hooks.d file, pointed at this build and `socket`.
fn write_hooks_d(dir: &Path, socket: &Path) {
    let mut hook: serde_json::Value =
        serde_json::from_str(include_str!("../../config/hooks.d/dove.json")).unwrap();
    hook["hook"]["path"] = bin("dove-hook").display().to_string().into();
    hook["hook"]["args"] = serde_json::json!([
        "dove-hook",
        "--socket",
        socket,
        "--timeout-ms",
        "5000",
        "auto"
    ]);
    std::fs::write(dir.join("dove.json"), hook.to_string()).unwrap();
}

/// Run `f` on drop.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
