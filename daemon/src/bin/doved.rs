//! `doved`: see the `doved` library crate.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use doved::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "doved",
    version,
    about = "DOVE daemon: registers containers' cgroups from dove-hook and serves dovectl",
    long_about = "DOVE daemon: registers containers' cgroups from dove-hook and serves dovectl.\n\n\
Runs with built-in defaults (see /usr/share/doc/dove/doved.toml); --config reads a TOML file, \
and --socket / --state-dir override it. Logs to journald under systemd, else to stderr."
)]
struct Args {
    /// TOML configuration file (unknown keys are rejected).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Unix socket to serve [default: from config, /run/dove/dove.sock].
    #[arg(long, env = "DOVE_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where the registry is kept [default: from config, /var/lib/dove].
    #[arg(long, value_name = "PATH")]
    state_dir: Option<PathBuf>,
    /// Print the built-in default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Check the configuration (--config, or the built-in one) and exit.
    #[arg(long)]
    check_config: bool,
    /// Put back every CFS quota the cpu.max controller lowered (from the ledger in the
    /// state directory) and exit. The unit runs it after doved stops, however it stopped.
    #[arg(long)]
    restore_quotas: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", doved::config::EXAMPLE);
        return ExitCode::SUCCESS;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = dove_logging::describe(e.as_ref());
            tracing::error!("{e}");
            eprintln!("doved: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            // Restoring quotas must not depend on a config that may be what broke.
            Err(e) if args.restore_quotas => {
                eprintln!(
                    "doved: {e}; restoring from the default (or --state-dir) state directory"
                );
                Config::default()
            }
            Err(e) => return Err(e.into()),
        },
        None => Config::default(),
    };
    if let Some(socket) = args.socket {
        anyhow::ensure!(
            socket.is_absolute(),
            "--socket {} must be an absolute path",
            socket.display()
        );
        config.daemon.socket = socket;
    }
    if let Some(dir) = args.state_dir {
        anyhow::ensure!(
            dir.is_absolute(),
            "--state-dir {} must be an absolute path",
            dir.display()
        );
        config.daemon.state_dir = dir;
    }
    if args.check_config {
        match &args.config {
            Some(path) => println!("{}: ok", path.display()),
            None => println!("built-in configuration: ok"),
        }
        return Ok(());
    }
    let under_systemd =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    dove_logging::init(
        "doved",
        &config.daemon.log_level,
        if under_systemd {
            dove_logging::Target::Auto
        } else {
            dove_logging::Target::Stderr
        },
    );
    if args.restore_quotas {
        let restored = doved::enforce::cpumax::restore_ledger(&config.daemon.state_dir)?;
        println!("{restored} CFS quota(s) restored");
        return Ok(());
    }
    doved::run(config)?;
    Ok(())
}
