//! DOVE with a real Docker: Debian bookworm's dockerd 20.10 (unpacked by
//! scripts/docker.sh, private to each test: see `dove_tests::docker`) running containers
//! through `dove-runtime`, registered in its daemon.json by `dovectl docker
//! install-runtime` and taken out by `dovectl docker remove-runtime`, as the packages'
//! removal scripts do.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use dove_proto::{Reply, Request};
use dove_tests::docker::{dovectl, Dockerd};
use dove_tests::*;

const IMAGE: &str = "dove-busybox:test";

/// Whether a containerd shim for container `id` runs.
fn shim_running(id: &str) -> bool {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .any(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("containerd-shim") && cmdline.contains(id)
        })
}

/// Poll `what` every 20 ms until it is `Some`, for at most `within`.
fn eventually<T>(within: Duration, mut what: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = what() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `dovectl docker install-runtime` for the doved on `daemon`'s socket, into `dockerd`'s
/// configuration, with dockerd reloaded (the wrapper and hook are this build's).
fn install_runtime(daemon: &TempDaemon, dockerd: &Dockerd, extra: &[&str]) -> String {
    let before = dockerd.reloads();
    let config = dockerd.config.display().to_string();
    let pidfile = dockerd.pidfile.display().to_string();
    let mut args = vec![
        "docker",
        "install-runtime",
        "--config",
        &config,
        "--inner-runtime",
        "/usr/sbin/runc",
        "--reload",
        "--pidfile",
        &pidfile,
    ];
    args.extend(extra);
    let out = dovectl(&daemon.socket, &args).unwrap();
    dockerd.wait_reloaded(before).unwrap();
    out
}

/// `dovectl docker remove-runtime` from `dockerd`'s configuration, with dockerd
/// reloaded, as prerm runs it.
fn remove_runtime(daemon: &TempDaemon, dockerd: &Dockerd, extra: &[&str]) -> String {
    let before = dockerd.reloads();
    let config = dockerd.config.display().to_string();
    let pidfile = dockerd.pidfile.display().to_string();
    let mut args = vec!["docker", "remove-runtime", "--config", &config];
    args.extend(extra);
    args.extend(["--reload", "--pidfile", &pidfile]);
    let out = dovectl(&daemon.socket, &args).unwrap();
    dockerd.wait_reloaded(before).unwrap();
    out
}

/// Send `bytes` over TCP to `addr`, retrying the connection while the container's
/// listener is not up yet.
fn tcp_send(addr: &str, bytes: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("connecting to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0;
    while sent < bytes {
        conn.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
}

/// (a) `docker run --runtime dove` registers the container with its cgroups and pid, and
/// traffic into it is attributed to it; (b) `docker update --cpus` moves the base quota
/// doved's cpumax controller works from; (c) `docker rm -f` unregisters it (poststop) and
/// leaves a bill with its traffic.
#[test]
fn docker_run_with_dove_registers_attributes_follows_cpus_and_unregisters() {
    if !require_root("docker_run_with_dove_registers_attributes_follows_cpus_and_unregisters") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer_config("", "cpumax").unwrap();
    let mut dockerd = Dockerd::start(serde_json::json!({})).unwrap();
    eprintln!("dockerd answered {:?} after spawn", dockerd.started_in);
    // Registered while dockerd runs: a reload makes it usable.
    let said = install_runtime(&daemon, &dockerd, &[]);
    assert!(said.contains("registered runtime \"dove\""), "{said}");
    let info = dockerd
        .docker(&["info", "--format", "{{json .Runtimes}} {{.DefaultRuntime}}"])
        .unwrap();
    assert!(
        info.contains("\"dove\"") && info.trim().ends_with("runc"),
        "{info}"
    );
    dockerd.import_busybox(IMAGE).unwrap();
    let net = dockerd.bridge_network().unwrap();

    // (a) Registered at create, with the cgroups runc made under dockerd's parent.
    let started = Instant::now();
    let id = dockerd
        .docker(&[
            "run",
            "-d",
            "--runtime",
            "dove",
            "--network",
            &net.name,
            // A quota from the start: doved's cpumax takes a container's quota cgroup at
            // registration (see `a_quota_set_after_registration_is_enforced`).
            "--cpus",
            "1",
            IMAGE,
            "sh",
            "-c",
            "while :; do nc -l -p 5000 >/dev/null; done",
        ])
        .unwrap()
        .trim()
        .to_owned();
    eprintln!("docker run -d --runtime dove: {:?}", started.elapsed());
    let entry = daemon
        .find(&id)
        .unwrap_or_else(|| panic!("{id} not registered; doved:\n{}", daemon.log_text()));
    let cgroup = format!("{}/{id}", dockerd.cgroup_parent);
    let r = &entry.registration;
    assert_eq!(r.cgroup_path, cgroup);
    assert_eq!(r.cgroup_id, cgroup_id_of(&cgroup));
    assert_eq!(r.cpu_cgroup_path.as_deref(), Some(cgroup.as_str()), "{r:?}");
    let pid: u32 = dockerd
        .inspect(&id, "{{.State.Pid}}")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(r.pid, Some(pid));

    // Traffic from the host into the container, over the bridge and its veth.
    let ip = dockerd
        .inspect(
            &id,
            &format!(
                "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
                net.name
            ),
        )
        .unwrap();
    let before = settled(&daemon);
    let unattributed_before = before.unattributed.rx_packets;
    for _ in 0..4 {
        tcp_send(&format!("{ip}:5000"), 2 << 20);
    }
    let stats = settled(&daemon);
    let c = cost(&stats, &id);
    eprintln!(
        "attributed to the container: {} rx packets, {:.3} ms rx softirq; unattributed rx packets meanwhile {}",
        c.rx_packets,
        ms(c.rx_ns),
        stats.unattributed.rx_packets - unattributed_before
    );
    assert!(
        c.rx_packets > 0 && c.rx_ns > 0,
        "8 MiB into the container attributed nothing: {c:?}"
    );

    // (b) The quota docker set at run, then two others docker update sets.
    let first = quota_state(&daemon, &id).expect("a container with --cpus 1 is enforced");
    assert_eq!(
        (first.base_quota_us, first.period_us),
        (100_000, 100_000),
        "{first:?}"
    );
    let quota_file = dockerd.cpu_cgroup_dir(&id).join("cpu.cfs_quota_us");
    for (cpus, quota) in [("0.5", 50_000u64), ("0.8", 80_000)] {
        let changed = Instant::now();
        dockerd.docker(&["update", "--cpus", cpus, &id]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&quota_file).unwrap().trim(),
            quota.to_string(),
            "docker wrote the quota"
        );
        let state = eventually(Duration::from_secs(5), || {
            quota_state(&daemon, &id).filter(|q| q.base_quota_us == quota)
        })
        .unwrap_or_else(|| {
            panic!(
                "after docker update --cpus {cpus}, doved's base for {id} is {:?}, not {quota} us\n{}",
                quota_state(&daemon, &id),
                daemon.log_text()
            )
        });
        eprintln!(
            "--cpus {cpus}: base {} us seen after {:?}",
            state.base_quota_us,
            changed.elapsed()
        );
        assert_eq!(state.period_us, 100_000);
        // The container's own cgroup in the v1 cpu hierarchy, where docker wrote.
        assert_eq!(Path::new(&state.cgroup), dockerd.cpu_cgroup_dir(&id));
    }
    let status = dovectl(&daemon.socket, &["status"]).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("80.0ms/100.0ms")),
        "{status}"
    );

    // (c) docker rm -f: the poststop hook unregisters it; the bill keeps its traffic.
    dockerd.docker(&["rm", "-f", &id]).unwrap();
    daemon.wait_for("docker rm -f to unregister", Duration::from_secs(10), |l| {
        !l.iter().any(|c| c.registration.id == id)
    });
    let hook_said = format!("unregistered id={id}");
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .log_text()
            .contains(&hook_said)
            .then_some(()))
        .is_some(),
        "the poststop hook never reached doved:\n{}",
        daemon.log_text()
    );
    let Reply::Bills { bills } = daemon.client().call(Request::Bills).unwrap() else {
        panic!("bills");
    };
    let bill = bills.iter().find(|b| b.id == id).expect("a bill for it");
    assert!(bill.rx_packets >= c.rx_packets, "{bill:?}");
}

