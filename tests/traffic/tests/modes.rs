//! dove-traffic's modes end to end on loopback. Also what makes `cargo test` build the
//! executable the other suites and the VM test bed run (`CARGO_BIN_EXE_*` exists only for
//! a package's own integration tests).

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::process::{Command, Stdio};

const TRAFFIC: &str = env!("CARGO_BIN_EXE_dove-traffic");

/// A loopback address with a port nothing listens on now.
fn free_port(udp: bool) -> String {
    let addr = if udp {
        UdpSocket::bind("127.0.0.1:0").unwrap().local_addr()
    } else {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr()
    };
    addr.unwrap().to_string()
}

/// Start sink `mode` on a free loopback port, wait for its `ready` line, and return its
/// address, the child and its stdout. The port is free when chosen but can be taken
/// before the sink binds it (a CI run lost one that way), so a sink that could not bind
/// is retried on another port.
fn sink(
    mode: &str,
    secs: &str,
) -> (
    String,
    std::process::Child,
    BufReader<std::process::ChildStdout>,
) {
    for _ in 0..5 {
        let addr = free_port(mode.starts_with("udp"));
        let mut child = Command::new(TRAFFIC)
            .args([mode, &addr, secs])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line.trim() == "ready" {
            return (addr, child, out);
        }
        let failed = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&failed.stderr);
        // The sink's `.expect("bind")` prints the io::Error's Debug form, kind included.
        assert!(
            stderr.contains("AddrInUse"),
            "{mode} on {addr} did not start: {stderr}"
        );
    }
    panic!("{mode}: five free ports were all taken before the sink could bind them");
}

fn last_number(child: std::process::Child, mut out: BufReader<std::process::ChildStdout>) -> u64 {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "sink exited with {}: {}",
        done.status,
        String::from_utf8_lossy(&done.stderr)
    );
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("sink printed {line:?}"))
}

/// Run a sender mode to its end.
fn send(args: &[&str]) {
    let status = Command::new(TRAFFIC).args(args).status().unwrap();
    assert!(status.success(), "{args:?} exited with {status}");
}

#[test]
fn a_tcp_stream_arrives_whole() {
    let (addr, child, out) = sink("tcp-sink", "20");
    send(&["tcp-send", &addr, "3000000"]);
    assert_eq!(last_number(child, out), 3_000_000);
}

#[test]
fn udp_datagrams_are_counted_by_the_sink() {
    let (addr, child, out) = sink("udp-sink", "20");
    // 100 datagrams of 100 bytes fit in the default receive buffer (rmem_default, 208 KiB)
    // even when the sink gets no CPU until the sender is done: on loopback none may drop.
    // (500 did drop, 122 of them, with the suites running beside it on two cores.)
    send(&["udp-send", &addr, "100", "100"]);
    assert_eq!(last_number(child, out), 100);
}

#[test]
fn a_missing_argument_exits_2_pointing_at_the_usage() {
    let out = Command::new(TRAFFIC).arg("udp-send").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tests/traffic/src/main.rs"), "{stderr}");
}
