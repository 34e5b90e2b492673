//! doved's NRI plugin against a real containerd (Debian's, NRI enabled, driven through
//! CRI as the kubelet drives it): containers are registered when created, with their pod
//! and namespace as metric labels, and forgotten when removed; a doved restart and a
//! containerd restart lose nothing; containerd never waits for an absent doved. The main
//! test runs against both series: 1.7 (NRI 0.6) and 2.x (NRI 0.8, on by default).

use std::time::{Duration, Instant};

use dove_tests::containerd::{ContainerSpec, Containerd, Major};
use dove_tests::*;

const WAIT: Duration = Duration::from_secs(15);

fn nri_daemon(ctd: &Containerd) -> TempDaemon {
    TempDaemon::with_observer_and(&format!(
        "[nri]\nenabled = true\nsocket = \"{}\"\n",
        ctd.nri_socket().display()
    ))
    .unwrap()
}

/// Wait until doved says it registered with containerd `times` times in all.
fn wait_registered(daemon: &TempDaemon, ctd: &Containerd, times: usize) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if daemon
            .log_text()
            .matches("registered with the NRI runtime")
            .count()
            >= times
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "doved did not register with containerd ({times} times)\ndoved: {}\ncontainerd: {}",
        daemon.log_text(),
        ctd.log_text()
    );
}

/// What containerd logged against doved's plugin (`50-dove`): a warning or an error naming
/// it (an event it refused or could not deliver, a closed connection), or a failed
/// synchronisation (logged without the plugin's name).
fn plugin_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let serious = l.contains("level=warning") || l.contains("level=error");
            (serious && l.contains("50-dove")) || l.contains("failed to synchronize plugin")
        })
        .collect()
}

fn registered(daemon: &TempDaemon, id: &str) -> bool {
    daemon.find(id).is_some()
}

fn wait_until(what: &str, daemon: &TempDaemon, ctd: &Containerd, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what}: not within {WAIT:?}\ndoved: {}\ncontainerd: {}",
        daemon.log_text(),
        ctd.log_text()
    );
}

#[test]
fn containers_of_a_real_containerd_are_registered_and_forgotten_through_nri() {
    if !require_root("containers_of_a_real_containerd_are_registered_and_forgotten_through_nri") {
        return;
    }
    registered_and_forgotten(Major::One);
}

#[test]
fn containers_of_a_real_containerd_2_are_registered_and_forgotten_through_nri() {
    if !require_root("containers_of_a_real_containerd_2_are_registered_and_forgotten_through_nri") {
        return;
    }
    registered_and_forgotten(Major::Two);
}