/// `docker update --cpus` on a container started without a quota: doved's cpumax takes
/// the quota up once docker sets it (it looks again every second for containers it found
/// no quota for at registration).
#[test]
fn a_quota_set_after_registration_is_enforced() {
    if !require_root("a_quota_set_after_registration_is_enforced") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::with_observer_config("", "cpumax").unwrap();
    let dockerd = Dockerd::start(serde_json::json!({})).unwrap();
    install_runtime(&daemon, &dockerd, &[]);
    dockerd.import_busybox(IMAGE).unwrap();
    let id = dockerd
        .docker(&[
            "run",
            "-d",
            "--runtime",
            "dove",
            "--network",
            "none",
            IMAGE,
            "sleep",
            "1000",
        ])
        .unwrap()
        .trim()
        .to_owned();
    assert!(daemon.find(&id).is_some());
    assert!(quota_state(&daemon, &id).is_none(), "no quota yet");
    dockerd.docker(&["update", "--cpus", "0.5", &id]).unwrap();
    let state = eventually(Duration::from_secs(5), || {
        quota_state(&daemon, &id).filter(|q| q.base_quota_us == 50_000)
    });
    assert!(
        state.is_some(),
        "a quota set after registration is not seen: {:?}",
        quota_state(&daemon, &id)
    );
}

