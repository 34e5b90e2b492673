//! The packages, the Docker runtime wrapper and the Kubernetes manifests, exercised the
//! way users meet them. The .deb and .rpm come from `packaging/build.sh` (scripts/test.sh
//! runs it first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dove_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn package(ext: &str) -> PathBuf {
    let out = repo().join("packaging/out");
    std::fs::read_dir(&out)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == ext))
        .unwrap_or_else(|| {
            panic!(
                "no .{ext} in {}: run packaging/build.sh first",
                out.display()
            )
        })
}

const INSTALLED: [&str; 10] = [
    "usr/bin/doved",
    "usr/bin/dovectl",
    "usr/bin/dove-hook",
    "usr/bin/dove-runtime",
    "etc/dove/doved.toml",
    "usr/share/containers/oci/hooks.d/dove.json",
    "lib/systemd/system/doved.service",
    "lib/systemd/system/doved.socket",
    "usr/share/doc/dove/README.md",
    "usr/share/doc/dove/docker-daemon.json",
];

/// Whether an ELF64 little-endian file is a fixed-address executable (ET_EXEC, not a
/// PIE) with no program interpreter (PT_INTERP): None if it is not such an ELF file.
fn static_executable(elf: &[u8]) -> Option<bool> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (e_type, phoff) = (u16_at(0x10)?, u64_at(0x20)? as usize);
    let (phentsize, phnum) = (u16_at(0x36)? as usize, u16_at(0x38)? as usize);
    let mut interp = false;
    for i in 0..phnum {
        let p_type = u32::from_le_bytes(
            elf.get(phoff + i * phentsize..)?
                .get(..4)?
                .try_into()
                .ok()?,
        );
        interp |= p_type == 3;
    }
    Some(e_type == 2 && !interp)
}

#[test]
fn deb_installs_into_fresh_debian_root_and_purges_cleanly() {
    if !require_root("deb_installs_into_fresh_debian_root_and_purges_cleanly") {
        return;
    }
    let deb = package("deb");
    let tarball = run(Command::new("bash").arg(repo().join("scripts/debian-root.sh"))).unwrap();
    let root = tempfile::Builder::new()
        .prefix("dove-debroot-")
        .tempdir()
        .unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(tarball.trim())
        .arg("-C")
        .arg(root.path()))
    .unwrap();
    std::fs::copy(&deb, root.path().join("tmp/dove.deb")).unwrap();
    let chroot = |args: &[&str]| run(Command::new("chroot").arg(root.path()).args(args));

    // No systemd runs in the chroot: the maintainer scripts must still succeed.
    chroot(&["dpkg", "-i", "/tmp/dove.deb"]).unwrap();
    for path in INSTALLED {
        assert!(root.path().join(path).exists(), "{path} not installed");
    }
    let conffiles =
        std::fs::read_to_string(root.path().join("var/lib/dpkg/info/dove.conffiles")).unwrap();
    assert!(conffiles.contains("/etc/dove/doved.toml"), "{conffiles}");
    let listed = chroot(&["dpkg", "-L", "dove"]).unwrap();
    assert!(listed.contains("/usr/bin/doved"));
    let help = chroot(&["/usr/bin/doved", "--help"]).unwrap();
    assert!(help.contains("--config"), "{help}");
    // Runtimes spawn these for every container: they ship static and non-PIE, so no
    // dynamic loader runs before main() (scripts/build-release.sh says why).
    for spawned in ["usr/bin/dove-hook", "usr/bin/dove-runtime"] {
        let elf = std::fs::read(root.path().join(spawned)).unwrap();
        assert_eq!(
            static_executable(&elf),
            Some(true),
            "{spawned} is not a static, non-PIE executable"
        );
    }
    let version = chroot(&["/usr/bin/dove-hook", "--version"]).unwrap();
    assert!(version.starts_with("dove-hook "), "{version}");

    // The unit as installed, checked by systemd's own verifier on this host (the
    // minimal root has no systemd), with ExecStart and ExecStopPost pointing into the
    // unpacked root.
    let unit_dir = tempfile::tempdir().unwrap();
    let unit =
        std::fs::read_to_string(root.path().join("lib/systemd/system/doved.service")).unwrap();
    let unit = unit.replace(
        "=/usr/bin/doved ",
        &format!("={}/usr/bin/doved ", root.path().display()),
    );
    std::fs::write(unit_dir.path().join("doved.service"), unit).unwrap();
    std::fs::copy(
        root.path().join("lib/systemd/system/doved.socket"),
        unit_dir.path().join("doved.socket"),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit_dir.path().join("doved.service"))
        .arg(unit_dir.path().join("doved.socket"))
        .output()
        .unwrap();
    let verify_err = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && verify_err.trim().is_empty(),
        "systemd-analyze verify: {verify_err}"
    );

    // The installed hook, called by a real runc.
    let daemon = TempDaemon::start().unwrap();
    let parent = TestCgroup::new("dove-test-deb").unwrap();
    let id = unique("deb");
    let cgroups_path = format!("{}/{id}", parent.path);
    let bundle = Bundle::new(
        &["sleep", "100"],
        &cgroups_path,
        &daemon.socket,
        &["createRuntime", "poststop"],
    )
    .unwrap();
    let installed_hook = root.path().join("usr/bin/dove-hook");
    let config = bundle.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &bin("dove-hook").display().to_string(),
        &installed_hook.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    let runc_root = tempfile::tempdir().unwrap();
    let runc = |args: &[&str]| {
        run(Command::new("runc")
            .arg("--root")
            .arg(runc_root.path())
            .args(args))
    };
    runc(&[
        "create",
        "--bundle",
        &bundle.path().display().to_string(),
        &id,
    ])
    .unwrap();
    let entry = daemon.find(&id).expect("registered by the installed hook");
    assert_eq!(entry.registration.cgroup_id, cgroup_id_of(&cgroups_path));
    runc(&["delete", "--force", &id]).unwrap();
    assert!(daemon.find(&id).is_none());

    // The admin registered dove-runtime with Docker as the packaged snippet shows, next
    // to settings of their own: removing the package takes it out again (prerm), the
    // rest stays, and default-runtime falls back to runc.
    std::fs::create_dir_all(root.path().join("etc/docker")).unwrap();
    let mut docker_config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.path().join("usr/share/doc/dove/docker-daemon.json")).unwrap(),
    )
    .unwrap();
    docker_config["log-driver"] = "journald".into();
    docker_config["runtimes"]["crun"] = serde_json::json!({"path": "/usr/bin/crun"});
    std::fs::write(
        root.path().join("etc/docker/daemon.json"),
        serde_json::to_vec_pretty(&docker_config).unwrap(),
    )
    .unwrap();
    let removal = chroot(&["dpkg", "--purge", "dove"]).unwrap();
    let docker_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.path().join("etc/docker/daemon.json")).unwrap())
            .unwrap();
    assert_eq!(
        docker_config,
        serde_json::json!({
            "runtimes": {
                "dove": {"path": "/usr/sbin/runc", "runtimeArgs": ["--log-format=json"]},
                "crun": {"path": "/usr/bin/crun"}
            },
            "default-runtime": "runc",
            "log-driver": "journald",
        }),
        "prerm left daemon.json so:\n{removal}"
    );
    for path in INSTALLED {
        assert!(!root.path().join(path).exists(), "{path} left after purge");
    }
    assert!(
        !root.path().join("etc/dove").exists(),
        "/etc/dove left after purge"
    );
}