/// Registered at start with the Kubernetes names, forgotten at removal, across a doved
/// restart (Synchronize) and a containerd restart (reconnection), on a containerd of
/// series `major`.
fn registered_and_forgotten(major: Major) {
    let begin = Instant::now();
    let mut ctd = Containerd::start_version(major).unwrap();
    eprintln!(
        "containerd {} started in {:?} (images {:?})",
        ctd.version, ctd.started_in, ctd.images_in
    );
    let mut daemon = nri_daemon(&ctd);
    wait_registered(&daemon, &ctd, 1);

    // Started (containerd makes the cgroup and the process only then): registered, with
    // its cgroup and its Kubernetes names.
    let pod = ctd.run_pod_sandbox("web-0", "shop", "uid-web-0").unwrap();
    let app = ctd
        .create_container(&pod, &ContainerSpec::busybox("app", &["sleep", "600"]))
        .unwrap();
    ctd.start_container(&app).unwrap();
    wait_until("registered at start", &daemon, &ctd, || {
        registered(&daemon, &app)
    });
    let reg = daemon.find(&app).unwrap().registration;
    assert_eq!(reg.stage.as_deref(), Some("nri"));
    // Named as containerd named itself in Configure.
    // (Configure's version is the one `containerd --version` prints.)
    assert_eq!(
        reg.runtime.as_deref(),
        Some(format!("containerd {} (NRI)", ctd.version).as_str())
    );
    assert_eq!(reg.annotations["io.dove.nri.pod"], "web-0");
    assert_eq!(reg.annotations["io.dove.nri.namespace"], "shop");
    assert_eq!(reg.annotations["io.dove.nri.container"], "app");

    // The cgroup is the one its process runs in.
    let state = ctd.container_status(&app).unwrap();
    let pid = state.pid.expect("a running container has a pid");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line");
    assert_eq!(reg.cgroup_path, v2, "registered cgroup vs the process's");

    // The bill carries the names.
    let metrics = daemon.scrape().unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("dove_softirq_seconds_total{") && l.contains(&app))
        .unwrap_or_else(|| panic!("no cost series for {app}:\n{metrics}"));
    for label in ["namespace=\"shop\"", "pod=\"web-0\"", "container=\"app\""] {
        assert!(line.contains(label), "{label} missing from {line}");
    }

    // doved down while a container is removed and another is created: Synchronize
    // forgets the one and registers the other when doved is back.
    daemon.kill9();
    ctd.stop_container(&app, 1).unwrap();
    ctd.remove_container(&app).unwrap();
    let late = ctd
        .create_container(&pod, &ContainerSpec::busybox("late", &["sleep", "600"]))
        .unwrap();
    // containerd did not wait for the absent plugin.
    ctd.start_container(&late).unwrap();
    daemon.spawn().unwrap();
    wait_registered(&daemon, &ctd, 2);
    wait_until("synchronized after a doved restart", &daemon, &ctd, || {
        registered(&daemon, &late) && !registered(&daemon, &app)
    });

    // An NRI registration containerd does not know, whose cgroup still exists (so the
    // cgroup watch keeps it): the Synchronize of the next connection forgets it.
    let ghost_cgroup = TestCgroup::new("dove-nri-ghost").unwrap();
    let mut ghost = ghost_cgroup.registration("ghost-of-a-container");
    ghost.stage = Some("nri".into());
    daemon.register_as(ghost);
    assert!(registered(&daemon, "ghost-of-a-container"));

    // containerd restarted: doved reconnects, and what containerd does next reaches it.
    let restarted_in = ctd.restart().unwrap();
    eprintln!("containerd restarted in {restarted_in:?}");
    wait_registered(&daemon, &ctd, 3);
    wait_until(
        "the unknown NRI registration forgotten",
        &daemon,
        &ctd,
        || !registered(&daemon, "ghost-of-a-container"),
    );
    assert!(
        ghost_cgroup.dir.exists(),
        "forgotten by Synchronize, not the cgroup watch"
    );
    let after = ctd
        .create_container(&pod, &ContainerSpec::busybox("after", &["sleep", "600"]))
        .unwrap();
    ctd.start_container(&after).unwrap();
    wait_until(
        "registered after a containerd restart",
        &daemon,
        &ctd,
        || registered(&daemon, &after),
    );
    assert!(registered(&daemon, &late), "kept across the reconnect");

    // Removed: forgotten.
    ctd.stop_container(&after, 1).unwrap();
    ctd.remove_container(&after).unwrap();
    ctd.stop_container(&late, 1).unwrap();
    ctd.remove_container(&late).unwrap();
    wait_until("forgotten at removal", &daemon, &ctd, || {
        !registered(&daemon, &after) && !registered(&daemon, &late)
    });
    ctd.stop_pod_sandbox(&pod).unwrap();
    ctd.remove_pod_sandbox(&pod).unwrap();
    eprintln!("containerd {}: {:?} in all", ctd.version, begin.elapsed());
    let log = ctd.log_text();
    let complaints = plugin_complaints(&log);
    assert!(
        complaints.is_empty(),
        "containerd {} complained about the plugin:\n{}",
        ctd.version,
        complaints.join("\n")
    );
}