/// The package's removal path with a real dockerd: dove-runtime as `default-runtime`
/// (every container registered), then `dovectl docker remove-runtime --reload` (what
/// prerm runs) and the binary removed: the operator's default before DOVE is back,
/// `docker run` with no --runtime still works on it with nothing of DOVE called, a
/// container created under DOVE starts again, one that was running then stops as usual,
/// and every other daemon.json setting is kept. Then once more with nothing written
/// down: runc becomes the default.
#[test]
fn package_removal_path_leaves_docker_run_working() {
    if !require_root("package_removal_path_leaves_docker_run_working") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::start().unwrap();
    // The operator's own default before DOVE: the removal gives it back.
    let mut dockerd = Dockerd::start(serde_json::json!({
        "log-opts": {"max-size": "10m"},
        "labels": ["dove.test=yes"],
        "runtimes": {"plain": {"path": "/usr/sbin/runc"}},
        "default-runtime": "plain",
    }))
    .unwrap();
    let memo = dockerd.dir.path().join("default-runtime-memo.json");
    let memo_arg = memo.display().to_string();
    dockerd.import_busybox(IMAGE).unwrap();
    // The packaged binaries, which the removal takes away.
    let packaged = dockerd.dir.path().join("usr-bin/dove-runtime");
    let packaged_hook = dockerd.dir.path().join("usr-bin/dove-hook");
    std::fs::create_dir_all(packaged.parent().unwrap()).unwrap();
    std::fs::copy(bin("dove-runtime"), &packaged).unwrap();
    std::fs::copy(bin("dove-hook"), &packaged_hook).unwrap();
    let packaged_arg = packaged.display().to_string();
    install_runtime(
        &daemon,
        &dockerd,
        &[
            "--default",
            "--path",
            &packaged_arg,
            "--hook",
            &packaged_hook.display().to_string(),
            "--memo",
            &memo_arg,
        ],
    );
    assert!(memo.exists(), "the replaced default is written down");
    let default = |dockerd: &Dockerd| {
        dockerd
            .docker(&["info", "--format", "{{.DefaultRuntime}}"])
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(default(&dockerd), "dove");

    // Every container now goes through DOVE.
    let before = dockerd
        .docker(&["run", "-d", "--network", "none", IMAGE, "sleep", "1000"])
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        daemon.find(&before).is_some(),
        "the default runtime did not register {before}"
    );
    dockerd.docker(&["stop", "-t", "1", &before]).unwrap();
    daemon.wait_for("stop to unregister", Duration::from_secs(10), |l| {
        l.is_empty()
    });

    // One still running when the package goes.
    let running = dockerd
        .docker(&["run", "-d", "--network", "none", IMAGE, "sleep", "1000"])
        .unwrap()
        .trim()
        .to_owned();
    assert!(daemon.find(&running).is_some());

    // The failure the removal must prevent: the binary gone, daemon.json untouched.
    let hidden = packaged.with_extension("hidden");
    std::fs::rename(&packaged, &hidden).unwrap();
    let broken = dockerd
        .docker_output(&["run", "--rm", "--network", "none", IMAGE, "true"])
        .unwrap();
    assert!(
        !broken.status.success() && String::from_utf8_lossy(&broken.stderr).contains(&packaged_arg),
        "with dove-runtime gone and still the default, docker run should fail naming it: {}",
        String::from_utf8_lossy(&broken.stderr)
    );
    std::fs::rename(&hidden, &packaged).unwrap();

    // prerm: take DOVE out and reload dockerd; then the package's files go.
    let out = remove_runtime(
        &daemon,
        &dockerd,
        &["--path", &packaged_arg, "--memo", &memo_arg],
    );
    eprintln!("remove-runtime said:\n{out}");
    assert!(out.contains("sent SIGHUP to dockerd"), "{out}");
    std::fs::remove_file(&packaged).unwrap();
    std::fs::remove_file(&packaged_hook).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&dockerd.config).unwrap()).unwrap();
    assert_eq!(config["log-opts"]["max-size"], "10m", "{config}");
    assert_eq!(config["labels"][0], "dove.test=yes", "{config}");
    assert!(config["deprecated-key-path"].is_string(), "{config}");
    assert_eq!(config["default-runtime"], "plain", "{config}");
    assert_eq!(
        config["runtimes"]["dove"],
        serde_json::json!({"path": "/usr/sbin/runc", "runtimeArgs": ["--log-format=json"]})
    );
    assert!(dockerd.running(), "dockerd died at the reload");
    assert_eq!(default(&dockerd), "plain");
    assert!(!memo.exists(), "the memo goes once used");

    // The container that ran through dove-runtime stops as it would have: its shim
    // runs the runtime through dockerd's script for "dove", which now runs runc.
    let started = Instant::now();
    dockerd.docker(&["stop", "-t", "1", &running]).unwrap();
    let stop_took = started.elapsed();
    eprintln!("docker stop of a container started under DOVE, after the removal: {stop_took:?}");
    assert!(
        stop_took < Duration::from_secs(8),
        "docker stop took {stop_took:?}: the shim could not run the runtime\n{}",
        dockerd.log_tail(10)
    );
    assert!(
        eventually(Duration::from_secs(5), || (!shim_running(&running))
            .then_some(()))
        .is_some(),
        "the shim of {running} outlived its container"
    );
    daemon.wait_for(
        "the stopped container to go",
        Duration::from_secs(10),
        |l| l.is_empty(),
    );
    let log_mark = daemon.log_text().len();

    // docker run with no --runtime works, on the default before DOVE (runc under another
    // name), with nothing of DOVE called.
    let started = Instant::now();
    let out = dockerd
        .docker(&[
            "run",
            "--rm",
            "--network",
            "none",
            IMAGE,
            "echo",
            "still runs",
        ])
        .unwrap();
    eprintln!("docker run after the removal: {:?}", started.elapsed());
    assert_eq!(out.trim(), "still runs");
    let after = dockerd
        .docker(&["run", "-d", "--network", "none", IMAGE, "sleep", "1000"])
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(
        dockerd.inspect(&after, "{{.HostConfig.Runtime}}").unwrap(),
        "plain"
    );
    // The container created under DOVE starts again (its runtime name still resolves).
    dockerd.docker(&["start", &before]).unwrap();
    assert_eq!(
        dockerd.inspect(&before, "{{.State.Running}}").unwrap(),
        "true"
    );
    assert!(
        daemon.list().is_empty(),
        "DOVE was called after its removal: {:?}",
        daemon.list()
    );
    let since = daemon.log_text()[log_mark..].to_owned();
    assert!(
        !since.contains(" registered id="),
        "doved registered containers after the removal:\n{since}"
    );
    dockerd
        .docker(&["rm", "-f", &before, &after, &running])
        .unwrap();
    assert!(daemon.list().is_empty());

    // Installed again, and the memo lost: the removal writes out runc, which dockerd
    // takes at the reload.
    install_runtime(&daemon, &dockerd, &["--default", "--memo", &memo_arg]);
    assert_eq!(default(&dockerd), "dove");
    std::fs::remove_file(&memo).unwrap();
    let out = remove_runtime(&daemon, &dockerd, &["--memo", &memo_arg]);
    assert!(out.contains("set to \"runc\""), "{out}");
    assert_eq!(default(&dockerd), "runc");
    let out = dockerd
        .docker(&["run", "--rm", "--network", "none", IMAGE, "echo", "on runc"])
        .unwrap();
    assert_eq!(out.trim(), "on runc");
}

