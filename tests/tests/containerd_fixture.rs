//! The containerd fixture itself: a real containerd with NRI on, driven through CRI, of
//! both series (Debian trixie's 1.7, Debian sid's 2.x). The NRI plugin's suites build on
//! it; this checks that what they rely on holds on this host (a host-network pod and a
//! busybox container run, land in the fixture's cgroup, take a CPU limit update, and go
//! away) and reports how long it takes.
//!
//! Run: `sudo -E cargo test -p dove-tests --test containerd_fixture -- --nocapture`.

use std::time::{Duration, Instant};

use dove_tests::containerd::{alive, cri, shim_sockets, ContainerSpec, Containerd, Major};
use dove_tests::{require_root, serial, unique};

/// The quota (µs per `PERIOD`) the container's CPU limit is read back as.
fn quota_of(mounts: &dove_cgroup::Mounts, cgroup: &str) -> i64 {
    let cpu = mounts.cpu.as_ref().expect("a cpu controller");
    let dir = cpu.dir(cgroup).expect("the cgroup's cpu directory");
    match mounts.layout() {
        dove_cgroup::Layout::Hybrid => {
            let q = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"))
                .unwrap_or_else(|e| panic!("{}/cpu.cfs_quota_us: {e}", dir.display()));
            q.trim().parse().unwrap()
        }
        dove_cgroup::Layout::Unified => {
            let max = std::fs::read_to_string(dir.join("cpu.max"))
                .unwrap_or_else(|e| panic!("{}/cpu.max: {e}", dir.display()));
            let quota = max.split_whitespace().next().unwrap();
            if quota == "max" {
                -1
            } else {
                quota.parse().unwrap()
            }
        }
    }
}

const PERIOD: i64 = 100_000;

#[test]
fn containerd_runs_a_pod_and_a_container_through_cri() {
    if !require_root("containerd_runs_a_pod_and_a_container_through_cri") {
        return;
    }
    runs_a_pod_and_a_container(Major::One);
}

#[test]
fn containerd_2_runs_a_pod_and_a_container_through_cri() {
    if !require_root("containerd_2_runs_a_pod_and_a_container_through_cri") {
        return;
    }
    runs_a_pod_and_a_container(Major::Two);
}

fn runs_a_pod_and_a_container(major: Major) {
    let _serial = serial();
    let begin = Instant::now();
    let ctd = Containerd::start_version(major).expect("containerd starts and serves CRI");
    assert!(
        ctd.version.starts_with(&format!("{}.", major.number())),
        "{major:?}: containerd {}",
        ctd.version
    );
    let version = ctd.version.clone();
    let started = begin.elapsed();
    let (ready_in, images_in) = (ctd.started_in, ctd.images_in);

    // NRI is on: containerd made its socket.
    use std::os::unix::fs::FileTypeExt;
    let nri = std::fs::metadata(ctd.nri_socket())
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", ctd.nri_socket().display(), ctd.log_text()));
    assert!(nri.file_type().is_socket(), "the NRI socket is a socket");

    let uid = unique("uid");
    let t = Instant::now();
    let pod = ctd
        .run_pod_sandbox("fixture", "dove-test", &uid)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctd.log_text()));
    let pod_in = t.elapsed();
    let t = Instant::now();
    let spec = ContainerSpec::busybox("sleeper", &["sleep", "60"]).cpu_limit(50_000, PERIOD);
    let id = ctd
        .create_container(&pod, &spec)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctd.log_text()));
    let created_in = t.elapsed();
    let t = Instant::now();
    ctd.start_container(&id)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctd.log_text()));
    let started_in = t.elapsed();

    let state = ctd.container_status(&id).expect("container status");
    assert!(state.running(), "running: {:?}", state.status);
    let pid = state.pid.expect("the verbose status names the pid");
    // runc's init execs `sleep` after StartContainer returned: until then (and while the
    // exec replaces its memory) the cmdline is runc's, or empty.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline == b"sleep\x0060\x00" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} runs {:?}, not sleep 60; container: {:?}\n{}",
            String::from_utf8_lossy(&cmdline),
            ctd.container_status(&id).map(|s| s.status),
            ctd.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Host network: the container shares this process's network namespace.
    let netns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_eq!(netns(&pid.to_string()), netns("self"), "host network");

    // Its cgroup is the one CRI asked for, under the fixture's parent: in the unified
    // hierarchy (the `0::` line) and, on a hybrid host, in the v1 cpu hierarchy.
    let expected = format!("{}/{id}", ctd.pod_cgroup_parent(&uid));
    assert_eq!(state.cgroups_path(), Some(expected.as_str()));
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cgroups = dove_cgroup::parse_proc_cgroup(&text);
    assert_eq!(
        cgroups.unified.as_deref(),
        Some(expected.as_str()),
        "/proc/{pid}/cgroup:\n{text}"
    );
    let mounts = dove_cgroup::Mounts::discover().unwrap();
    if mounts.layout() == dove_cgroup::Layout::Hybrid {
        assert_eq!(
            cgroups.cpu.as_deref(),
            Some(expected.as_str()),
            "/proc/{pid}/cgroup:\n{text}"
        );
    }
    let cpu_cgroup = cgroups.cpu.clone().unwrap_or_else(|| expected.clone());
    assert_eq!(quota_of(&mounts, &cpu_cgroup), 50_000, "the limit CRI set");

    // A CPU limit update through CRI reaches the cgroup.
    let t = Instant::now();
    ctd.update_container_resources(
        &id,
        cri::LinuxContainerResources {
            cpu_quota: 20_000,
            cpu_period: PERIOD,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ctd.log_text()));
    let updated_in = t.elapsed();
    assert_eq!(quota_of(&mounts, &cpu_cgroup), 20_000, "the updated limit");

    // A containerd restart (SIGTERM, start again) leaves the container running, in its
    // shim, and CRI and NRI come back.
    let mut ctd = ctd;
    let shims = ctd.shim_pids();
    // runc's v2 shim serves a whole pod: the sandbox and its containers.
    assert_eq!(shims.len(), 1, "one shim for the pod");
    let t = Instant::now();
    ctd.restart()
        .unwrap_or_else(|e| panic!("{e:#}\n{}", ctd.log_text()));
    let restart_in = t.elapsed();
    assert_eq!(ctd.shim_pids(), shims, "the shims outlive containerd");
    let after = ctd
        .container_status(&id)
        .expect("container status after a restart");
    assert!(
        after.running(),
        "running after a restart: {:?}",
        after.status
    );
    assert_eq!(after.pid, Some(pid));
    assert!(ctd.nri_socket().exists(), "NRI is back");

    let listed = ctd.list_containers().unwrap();
    assert!(
        listed.iter().any(|c| c.id == id && c.pod_sandbox_id == pod),
        "ListContainers: {listed:?}"
    );

    let t = Instant::now();
    ctd.stop_container(&id, 0).unwrap();
    let stopped = ctd.container_status(&id).unwrap();
    assert_eq!(
        stopped.status.state,
        cri::ContainerState::ContainerExited as i32,
        "{:?}",
        stopped.status
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} outlived its container"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ctd.remove_container(&id).unwrap();
    ctd.stop_pod_sandbox(&pod).unwrap();
    ctd.remove_pod_sandbox(&pod).unwrap();
    let removed_in = t.elapsed();
    assert!(ctd.list_containers().unwrap().is_empty());
    assert!(ctd.list_pod_sandboxes().unwrap().is_empty());

    // Dropping the fixture leaves nothing: no cgroup, no mount, no directory.
    let (dir, parent) = (ctd.dir.path().to_owned(), ctd.cgroup_parent.clone());
    let t = Instant::now();
    drop(ctd);
    let dropped_in = t.elapsed();
    assert!(!dir.exists(), "{} removed", dir.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&*dir.to_string_lossy()), "{mountinfo}");
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let gone = h.path().join(parent.trim_start_matches('/'));
        assert!(!gone.exists(), "{} removed", gone.display());
    }

    eprintln!(
        "containerd {version} fixture: start {started:?} (CRI ready {ready_in:?}, images {images_in:?}); \
         pod {pod_in:?}; container create {created_in:?}, start {started_in:?}; \
         update {updated_in:?}; \
         containerd restart {restart_in:?}; stop+remove {removed_in:?}; drop {dropped_in:?}; \
         total {:?}",
        begin.elapsed()
    );
}

