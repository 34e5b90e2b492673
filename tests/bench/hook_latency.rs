//! Benchmark: dove-hook end-to-end latency and doved registration throughput.
//!
//! Prints numbers; asserts nothing. Run as root after a release build:
//!     cargo build --release --workspace --bins && cargo bench -p dove-tests --bench hook_latency
//! Each figure comes with a baseline measured in the same run (spawning `/bin/true`;
//! `status` requests that skip the registry write; a registry of 10 containers against
//! one of 10,000), so the ratio is what to compare.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dove_proto::{Client, Reply, Request};
use dove_tests::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Prints the samples' p50, p99 and max; returns (p50, p99).
fn summary(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    println!(
        "{name:<44} n={:<5} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
    );
    (p50, p99)
}

fn spawn_latency(program: &std::path::Path, args: &[&str], stdin: &[u8]) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("DOVE_LOG_STDERR", "1")
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin);
    assert!(child.wait().unwrap().success());
    start.elapsed()
}

fn hook_latency(daemon: &TempDaemon) {
    let cgroup = TestCgroup::new("dove-bench-hook").unwrap();
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec sleep 600",
        cgroup.dir.display()
    );
    let mut parked = Command::new("sh").args(["-c", &script]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let bundle = tempfile::tempdir().unwrap();
    let state = state_json("bench", Some(parked.id()), bundle.path());
    let hook = bin("dove-hook");
    // The static, non-PIE build that installs and packages ship (scripts/build-release.sh).
    let static_hook = hook
        .parent()
        .and_then(std::path::Path::parent)
        .map(|target| {
            target
                .join(env!("DOVE_TARGET_TRIPLE"))
                .join("release/dove-hook")
        })
        .filter(|p| p.exists());
    let socket = daemon.socket.display().to_string();
    let args = [
        "--socket",
        socket.as_str(),
        "--fail-closed",
        "createRuntime",
    ];
    // Warm the page cache and the daemon.
    for _ in 0..20 {
        spawn_latency(&hook, &args, &state);
        if let Some(s) = &static_hook {
            spawn_latency(s, &args, &state);
        }
    }
    let (mut base, mut dynamic, mut fixed) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so machine noise hits all alike.
    for _ in 0..1000 {
        base.push(spawn_latency(std::path::Path::new("/bin/true"), &[], b""));
        dynamic.push(spawn_latency(&hook, &args, &state));
        if let Some(s) = &static_hook {
            fixed.push(spawn_latency(s, &args, &state));
        }
    }
    println!("hook end-to-end latency (1,000 real invocations, process start included):");
    let (b50, b99) = summary("  baseline: spawn /bin/true", base);
    for (name, samples) in [
        ("  dove-hook createRuntime, dynamic PIE", dynamic),
        ("  dove-hook createRuntime, static (shipped)", fixed),
    ] {
        if samples.is_empty() {
            println!("{name}: not built (scripts/build-release.sh builds it)");
            continue;
        }
        let (t50, t99) = summary(name, samples);
        println!(
            "    p50 hook/true {:.2}, p99 over true {:+.2} ms",
            t50.as_secs_f64() / b50.as_secs_f64(),
            (t99.as_secs_f64() - b99.as_secs_f64()) * 1e3
        );
    }
    let _ = parked.kill();
    let _ = parked.wait();
}

fn throughput(daemon: &TempDaemon, clients: usize, window: Duration, register: bool) -> f64 {
    let parent = TestCgroup::new("dove-bench-tput").unwrap();
    let cgroups: Vec<TestCgroup> = (0..clients)
        .map(|i| parent.child(&format!("c{i}")).unwrap())
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = cgroups
        .iter()
        .enumerate()
        .map(|(i, cg)| {
            let reg = cg.registration(&format!("tput-{i}"));
            let socket = daemon.socket.clone();
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // One connection per request, as each hook process makes.
                    let mut client = Client::connect(&socket, Duration::from_secs(5)).unwrap();
                    let request = if register {
                        Request::Register {
                            container: reg.clone(),
                        }
                    } else {
                        Request::Status
                    };
                    match client.call(request).unwrap() {
                        Reply::Registered { .. } | Reply::Status(_) => {}
                        other => panic!("{other:?}"),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    n as f64 / window.as_secs_f64()
}

/// Latency of one registration (connect, request, acknowledgement) on a daemon that holds
/// `small` containers against one that holds `large`, interleaved.
fn registration_latency_by_registry_size(small: usize, large: usize) {
    let daemons: Vec<(usize, TempDaemon, TestCgroup)> = [small, large]
        .into_iter()
        .map(|n| {
            let daemon = TempDaemon::start().unwrap();
            let parent = TestCgroup::new("dove-bench-size").unwrap();
            for i in 0..n {
                let cg = parent.child(&format!("c{i}")).unwrap();
                daemon.register(&cg, &format!("held-{i}"));
                // The directory stays; the guard only removes it at drop.
                std::mem::forget(cg);
            }
            (n, daemon, parent)
        })
        .collect();
    let probes: Vec<Vec<TestCgroup>> = daemons
        .iter()
        .map(|(_, _, parent)| {
            (0..20)
                .map(|i| parent.child(&format!("probe{i}")).unwrap())
                .collect()
        })
        .collect();
    let mut samples = vec![Vec::new(), Vec::new()];
    for round in 0..1000 {
        for (k, (_, daemon, _)) in daemons.iter().enumerate() {
            let reg = probes[k][round % 20].registration(&format!("probe-{}", round % 20));
            let start = Instant::now();
            let mut client = Client::connect(&daemon.socket, Duration::from_secs(5)).unwrap();
            match client.call(Request::Register { container: reg }).unwrap() {
                Reply::Registered { .. } => {}
                other => panic!("{other:?}"),
            }
            samples[k].push(start.elapsed());
        }
    }
    println!("registration latency by registry size (1,000 each, interleaved):");
    let (s, _) = summary(
        &format!("  {small} containers registered"),
        samples.remove(0),
    );
    let (l, _) = summary(
        &format!("  {large} containers registered"),
        samples.remove(0),
    );
    println!(
        "  ratio p50 {large}/{small}: {:.2}",
        l.as_secs_f64() / s.as_secs_f64()
    );
    for (_, _, parent) in &daemons {
        let _ = remove_cgroup_tree(&parent.dir);
    }
}

fn main() {
    if !require_root("hook_latency bench") {
        return;
    }
    registration_latency_by_registry_size(10, 10_000);
    let daemon = TempDaemon::start().unwrap();
    hook_latency(&daemon);
    println!("registrations per second, 64 concurrent clients, 3 s windows (A B A B A B):");
    let (mut base, mut treat) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        base.push(throughput(&daemon, 64, Duration::from_secs(3), false));
        treat.push(throughput(&daemon, 64, Duration::from_secs(3), true));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (b, t) = (median(&mut base), median(&mut treat));
    println!("  baseline: status requests        median {b:>9.0}/s  runs {base:.0?}");
    println!("  register (journaled)             median {t:>9.0}/s  runs {treat:.0?}");
    println!("  ratio register/status: {:.2}", t / b);
}
