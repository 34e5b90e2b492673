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

/// `DOVE_EBPF_TARGET_DIR` when set; else `ebpf/` in the target directory OUT_DIR lies in
/// (the ancestor holding the `CACHEDIR.TAG` cargo writes there, so `CARGO_TARGET_DIR` and
/// `--target` layouts are followed); else, outside any cargo layout, OUT_DIR itself.
fn shared_target_dir(out: &Path) -> PathBuf {
    println!("cargo:rerun-if-env-changed=DOVE_EBPF_TARGET_DIR");
    if let Some(dir) = std::env::var_os("DOVE_EBPF_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    out.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(|target| target.join("ebpf"))
        .unwrap_or_else(|| out.join("ebpf-target"))
}

/// Build `bins` of `ebpf/programs` (`programs` is its directory) into OUT_DIR. Panics
/// with the fix in the message: a build script has no better way to fail.
pub fn build(programs: &Path, bins: &[&str]) {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR: call from a build script"));
    for path in [
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join(".cargo/config.toml"),
        programs.join("../common/src"),
        programs.join("../common/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let target_dir = shared_target_dir(&out);
    let mut cmd = Command::new("rustup");
    cmd.current_dir(programs)
        .args(["run", "nightly", "cargo", "build", "--release"]);
    for bin in bins {
        cmd.args(["--bin", bin]);
    }
    cmd.arg("--target-dir").arg(&target_dir);
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
        let object = target_dir.join("bpfel-unknown-none/release").join(bin);
        std::fs::copy(&object, out.join(format!("{bin}.bpf.o")))
            .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
    }
}