/// How long `docker run` takes through DOVE and straight on runc, interleaved in one
/// dockerd (printed; the wrapper and hook must not add more than a second).
#[test]
fn docker_run_latency_with_and_without_dove() {
    if !require_root("docker_run_latency_with_and_without_dove") {
        return;
    }
    let _serial = serial();
    let daemon = TempDaemon::start().unwrap();
    let dockerd = Dockerd::start(serde_json::json!({})).unwrap();
    install_runtime(&daemon, &dockerd, &[]);
    dockerd.import_busybox(IMAGE).unwrap();
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..12 {
        let runtime = ["dove", "runc"][round % 2];
        let started = Instant::now();
        dockerd
            .docker(&[
                "run",
                "--rm",
                "--runtime",
                runtime,
                "--network",
                "none",
                IMAGE,
                "true",
            ])
            .unwrap();
        // The first of each warms caches (image layers, the shim binary).
        if round >= 2 {
            times[round % 2].push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &Vec<f64>| format!("{:.0}-{:.0} ms", v[0], v[v.len() - 1]);
    let (dove, runc) = (median(&mut times[0]), median(&mut times[1]));
    eprintln!(
        "dockerd up in {:?}; docker run --rm (create, start, wait, remove), median of 5: dove {dove:.0} ms ({}), runc {runc:.0} ms ({}), ratio {:.2}",
        dockerd.started_in,
        spread(&times[0]),
        spread(&times[1]),
        dove / runc
    );
    assert!(
        dove < runc + 1000.0,
        "dove {dove:.0} ms vs runc {runc:.0} ms"
    );
    assert!(daemon.list().is_empty(), "every container was removed");
    assert!(Path::new(&dockerd.config).exists());
}
