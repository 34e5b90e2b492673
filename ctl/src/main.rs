//! `dovectl`: the operator's view of doved, and Docker's registration of DOVE's runtime.

mod docker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use dove_proto::{Bill, Client, Container, Reply, Request, Stats, Status, DEFAULT_SOCKET};

#[derive(Debug, Parser)]
#[command(name = "dovectl", version, about = "Inspect the DOVE daemon (doved)")]
struct Args {
    /// doved's socket.
    #[arg(long, global = true, env = "DOVE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// How long to wait for doved, in milliseconds.
    #[arg(long, global = true, default_value_t = 5000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List registered containers.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the daemon's state: version, cgroup layout, enforcement mode, counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Softirq cost per container, the unattributed bucket and observer health.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Final bills of removed containers (kept for bills.retention_days), oldest first.
    Bills {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Live view of containers sorted by softirq CPU (refreshes until interrupted).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Refresh this many times and exit (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
    },
    /// Register dove-runtime with dockerd, or take it out again (daemon.json; no doved
    /// needed).
    #[command(subcommand)]
    Docker(DockerCommand),
}

#[derive(Debug, Subcommand)]
enum DockerCommand {
    /// Register dove-runtime in dockerd's daemon.json (as its default with --default).
    ///
    /// Every other setting is kept, in place. Containers use it with `docker run
    /// --runtime dove`, or all of them with --default; dockerd reads it at the next reload
    /// (--reload, or `systemctl reload docker`). The global --socket, when not the
    /// default, is passed on to the hook.
    InstallRuntime {
        /// dockerd's configuration file.
        #[arg(long, value_name = "PATH", default_value = docker::DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also make it `default-runtime`, so every container is registered.
        #[arg(long)]
        default: bool,
        /// dove-runtime's path [default: the one beside dovectl, else /usr/bin/dove-runtime].
        #[arg(long, value_name = "PATH")]
        path: Option<PathBuf>,
        /// The OCI runtime dove-runtime runs [default: the first runc on PATH].
        #[arg(long, value_name = "PATH")]
        inner_runtime: Option<PathBuf>,
        /// dove-hook's path [default: the one beside dovectl, else /usr/bin/dove-hook].
        #[arg(long, value_name = "PATH")]
        hook: Option<PathBuf>,
        /// The runtime's name in daemon.json.
        #[arg(long, default_value = docker::RUNTIME_NAME)]
        name: String,
        /// Where the default-runtime that --default replaces is written down, for
        /// remove-runtime to give back.
        #[arg(long, value_name = "PATH", default_value = docker::DEFAULT_MEMO)]
        memo: PathBuf,
        /// Reload dockerd when the file changed (see remove-runtime --reload).
        #[arg(long)]
        reload: bool,
        /// With --reload: SIGHUP the dockerd whose pid this file holds.
        #[arg(long, value_name = "PATH", requires = "reload")]
        pidfile: Option<PathBuf>,
    },
    /// Take DOVE out of dockerd's daemon.json (the packages run this when removed).
    ///
    /// Each runtime that runs dove-runtime (named `dove`, or with --path as its path)
    /// becomes an alias of the runtime it wrapped, with that runtime's own arguments
    /// (`--log-format=json` when there are none, so dockerd keeps the script the shims of
    /// running containers call), and a `default-runtime` naming one becomes the default
    /// install-runtime --default replaced, when daemon.json still has it, else "runc"
    /// (written out: dockerd's reload ignores a deleted key). Containers created with it
    /// still start and stop. Every other setting is kept; a file without DOVE is left untouched.
    RemoveRuntime {
        /// dockerd's configuration file.
        #[arg(long, value_name = "PATH", default_value = docker::DEFAULT_CONFIG)]
        config: PathBuf,
        /// The runtime's name in daemon.json.
        #[arg(long, default_value = docker::RUNTIME_NAME)]
        name: String,
        /// Runtimes whose path is this one go too, whatever their name.
        #[arg(long, value_name = "PATH", default_value = docker::PACKAGED_RUNTIME)]
        path: PathBuf,
        /// Delete those runtimes (and one named --name) instead of leaving aliases:
        /// containers created with them can no longer be started.
        #[arg(long)]
        delete: bool,
        /// Where install-runtime --default wrote down the default-runtime it replaced.
        #[arg(long, value_name = "PATH", default_value = docker::DEFAULT_MEMO)]
        memo: PathBuf,
        /// Reload dockerd when the file changed (runtimes and default-runtime are
        /// reloaded live): SIGHUP to the pid in --pidfile, else `systemctl reload
        /// docker.service` where it runs, else SIGHUP to the pid in /var/run/docker.pid.
        #[arg(long)]
        reload: bool,
        /// With --reload: SIGHUP the dockerd whose pid this file holds.
        #[arg(long, value_name = "PATH", requires = "reload")]
        pidfile: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dovectl: {}", dove_logging::describe(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn stats(client: &mut Client) -> Result<Stats> {
    match client.call(Request::Stats)? {
        Reply::Stats(s) => Ok(*s),
        _ => bail!("doved answered `stats` with something else"),
    }
}

fn run(args: &Args) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut client = match &args.command {
        // Editing daemon.json needs no doved.
        Command::Docker(command) => return run_docker(command, &args.socket),
        _ => Client::connect(&args.socket, timeout)?,
    };
    match &args.command {
        Command::Stats { json } => {
            let s = stats(&mut client)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_stats(&s, None);
            }
        }
        Command::Top {
            interval,
            iterations,
        } => {
            anyhow::ensure!(*interval >= 0.1, "--interval must be at least 0.1 seconds");
            let mut previous = stats(&mut client)?;
            let mut n = 0;
            loop {
                std::thread::sleep(Duration::from_secs_f64(*interval));
                // One connection per refresh: a restarted daemon is picked up again.
                let current = stats(&mut Client::connect(&args.socket, timeout)?)?;
                print!("\x1b[H\x1b[2J");
                print_stats(&current, Some((&previous, *interval)));
                previous = current;
                n += 1;
                if *iterations > 0 && n >= *iterations {
                    break;
                }
            }
        }
        Command::List { json } => {
            let Reply::List { containers } = client.call(Request::List)? else {
                bail!("doved answered `list` with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&containers)?);
            } else {
                print_table(&containers);
            }
        }
        Command::Bills { json } => {
            let Reply::Bills { bills } = client.call(Request::Bills)? else {
                bail!("doved answered `bills` with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&bills)?);
            } else {
                print_bills(&bills);
            }
        }
        Command::Docker(_) => {} // answered above, without doved
        Command::Status { json } => {
            let Reply::Status(status) = client.call(Request::Status)? else {
                bail!("doved answered `status` with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
                if status.enforcement == "cpumax" {
                    print_quotas(&stats(&mut client)?);
                }
            }
        }
    }
    Ok(())
}

fn run_docker(command: &DockerCommand, socket: &std::path::Path) -> Result<()> {
    let (outcome, reload, pidfile) = match command {
        DockerCommand::InstallRuntime {
            config,
            default,
            path,
            inner_runtime,
            hook,
            name,
            memo,
            reload,
            pidfile,
        } => {
            let entry = docker::RuntimeEntry {
                name: name.clone(),
                path: path.clone().unwrap_or_else(|| {
                    docker::beside_self("dove-runtime", docker::PACKAGED_RUNTIME)
                }),
                inner: match inner_runtime {
                    Some(p) => p.clone(),
                    None => docker::find_runc()?,
                },
                hook: hook
                    .clone()
                    .unwrap_or_else(|| docker::beside_self("dove-hook", docker::PACKAGED_HOOK)),
                socket: (socket != std::path::Path::new(DEFAULT_SOCKET)).then(|| socket.to_owned()),
            };
            docker::check_entry(&entry)?;
            (
                docker::install_runtime(config, &entry, *default, memo)?,
                reload,
                pidfile,
            )
        }
        DockerCommand::RemoveRuntime {
            config,
            name,
            path,
            delete,
            memo,
            reload,
            pidfile,
        } => (
            docker::remove_runtime(config, name, path, *delete, memo)?,
            reload,
            pidfile,
        ),
    };
    for note in &outcome.notes {
        println!("{note}");
    }
    if outcome.changed {
        if *reload {
            println!("{}", docker::reload_dockerd(pidfile.as_deref())?);
        } else {
            println!("reload dockerd for this to take effect (`systemctl reload docker`, or SIGHUP to dockerd)");
        }
    }
    Ok(())
}

fn print_table(containers: &[Container]) {
    let rows: Vec<[String; 6]> = containers
        .iter()
        .map(|c| {
            let r = &c.registration;
            [
                r.id.clone(),
                r.cgroup_id.to_string(),
                r.pid.map_or("-".into(), |p| p.to_string()),
                r.runtime.clone().unwrap_or_else(|| "-".into()),
                c.registered_at.clone(),
                r.cgroup_path.clone(),
            ]
        })
        .collect();
    print_columns(
        ["ID", "CGROUP ID", "PID", "RUNTIME", "REGISTERED", "CGROUP"],
        &rows,
        &[],
    );
}

fn print_bills(bills: &[Bill]) {
    let seconds = |ns: u64| format!("{:.6}", ns as f64 / 1e9);
    let rows: Vec<[String; 8]> = bills
        .iter()
        .map(|b| {
            [
                b.id.clone(),
                b.registered_at.clone(),
                b.removed_at.clone(),
                b.reason.as_str().into(),
                seconds(b.rx_ns),
                seconds(b.tx_ns),
                seconds(b.total_ns),
                b.cgroup_path.clone(),
            ]
        })
        .collect();
    print_columns(
        [
            "ID",
            "REGISTERED",
            "REMOVED",
            "REASON",
            "RX s",
            "TX s",
            "SOFTIRQ s",
            "CGROUP",
        ],
        &rows,
        &[4, 5, 6],
    );
}

/// Print aligned columns; the last column is not padded, `right` columns are
/// right-aligned (numbers).
fn print_columns<const N: usize>(header: [&str; N], rows: &[[String; N]], right: &[usize]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else if right.contains(&i) {
                out.push_str(&format!("{cell:>w$}  "));
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for row in rows {
        line(std::array::from_fn(|i| row[i].as_str()));
    }
}

fn print_status(s: &Status) {
    println!(
        "doved {} (protocol {}), pid {}, up {}s",
        s.daemon_version, s.protocol_version, s.pid, s.uptime_seconds
    );
    println!("socket:        {}", s.socket);
    println!("state dir:     {}", s.state_dir);
    println!("containers:    {}", s.containers);
    println!(
        "cgroup layout: {} (cgroup2 at {})",
        s.cgroup_layout, s.cgroup2_mount
    );
    println!(
        "cpu controller: {}",
        s.cpu_controller_mount.as_deref().unwrap_or("not mounted")
    );
    println!("enforcement:   {}", s.enforcement);
    if s.enforcement == "cpumax" && s.irq_time_accounting_state != "active" {
        println!(
            "  note: without IRQ time accounting the task a softirq interrupted was billed for it too; cpumax deducts the cost from the owner's quota but cannot credit that task (when it is the owner's own, the owner pays twice)"
        );
    }
    println!("observer:      {}", s.observer);
    let irq_time = match s.irq_time_accounting_state.as_str() {
        "active" => "active (softirq time is not billed to the interrupted task)",
        "unconfirmed" => "built, not confirmed running (no IRQ time in /proc/pressure/irq yet)",
        "disabled-at-boot" => {
            "disabled at boot (tsc=noirqtime): softirq time is billed to whichever task it interrupted"
        }
        "disabled-tsc-unstable" => {
            "switched off by the kernel (the TSC was found unstable): softirq time is billed to whichever task it interrupted"
        }
        "not-built" => "not built: softirq time is billed to whichever task it interrupted",
        "" if s.irq_time_accounting => "built (older doved: running state not reported)",
        "" => "not built (older doved)",
        _ => "unknown",
    };
    println!("irq time accounting: {irq_time}");
    println!(
        "dropped (cgroup vanished without poststop): {}",
        s.dropped_vanished
    );
    println!("registry write failures: {}", s.persist_failures);
}

/// Per container, the quota the cpu.max controller acts on (`stats --json` has it too).
fn print_quotas(s: &Stats) {
    let ms = |us: u64| format!("{:.1}ms", us as f64 / 1e3);
    let early_drop = |c: &dove_proto::ContainerStats| match &c.early_drop {
        None => "off".to_string(),
        Some(d) if d.limiting => format!(
            "dropping on {} ({} pkts)",
            d.interfaces.join(","),
            d.dropped_packets
        ),
        Some(d) => format!("armed ({} pkts)", d.dropped_packets),
    };
    let rows: Vec<[String; 7]> = s
        .containers
        .iter()
        .map(|c| match &c.quota {
            Some(q) => [
                c.id.clone(),
                format!("{}/{}", ms(q.base_quota_us), ms(q.period_us)),
                ms(q.effective_quota_us),
                ms(q.softirq_per_period_us),
                format!("{:.3}s", q.forgiven_ns as f64 / 1e9),
                early_drop(c),
                q.cgroup.clone(),
            ],
            None => [
                c.id.clone(),
                "no quota".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                early_drop(c),
                "left alone".into(),
            ],
        })
        .collect();
    println!();
    println!("cpumax: each tick a quota is lowered by its containers' softirq cost, never under its floor");
    print_columns(
        [
            "CONTAINER",
            "BASE/PERIOD",
            "EFFECTIVE",
            "SOFTIRQ/PERIOD",
            "FORGIVEN",
            "EARLY DROP",
            "QUOTA CGROUP",
        ],
        &rows,
        &[1, 2, 3, 4],
    );
}

/// A table of containers by softirq time; with `previous`, also the CPU share over the
/// interval (100% = one CPU busy in softirq for this container).
fn print_stats(s: &Stats, previous: Option<(&Stats, f64)>) {
    println!(
        "observer: {}   windows: {}   packets in softirq: {}   in process context: {}   to no socket: {}   slots: {}/{}",
        s.observer,
        s.health.windows,
        s.health.packets_in_window,
        s.health.packets_outside_window,
        s.health.packets_without_socket,
        s.health.slots_used,
        s.health.slots_capacity
    );
    let rate = |id: &str, total: u64| -> String {
        let Some((prev, secs)) = previous else {
            return "-".into();
        };
        let before = if id.is_empty() {
            Some(prev.unattributed.total_ns)
        } else {
            prev.containers
                .iter()
                .find(|c| c.id == id)
                .map(|c| c.cost.total_ns)
        };
        match before {
            Some(b) => format!(
                "{:.2}%",
                total.saturating_sub(b) as f64 / (secs * 1e9) * 100.0
            ),
            None => "-".into(),
        }
    };
    let mut rows: Vec<[String; 7]> = s
        .containers
        .iter()
        .map(|c| {
            [
                c.id.clone(),
                rate(&c.id, c.cost.total_ns),
                format!("{:.3}", c.cost.total_ns as f64 / 1e9),
                format!("{:.3}", c.cost.rx_ns as f64 / 1e9),
                format!("{:.3}", c.cost.tx_ns as f64 / 1e9),
                (c.cost.rx_packets + c.cost.tx_packets).to_string(),
                c.cgroup_path.clone(),
            ]
        })
        .collect();
    if previous.is_some() {
        let pct = |r: &[String; 7]| r[1].trim_end_matches('%').parse::<f64>().unwrap_or(0.0);
        rows.sort_by(|a, b| pct(b).total_cmp(&pct(a)));
    }
    let u = &s.unattributed;
    rows.push([
        "(unattributed)".into(),
        rate("", u.total_ns),
        format!("{:.3}", u.total_ns as f64 / 1e9),
        format!("{:.3}", u.rx_ns as f64 / 1e9),
        format!("{:.3}", u.tx_ns as f64 / 1e9),
        (u.rx_packets + u.tx_packets).to_string(),
        "-".into(),
    ]);
    print_columns(
        [
            "CONTAINER",
            "CPU",
            "SOFTIRQ s",
            "RX s",
            "TX s",
            "PACKETS",
            "CGROUP",
        ],
        &rows,
        &[1, 2, 3, 4, 5],
    );
}
