//! Bounded traffic for DOVE's observer tests and benchmarks. Each mode runs in whatever
//! network namespace and cgroup it is started in (the tests place it).
//!
//!   dove-traffic udp-sink ADDR SECONDS [FILTER]   receive-only UDP server; prints datagrams.
//!                                                 With FILTER, an 8 MiB receive buffer (no
//!                                                 drops), serving until SECONDS are up, and
//!                                                 a classic BPF socket filter of
//!                                                 FILTER packet loads that accepts everything:
//!                                                 per-datagram softirq work after the socket
//!                                                 hook, as a costly protocol would add
//!   dove-traffic udp-send-mix ROUNDS ADDR:N:SIZE.. ROUNDS rounds, each sending N datagrams
//!                                                 of SIZE bytes to each ADDR in turn
//!   dove-traffic udp-send ADDR COUNT SIZE         send COUNT datagrams of SIZE bytes
//!   dove-traffic tcp-sink ADDR SECONDS            accept one stream, drain it; prints bytes
//!   dove-traffic tcp-send ADDR BYTES              connect and send BYTES
//!   dove-traffic udp-flood ADDR SECONDS SIZE      send unpaced for SECONDS; prints datagrams sent
//!   dove-traffic udp-pace ADDR RATE SECONDS SIZE  send RATE datagrams/s for SECONDS
//!   dove-traffic udp-stream ADDR RATE_FILE SIZE   send at the rate (kbit/s of payload) in
//!                                                 RATE_FILE, re-read every 100 ms, until
//!                                                 SIGINT/SIGTERM; prints what it sent
//!   dove-traffic udp-drain ADDR                   receive and discard until killed
//!
//! Sinks print `ready` once bound, and their count when the peer is done or time is up.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// A paced stream whose rate a script changes while it runs, so measuring its cost and
/// correcting its rate never needs a new stream (a restart waits on the receiver).
fn udp_stream(to: SocketAddr, rate_file: &str, size: usize) {
    let stop = SigAction::new(
        SigHandler::Handler(request_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &stop) }.expect("installing the stop handler");
    }
    let read_rate =
        || -> Option<u64> { std::fs::read_to_string(rate_file).ok()?.trim().parse().ok() };
    let Some(mut kbit) = read_rate() else {
        eprintln!("udp-stream: {rate_file} does not hold a rate in kbit/s");
        std::process::exit(2)
    };
    let sock = udp_sender(to);
    sock.connect(to).unwrap();
    let payload = vec![0x5au8; size];
    let bits = (size * 8) as f64;
    let start = Instant::now();
    let (mut total, mut segment_start, mut segment_sent) = (0u64, start, 0u64);
    let mut last_read = start;
    while !STOP.load(Ordering::Relaxed) {
        if last_read.elapsed() >= Duration::from_millis(100) {
            last_read = Instant::now();
            if let Some(new) = read_rate().filter(|&new| new != kbit) {
                kbit = new;
                segment_start = last_read;
                segment_sent = 0;
            }
        }
        // Catch up with what the rate allows so far, but never with more than 20 ms of it
        // at once (a sender descheduled for a while must not turn into a burst).
        let elapsed = segment_start.elapsed().as_secs_f64();
        let due = (elapsed * kbit as f64 * 1000.0 / bits) as u64;
        let floor = due.saturating_sub((0.02 * kbit as f64 * 1000.0 / bits).ceil() as u64);
        segment_sent = segment_sent.max(floor);
        while segment_sent < due {
            if sock.send(&payload).is_ok() {
                total += 1;
            }
            segment_sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "datagrams={total} seconds={secs:.1} mean_kbit={:.0} last_kbit={kbit}",
        total as f64 * bits / secs / 1000.0
    );
}

/// An 8 MiB receive buffer and a classic BPF filter of `loads` packet loads that accepts
/// every datagram: the kernel runs it in softirq for each datagram, after the cgroup
/// ingress hook.
fn costly_receiver(sock: &UdpSocket, loads: u16) {
    let fd = sock.as_raw_fd();
    let size: libc::c_int = 8 << 20;
    let mut program: Vec<libc::sock_filter> = (0..loads)
        .map(|_| libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        })
        .collect();
    program.push(libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: u32::MAX,
    });
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: valid fd, option values that outlive the calls.
    unsafe {
        let set = |opt, value: *const libc::c_void, len: usize| {
            let rc = libc::setsockopt(fd, libc::SOL_SOCKET, opt, value, len as libc::socklen_t);
            assert_eq!(
                rc,
                0,
                "setsockopt {opt}: {}",
                std::io::Error::last_os_error()
            );
        };
        set(
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>(),
        );
        if loads > 0 {
            set(
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>(),
            );
        }
    }
}

/// An unbound-port UDP socket of `to`'s address family.
fn udp_sender(to: SocketAddr) -> UdpSocket {
    let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    UdpSocket::bind(any).expect("binding a UDP socket")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("usage: see the module doc of tests/traffic/src/main.rs");
            std::process::exit(2)
        })
    };
    if arg(0) == "udp-send-mix" {
        let rounds: u64 = arg(1).parse().unwrap();
        let targets: Vec<(SocketAddr, u64, Vec<u8>)> = args[2..]
            .iter()
            .map(|t| {
                let mut parts = t.rsplitn(3, ':');
                let size: usize = parts.next().and_then(|p| p.parse().ok()).expect("SIZE");
                let n: u64 = parts.next().and_then(|p| p.parse().ok()).expect("N");
                let addr = parts.next().and_then(|p| p.parse().ok()).expect("ADDR");
                (addr, n, vec![0x5au8; size])
            })
            .collect();
        let sock = udp_sender(targets[0].0);
        let mut sent = 0u64;
        for _ in 0..rounds {
            for (to, n, payload) in &targets {
                for _ in 0..*n {
                    let _ = sock.send_to(payload, to);
                    sent += 1;
                    if sent.is_multiple_of(64) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
        }
        println!("{sent}");
        return;
    }
    let addr: SocketAddr = arg(1).parse().expect("ADDR is ip:port or [ip6]:port");
    match arg(0) {
        "udp-stream" => udp_stream(addr, arg(2), arg(3).parse().expect("SIZE in bytes")),
        "udp-drain" => {
            let sock = UdpSocket::bind(addr).expect("bind");
            let mut buf = [0u8; 65536];
            loop {
                let _ = sock.recv(&mut buf);
            }
        }
        "udp-sink" => {
            let secs: u64 = arg(2).parse().unwrap();
            let sock = UdpSocket::bind(addr).expect("bind");
            // With FILTER the sink serves until its time is up: the test reads drops from
            // the kernel (/proc/net/udp) and stops it.
            let until_deadline = args.get(3).is_some();
            if let Some(loads) = args.get(3) {
                costly_receiver(&sock, loads.parse().expect("FILTER is a count of loads"));
            }
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
                    Err(_)
                        if !until_deadline
                            && n > 0
                            && last.elapsed() > Duration::from_millis(400) =>
                    {
                        break
                    }
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
        "udp-pace" => {
            let rate: u64 = arg(2).parse().unwrap();
            let secs: f64 = arg(3).parse().unwrap();
            let size: usize = arg(4).parse().unwrap();
            let sock = udp_sender(addr);
            sock.connect(addr).unwrap();
            let payload = vec![0x5au8; size];
            let start = Instant::now();
            let mut sent = 0u64;
            // Catch up every millisecond with what the rate allows so far.
            while start.elapsed().as_secs_f64() < secs {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                while sent < due {
                    let _ = sock.send(&payload);
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            println!("{sent}");
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