#[test]
fn rpm_file_list_scripts_and_dependencies() {
    let rpm = package("rpm");
    let q = |args: &[&str]| run(Command::new("rpm").args(args).arg(&rpm)).unwrap();
    let files = q(&["-qlp"]);
    for path in INSTALLED {
        let want = format!("/{}", path.replace("lib/systemd", "usr/lib/systemd"));
        assert!(
            files.lines().any(|l| l == want),
            "{want} missing from:\n{files}"
        );
    }
    let config = q(&["-qcp"]);
    assert!(
        config.contains("/etc/dove/doved.toml"),
        "config files: {config}"
    );
    let scripts = q(&["-qp", "--scripts"]);
    assert!(
        scripts.contains("postinstall") && scripts.contains("systemctl enable doved.service"),
        "{scripts}"
    );
    assert!(
        scripts.contains("preuninstall") && scripts.contains("systemctl stop doved.service"),
        "{scripts}"
    );
    // Erasing takes dove-runtime out of dockerd's configuration (not on upgrade).
    assert!(
        scripts.contains("dovectl docker remove-runtime --config /etc/docker/daemon.json --reload"),
        "{scripts}"
    );
    let requires = q(&["-qp", "--requires"]);
    assert!(requires.contains("glibc"), "{requires}");
}