/// What a failing test leaves (a running pod; containerd itself gone) is removed when the
/// fixture drops: the container's process, the shim and its socket, mounts, cgroups.
#[test]
fn containerd_fixture_cleans_up_what_a_test_left() {
    if !require_root("containerd_fixture_cleans_up_what_a_test_left") {
        return;
    }
    cleans_up_what_a_test_left(Major::One);
}

#[test]
fn containerd_2_fixture_cleans_up_what_a_test_left() {
    if !require_root("containerd_2_fixture_cleans_up_what_a_test_left") {
        return;
    }
    cleans_up_what_a_test_left(Major::Two);
}

fn cleans_up_what_a_test_left(major: Major) {
    let _serial = serial();
    // `stop_containerd`: containerd is gone before the drop (as after a crash), so the
    // fixture cannot ask CRI and must clean up behind it.
    for stop_containerd in [false, true] {
        let mut ctd = Containerd::start_version(major).expect("containerd starts");
        let pod = ctd
            .run_pod_sandbox("left", "dove-test", &unique("uid"))
            .unwrap();
        let id = ctd
            .create_container(&pod, &ContainerSpec::busybox("left", &["sleep", "60"]))
            .unwrap();
        ctd.start_container(&id).unwrap();
        let pid = ctd.container_status(&id).unwrap().pid.unwrap();
        let shims = ctd.shim_pids();
        assert!(!shims.is_empty());
        let shim_socket = shim_sockets(ctd.dir.path())
            .into_iter()
            .next()
            .expect("the shim's address");
        assert!(shim_socket.exists(), "{}", shim_socket.display());
        let (dir, parent) = (ctd.dir.path().to_owned(), ctd.cgroup_parent.clone());
        if stop_containerd {
            ctd.stop();
        }

        let t = Instant::now();
        drop(ctd);
        eprintln!(
            "containerd {major:?}: drop with a running pod (containerd {}): {:?}",
            if stop_containerd {
                "stopped"
            } else {
                "running"
            },
            t.elapsed()
        );
        for p in shims.iter().map(|p| *p as u32).chain([pid]) {
            assert!(!alive(p), "pid {p} killed");
        }
        assert!(!shim_socket.exists(), "{} removed", shim_socket.display());
        assert!(!dir.exists(), "{} removed", dir.display());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(&*dir.to_string_lossy()), "{mountinfo}");
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let gone = h.path().join(parent.trim_start_matches('/'));
            assert!(!gone.exists(), "{} removed", gone.display());
        }
    }
}
