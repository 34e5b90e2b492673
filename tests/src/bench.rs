//! What the flood benchmarks share: the kernel's own counters they read (a namespace's
//! UDP counters, the CPUs' busy time), the statistics they print, and a seeded shuffle
//! for interleaving variants.

use std::process::Command;

use crate::run;

/// The namespace's UDP `InDatagrams` and `InErrors` (buffer drops and the like).
pub fn udp_counters(ns: &str) -> (u64, u64) {
    let snmp =
        run(Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/snmp"])).unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let field = |name: &str| {
        let i = names.split_whitespace().position(|n| n == name).unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    };
    (field("InDatagrams"), field("InErrors"))
}

/// All CPUs' busy time so far, in ns (USER_HZ jiffies from /proc/stat).
pub fn busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq (steal is time a hypervisor gave to
    // someone else, not work done here)
    let busy: u64 = cpu.iter().take(7).sum::<u64>() - cpu[3] - cpu[4];
    busy * 10_000_000
}

/// Median and interquartile range.
pub fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.25), at(0.75))
}

/// xorshift64*: enough to shuffle an order, with a seed that can be given back.
pub struct Shuffle(pub u64);

impl Shuffle {
    /// Seeded from `SEED` when set (to repeat an order), else from the clock; the seed
    /// is returned so that the run can print it.
    pub fn from_env() -> (Self, u64) {
        // Never 0, from which xorshift never moves: every round would get one order.
        let seed = env_or(
            "SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        ) | 1;
        (Shuffle(seed), seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
    }
}

/// The environment variable `name` parsed, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
