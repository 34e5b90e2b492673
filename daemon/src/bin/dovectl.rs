//! `dovectl`: the operator's view of doved.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use dove_proto::{Client, Container, Reply, Request, Status, DEFAULT_SOCKET};

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dovectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let mut client = Client::connect(&args.socket, Duration::from_millis(args.timeout_ms))?;
    match &args.command {
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
        Command::Status { json } => {
            let Reply::Status(status) = client.call(Request::Status)? else {
                bail!("doved answered `status` with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
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
    let header = ["ID", "CGROUP ID", "PID", "RUNTIME", "REGISTERED", "CGROUP"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{out}");
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]].map(String::as_str));
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
    println!(
        "irq time accounting: {}",
        if s.irq_time_accounting {
            "yes (softirq time is not billed to the interrupted task)"
        } else {
            "no (softirq time is billed to whichever task it interrupted)"
        }
    );
    println!(
        "dropped (cgroup vanished without poststop): {}",
        s.dropped_vanished
    );
    println!("registry write failures: {}", s.persist_failures);
}