/// The removal scripts of both packages, run in a Debian root with this build's dovectl
/// as /usr/bin/dovectl: on removal (not on upgrade) they take dove-runtime out of
/// /etc/docker/daemon.json; a file dovectl cannot parse is reported and does not fail
/// the removal. (The .deb test runs the packaged prerm through dpkg; this one needs no
/// release build.)
#[test]
fn removal_scripts_take_dove_runtime_out_of_docker_config() {
    if !require_root("removal_scripts_take_dove_runtime_out_of_docker_config") {
        return;
    }
    let tarball = run(Command::new("bash").arg(repo().join("scripts/debian-root.sh"))).unwrap();
    let root = tempfile::Builder::new()
        .prefix("dove-prerm-")
        .tempdir()
        .unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(tarball.trim())
        .arg("-C")
        .arg(root.path()))
    .unwrap();
    std::fs::copy(bin("dovectl"), root.path().join("usr/bin/dovectl")).unwrap();
    std::fs::copy(
        repo().join("packaging/debian/prerm"),
        root.path().join("tmp/prerm"),
    )
    .unwrap();
    std::fs::copy(
        repo().join("packaging/rpm/pre_uninstall.sh"),
        root.path().join("tmp/preun"),
    )
    .unwrap();
    std::fs::create_dir_all(root.path().join("etc/docker")).unwrap();
    let config = root.path().join("etc/docker/daemon.json");
    let mut registered: serde_json::Value =
        serde_json::from_str(include_str!("../../config/docker/daemon.json")).unwrap();
    registered["storage-driver"] = "overlay2".into();
    let registered = serde_json::to_string_pretty(&registered).unwrap();
    let removed = serde_json::json!({
        "runtimes": {"dove": {"path": "/usr/sbin/runc", "runtimeArgs": ["--log-format=json"]}},
        "default-runtime": "runc",
        "storage-driver": "overlay2",
    });
    let script = |name: &str, arg: &str| {
        Command::new("chroot")
            .arg(root.path())
            .args(["sh", &format!("/tmp/{name}"), arg])
            .output()
            .unwrap()
    };
    for (name, upgrade, remove) in [("prerm", "upgrade", "remove"), ("preun", "1", "0")] {
        std::fs::write(&config, &registered).unwrap();
        let out = script(name, upgrade);
        assert!(out.status.success(), "{name} {upgrade}: {out:?}");
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            registered,
            "{name} {upgrade} must leave daemon.json alone"
        );
        let out = script(name, remove);
        assert!(out.status.success(), "{name} {remove}: {out:?}");
        let now: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
        assert_eq!(now, removed, "{name} {remove}: {out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("dockerd is not running"), "{said}");
        // A broken file: reported, left as it was, and the removal goes on.
        std::fs::write(&config, "{\"runtimes\": {\"dove\": ").unwrap();
        let out = script(name, remove);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{name} {remove} on a broken file: {err}"
        );
        assert!(
            err.contains("/etc/docker/daemon.json") && err.contains("by hand"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            "{\"runtimes\": {\"dove\": "
        );
    }
}

#[test]
fn podman_registers_with_the_packaged_hooks_d_file() {
    if !require_root("podman_registers_with_the_packaged_hooks_d_file") {
        return;
    }
    let deb = package("deb");
    let extracted = tempfile::Builder::new()
        .prefix("dove-deb-x-")
        .tempdir()
        .unwrap();
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(extracted.path()))
    .unwrap();
    let packaged = std::fs::read_to_string(
        extracted
            .path()
            .join("usr/share/containers/oci/hooks.d/dove.json"),
    )
    .unwrap();
    assert!(packaged.contains("\"/usr/bin/dove-hook\""));
    let work = tempfile::Builder::new()
        .prefix("dove-podman-pkg-")
        .tempdir()
        .unwrap();
    let parent = TestCgroup::new("dove-test-podpkg").unwrap();
    let out = run(Command::new("bash")
        .arg(repo().join("tests/scripts/podman-packaged-hook.sh"))
        .arg(extracted.path())
        .arg(busybox_rootfs())
        .arg(work.path())
        .arg(&parent.path))
    .unwrap();
    let mut lines = out.lines();
    let during: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let after: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let entry = &during[0];
    assert_eq!(entry["stage"], "createRuntime", "{during}");
    let cgroup_path = entry["cgroup_path"].as_str().unwrap();
    assert!(cgroup_path.starts_with(&parent.path), "{entry}");
    // podman has removed the container's cgroup by now; its ID was checked by doved at
    // registration (it refuses an ID that is not the directory's inode).
    assert!(entry["cgroup_id"].as_u64().unwrap() > 0);
    assert_eq!(after, serde_json::json!([]), "unregistered at poststop");
}

