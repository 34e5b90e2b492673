//! Bounded traffic for DOVE's observer tests and benchmarks. Each mode runs in whatever
//! network namespace and cgroup it is started in (the tests place it).
//!
//!   dove-traffic udp-sink ADDR SECONDS            receive-only UDP server; prints datagrams
//!   dove-traffic udp-send ADDR COUNT SIZE         send COUNT datagrams of SIZE bytes
//!   dove-traffic tcp-sink ADDR SECONDS            accept one stream, drain it; prints bytes
//!   dove-traffic tcp-send ADDR BYTES              connect and send BYTES
//!   dove-traffic udp-flood ADDR SECONDS SIZE      send unpaced for SECONDS; prints datagrams sent
//!
//! Sinks print `ready` once bound, and their count when the peer is done or time is up.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// An unbound-port UDP socket of `to`'s address family.
fn udp_sender(to: SocketAddr) -> UdpSocket {
    let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    UdpSocket::bind(any).expect("binding a UDP socket")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("usage: see the module doc of tests/src/bin/dove-traffic.rs");
            std::process::exit(2)
        })
    };
    let addr: SocketAddr = arg(1).parse().expect("ADDR is ip:port or [ip6]:port");
    match arg(0) {
        "udp-sink" => {
            let secs: u64 = arg(2).parse().unwrap();
            let sock = UdpSocket::bind(addr).expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            println!("ready");
            std::io::stdout().flush().unwrap();
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut buf = [0u8; 65536];
            let mut n = 0u64;
            let mut last = Instant::now();
            while Instant::now() < deadline {
                match sock.recv(&mut buf) {
                    Ok(_) => {
                        n += 1;
                        last = Instant::now();
                    }
                    // Quiet for a while after traffic: the sender is done.
                    Err(_) if n > 0 && last.elapsed() > Duration::from_millis(400) => break,
                    Err(_) => {}
                }
            }
            println!("{n}");
        }
        "udp-send" => {
            let count: u64 = arg(2).parse().unwrap();
            let size: usize = arg(3).parse().unwrap();
            let sock = udp_sender(addr);
            let payload = vec![0x5au8; size];
            for i in 0..count {
                // A full socket buffer on the far side drops; pace lightly so most arrive.
                let _ = sock.send_to(&payload, addr);
                if i % 64 == 63 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        "udp-flood" => {
            let secs: f64 = arg(2).parse().unwrap();
            let size: usize = arg(3).parse().unwrap();
            let sock = udp_sender(addr);
            sock.connect(addr).unwrap();
            let payload = vec![0x5au8; size];
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let mut sent = 0u64;
            while Instant::now() < deadline {
                for _ in 0..256 {
                    if sock.send(&payload).is_ok() {
                        sent += 1;
                    }
                }
            }
            println!("{sent}");
        }
        "tcp-sink" => {
            let secs: u64 = arg(2).parse().unwrap();
            let listener = TcpListener::bind(addr).expect("bind");
            println!("ready");
            std::io::stdout().flush().unwrap();
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut total = 0u64;
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => total += n as u64,
                            }
                        }
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            println!("{total}");
        }
        "tcp-send" => {
            let bytes: u64 = arg(2).parse().unwrap();
            let mut conn = TcpStream::connect(addr).expect("connect");
            let chunk = vec![0x5au8; 1 << 16];
            let mut sent = 0u64;
            while sent < bytes {
                let n = chunk.len().min((bytes - sent) as usize);
                conn.write_all(&chunk[..n]).unwrap();
                sent += n as u64;
            }
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
