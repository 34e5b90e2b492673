//! Used from build scripts: compiles binaries of `ebpf/programs` (a separate nightly,
//! `bpfel-unknown-none` crate outside the workspace) and copies each object to
//! `OUT_DIR/<name>.bpf.o`, for `aya::include_bytes_aligned!`. Needs nightly Rust with
//! rust-src and bpf-linker (`scripts/bpf-toolchain.sh` installs both).
//!
//! Every build script that calls it, in every profile (check, dev, test, release, bench),
//! shares one nested target directory, `<the workspace's target dir>/ebpf`: the programs
//! do not depend on the outer profile, so they and their `core` (build-std) are compiled
//! once per checkout instead of once per build script run. The nested cargo's own lock
//! serialises build scripts that run at the same time; the second finds the first's
//! objects fresh.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `ebpf/` in the target directory OUT_DIR lies in: the nearest ancestor holding the
/// `CACHEDIR.TAG` cargo writes there (so `CARGO_TARGET_DIR` is followed), and for a
/// `--target` build, whose `target/<triple>/` holds a tag of its own, the directory above
/// it. Outside a cargo layout (no tag within a few levels), OUT_DIR itself.
fn shared_target_dir(out: &Path) -> PathBuf {
    let tagged = |dir: &Path| dir.join("CACHEDIR.TAG").is_file();
    // OUT_DIR is target/[<triple>/]<profile>/build/<package>-<hash>/out.
    let Some(mut target) = out.ancestors().skip(1).take(5).find(|dir| tagged(dir)) else {
        return out.join("ebpf-target");
    };
    let triple = std::env::var_os("TARGET");
    if let Some(parent) = target.parent() {
        if triple.is_some() && target.file_name() == triple.as_deref() && tagged(parent) {
            target = parent;
        }
    }
    target.join("ebpf")
}

/// Build `bins` of `ebpf/programs` (`programs` is its directory) into OUT_DIR. Panics
/// with the fix in the message: a build script has no better way to fail.
pub fn build(programs: &Path, bins: &[&str]) {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR: call from a build script"));
    for path in [
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join("Cargo.lock"),
        programs.join("rust-toolchain.toml"),
        programs.join(".cargo/config.toml"),
        programs.join("../common/src"),
        programs.join("../common/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let target_dir = shared_target_dir(&out);
    if target_dir != out.join("ebpf-target") {
        // A nested build of its own, left by an older version of this helper.
        let _ = std::fs::remove_dir_all(out.join("ebpf-target"));
    }
    // The nested cargo copies the objects here while it holds the shared directory's
    // lock: a copy made after it returns could meet another build (release beside debug)
    // relinking the same file.
    let artifacts = out.join("ebpf-artifacts");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(programs)
        .args(["run", "nightly", "cargo", "build", "--release"]);
    for bin in bins {
        cmd.args(["--bin", bin]);
    }
    cmd.arg("--target-dir")
        .arg(&target_dir)
        .args(["-Z", "unstable-options", "--artifact-dir"])
        .arg(&artifacts);
    // The outer (stable) build's settings must not leak into the nested nightly build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO")
            || key.starts_with("RUSTC")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("running `rustup run nightly cargo build` for the eBPF programs: {e}; install the toolchain with scripts/bpf-toolchain.sh")
    });
    if !status.success() {
        panic!("building the eBPF programs in ebpf/programs failed ({status}); scripts/bpf-toolchain.sh installs nightly, rust-src and bpf-linker");
    }
    for bin in bins {
        let object = artifacts.join(bin);
        std::fs::rename(&object, out.join(format!("{bin}.bpf.o")))
            .unwrap_or_else(|e| panic!("moving {}: {e}", object.display()));
    }
}