#[test]
fn dove_runtime_wraps_runc_as_containerd_shim_drives_it() {
    if !require_root("dove_runtime_wraps_runc_as_containerd_shim_drives_it") {
        return;
    }
    let daemon = TempDaemon::start().unwrap();
    let parent = TestCgroup::new("dove-test-wrap").unwrap();
    let id = unique("wrapped");
    let cgroups_path = format!("{}/{id}", parent.path);
    // A bundle with no DOVE hooks: the wrapper adds them.
    let bundle = Bundle::new(&["sleep", "100"], &cgroups_path, &daemon.socket, &[]).unwrap();
    let state = tempfile::tempdir().unwrap();
    let hook = format!("--dove-hook={}", bin("dove-hook").display());
    let socket = format!("--dove-socket={}", daemon.socket.display());
    let log = state.path().join("log.json");
    let runtime = |args: &[&str]| {
        run(Command::new(bin("dove-runtime"))
            .args(["--dove-runtime=runc", &hook, &socket])
            .arg("--root")
            .arg(state.path())
            .arg("--log")
            .arg(&log)
            .args(["--log-format", "json"])
            .args(args))
    };
    let pid_file = bundle.path().join("init.pid");
    runtime(&[
        "create",
        "--bundle",
        &bundle.path().display().to_string(),
        "--pid-file",
        &pid_file.display().to_string(),
        &id,
    ])
    .unwrap();
    let entry = daemon
        .find(&id)
        .expect("registered through the wrapper's hook");
    assert_eq!(entry.registration.cgroup_id, cgroup_id_of(&cgroups_path));
    assert_eq!(
        entry.registration.pid.unwrap().to_string(),
        std::fs::read_to_string(&pid_file).unwrap().trim()
    );
    runtime(&["start", &id]).unwrap();
    let state_json = runtime(&["state", &id]).unwrap();
    assert!(state_json.contains("\"running\""), "{state_json}");
    runtime(&["kill", &id, "KILL"]).unwrap();
    // runc refuses to delete a container that has not stopped yet, and a signal is not
    // acted on when kill returns.
    let stopped_by = Instant::now() + Duration::from_secs(10);
    while !runtime(&["state", &id]).unwrap().contains("\"stopped\"") {
        assert!(Instant::now() < stopped_by, "{id} did not stop after KILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    runtime(&["delete", &id]).unwrap();
    assert!(daemon.find(&id).is_none(), "unregistered at poststop");

    // A failing inner runtime's exit code and stderr pass through unchanged.
    let failing = state.path().join("failing-runtime");
    std::fs::write(
        &failing,
        "#!/bin/sh\necho \"inner runtime says: $*\" >&2\nexit 42\n",
    )
    .unwrap();
    run(Command::new("chmod").arg("755").arg(&failing)).unwrap();
    let out = Command::new(bin("dove-runtime"))
        .arg(format!("--dove-runtime={}", failing.display()))
        .args(["--root", "/x", "start", "abc"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "inner runtime says: --root /x start abc\n"
    );
    // A missing inner runtime is named.
    let out = Command::new(bin("dove-runtime"))
        .args(["--dove-runtime=/nonexistent/runc", "state", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/runc"));
}

#[test]
fn kubernetes_manifests_are_well_formed() {
    use serde::Deserialize;
    let text =
        std::fs::read_to_string(repo().join("packaging/kubernetes/doved-daemonset.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).expect("valid YAML"))
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "ConfigMap", "DaemonSet", "Service"]);
    for d in &docs {
        assert!(
            d["apiVersion"].as_str().is_some() && d["metadata"]["name"].as_str().is_some(),
            "{d:?}"
        );
    }
    let ds = &docs[2];
    assert_eq!(ds["apiVersion"], "apps/v1");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        &ds["spec"]["selector"]["matchLabels"], labels,
        "selector matches the pod labels"
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    let doved = &pod["containers"][0];
    assert_eq!(doved["securityContext"]["privileged"], true);
    assert_eq!(doved["ports"][0]["name"], "metrics");
    let mounts: Vec<&str> = doved["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    for want in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/run/dove",
        "/var/lib/dove",
        "/etc/dove",
        // The runtime's NRI socket: containerd nodes register through it.
        "/var/run/nri",
    ] {
        assert!(mounts.contains(&want), "{want} not mounted: {mounts:?}");
    }
    let volumes: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for m in doved["volumeMounts"].as_sequence().unwrap() {
        assert!(
            volumes.contains(&m["name"].as_str().unwrap()),
            "volume {:?} undefined",
            m["name"]
        );
    }
    // The config the DaemonSet mounts is a valid doved config that serves metrics
    // beyond loopback (the pod's own network namespace).
    let config = docs[1]["data"]["doved.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("doved.toml"), config).unwrap();
    let out = Command::new(bin("doved"))
        .arg("--config")
        .arg(dir.path().join("doved.toml"))
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(config.contains("0.0.0.0:9477"));
    assert!(config.contains("socket = \"/var/run/nri/nri.sock\""));
    let svc = &docs[3];
    assert_eq!(&svc["spec"]["selector"], labels);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
}
