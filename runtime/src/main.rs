//! `dove-runtime`: an OCI runtime wrapper for engines that do not read hooks.d (Docker).
//!
//! dockerd/containerd run it exactly as they would run runc. On `create` (and `run`) it
//! adds DOVE's hook to the bundle's `config.json` (createRuntime registers, poststop
//! unregisters), then replaces itself with the real runtime, unchanged argv, so exit
//! codes, stdio and signals are the real runtime's. It never blocks a container: if the
//! bundle cannot be edited, the reason is logged and the container starts unhooked.
//!
//! Options for the wrapper itself come first and are removed before the real runtime
//! sees the arguments (`runtimeArgs` in /etc/docker/daemon.json):
//!   --dove-runtime=PATH   the real runtime (default: runc, or $DOVE_INNER_RUNTIME)
//!   --dove-hook=PATH      dove-hook's path (default: /usr/bin/dove-hook)
//!   --dove-socket=PATH    doved's socket, passed to the hook (default: the hook's)

mod bundle;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use crate::bundle::{add_hooks, bundle_of};

struct Wrapper {
    inner: String,
    hook: PathBuf,
    socket: Option<String>,
    args: Vec<String>,
}

fn parse(argv: Vec<String>) -> Wrapper {
    let mut wrapper = Wrapper {
        inner: std::env::var("DOVE_INNER_RUNTIME").unwrap_or_else(|_| "runc".into()),
        hook: PathBuf::from("/usr/bin/dove-hook"),
        socket: None,
        args: Vec::new(),
    };
    let mut rest = argv.into_iter().peekable();
    while let Some(arg) = rest.peek() {
        if let Some(v) = arg.strip_prefix("--dove-runtime=") {
            wrapper.inner = v.to_owned();
        } else if let Some(v) = arg.strip_prefix("--dove-hook=") {
            wrapper.hook = PathBuf::from(v);
        } else if let Some(v) = arg.strip_prefix("--dove-socket=") {
            wrapper.socket = Some(v.to_owned());
        } else {
            break;
        }
        rest.next();
    }
    wrapper.args = rest.collect();
    wrapper
}

fn main() -> ExitCode {
    dove_logging::init("dove-runtime", "warn", dove_logging::Target::Auto);
    let wrapper = parse(std::env::args().skip(1).collect());
    if let Some(bundle) = bundle_of(&wrapper.args) {
        match add_hooks(&bundle, &wrapper.hook, wrapper.socket.as_deref()) {
            Ok(true) => tracing::debug!(bundle = %bundle.display(), "DOVE hooks added"),
            Ok(false) => tracing::debug!(bundle = %bundle.display(), "DOVE hooks already present"),
            Err(e) => tracing::warn!(
                bundle = %bundle.display(),
                "{e}; the container starts without DOVE's hook (not registered)"
            ),
        }
    }
    let err = Command::new(&wrapper.inner).args(&wrapper.args).exec();
    eprintln!(
        "dove-runtime: cannot run the real runtime {:?}: {err} (set --dove-runtime=PATH in runtimeArgs, or DOVE_INNER_RUNTIME)",
        wrapper.inner
    );
    ExitCode::from(127)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn wrapper_options_are_stripped() {
        let w = parse(args(&[
            "--dove-runtime=/usr/sbin/runc",
            "--dove-socket=/tmp/s",
            "--root",
            "/r",
            "create",
            "x",
        ]));
        assert_eq!(w.inner, "/usr/sbin/runc");
        assert_eq!(w.socket.as_deref(), Some("/tmp/s"));
        assert_eq!(w.args, args(&["--root", "/r", "create", "x"]));
        // Only leading options are the wrapper's.
        let w = parse(args(&["create", "--dove-hook=/x", "id"]));
        assert_eq!(w.hook, PathBuf::from("/usr/bin/dove-hook"));
        assert_eq!(w.args.len(), 3);
    }
}
