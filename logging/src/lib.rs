//! Logging setup shared by `doved`, `dove-hook` and `dovectl`.
//!
//! Logs go to journald when the journal socket exists and accepts us, else to stderr.
//! Logging never fails a caller: a journal that cannot be reached falls back to stderr
//! (a hook that fails because logging failed would block container starts).

use std::path::Path;

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where logs should go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// journald when available, else stderr.
    Auto,
    Stderr,
}

/// Install the global subscriber. `default_level` applies unless `RUST_LOG` says otherwise.
/// `identifier` is the journald `SYSLOG_IDENTIFIER`.
pub fn init(identifier: &str, default_level: &str, target: Target) {
    let filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(default_level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    // DOVE_LOG_STDERR forces stderr, e.g. for a test that reads what a hook said.
    let forced_stderr = std::env::var_os("DOVE_LOG_STDERR").is_some();
    if target == Target::Auto && !forced_stderr && Path::new(JOURNAL_SOCKET).exists() {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald.with_syslog_identifier(identifier.to_owned());
            if tracing_subscriber::registry()
                .with(filter())
                .with(journald)
                .try_init()
                .is_ok()
            {
                return;
            }
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter())
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(false),
        )
        .try_init();
}

/// An error and its causes on one line, each cause once: messages that already quote
/// their cause (`reading /x: permission denied`) are not followed by it again.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("reading /x: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn each_cause_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        assert_eq!(
            describe(&Quoting { source: io() }),
            "reading /x: permission denied"
        );
        let wrapped = anyhow::Error::new(io()).context("starting");
        assert_eq!(describe(wrapped.as_ref()), "starting: permission denied");
    }
}