/// The round trip of CRI CreateContainer with doved's plugin connected against the same
/// containerd without it: what NRI adds to a container's creation. Printed, not judged.
#[test]
fn create_container_latency_with_and_without_the_plugin() {
    if !require_root("create_container_latency_with_and_without_the_plugin") {
        return;
    }
    let ctd = Containerd::start().unwrap();
    let pod = ctd.run_pod_sandbox("lat-0", "bench", "uid-lat-0").unwrap();
    let median = |mut samples: Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    };
    // (CreateContainer, StartContainer) round trips in ms, medians of 8.
    let round = |tag: &str| {
        let (mut create, mut start) = (Vec::new(), Vec::new());
        for i in 0..8 {
            let spec = ContainerSpec::busybox(&format!("{tag}{i}"), &["sleep", "60"]);
            let t = Instant::now();
            let id = ctd.create_container(&pod, &spec).unwrap();
            create.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            ctd.start_container(&id).unwrap();
            start.push(t.elapsed().as_secs_f64() * 1e3);
            ctd.stop_container(&id, 0).unwrap();
            ctd.remove_container(&id).unwrap();
        }
        (median(create), median(start))
    };
    let without = round("without");
    let daemon = nri_daemon(&ctd);
    wait_registered(&daemon, &ctd, 1);
    let with = round("with");
    eprintln!(
        "median of 8 round trips: CreateContainer {:.1} ms without the plugin, {:.1} ms with it ({:+.1} ms); StartContainer {:.1} ms without, {:.1} ms with ({:+.1} ms)",
        without.0,
        with.0,
        with.0 - without.0,
        without.1,
        with.1,
        with.1 - without.1
    );
    ctd.stop_pod_sandbox(&pod).unwrap();
    ctd.remove_pod_sandbox(&pod).unwrap();
}

/// In cpumax mode, a CPU limit the kubelet sets or resizes through CRI
/// (UpdateContainerResources, as an in-place resize does) becomes the base doved works
/// from: doved adopts what the orchestrator writes and never writes it back.
#[test]
fn a_cri_resize_becomes_the_base_cpumax_works_from() {
    if !require_root("a_cri_resize_becomes_the_base_cpumax_works_from") {
        return;
    }
    let ctd = Containerd::start().unwrap();
    let daemon = TempDaemon::with_observer_config(
        &format!(
            "[nri]\nenabled = true\nsocket = \"{}\"\n",
            ctd.nri_socket().display()
        ),
        "cpumax",
    )
    .unwrap();
    wait_registered(&daemon, &ctd, 1);
    let pod = ctd.run_pod_sandbox("api-0", "shop", "uid-api-0").unwrap();
    let app = ctd
        .create_container(
            &pod,
            &ContainerSpec::busybox("api", &["sleep", "600"]).cpu_limit(50_000, 100_000),
        )
        .unwrap();
    ctd.start_container(&app).unwrap();
    let base = || quota_state(&daemon, &app).map(|q| q.base_quota_us);
    wait_until("the CPU limit is the base", &daemon, &ctd, || {
        base() == Some(50_000)
    });
    let mut resized = dove_tests::containerd::cri::LinuxContainerResources {
        cpu_quota: 80_000,
        cpu_period: 100_000,
        ..Default::default()
    };
    ctd.update_container_resources(&app, resized.clone())
        .unwrap();
    wait_until("the resize is adopted", &daemon, &ctd, || {
        base() == Some(80_000)
    });
    resized.cpu_quota = 30_000;
    ctd.update_container_resources(&app, resized).unwrap();
    wait_until("a second resize is adopted", &daemon, &ctd, || {
        base() == Some(30_000)
    });
    ctd.stop_container(&app, 1).unwrap();
    ctd.remove_container(&app).unwrap();
    ctd.stop_pod_sandbox(&pod).unwrap();
    ctd.remove_pod_sandbox(&pod).unwrap();
}
