//! Build DOVE's eBPF programs (`ebpf/programs`) and put the object in OUT_DIR, where
//! `observer.rs` embeds it. Needs nightly Rust with rust-src and bpf-linker
//! (`scripts/bpf-toolchain.sh` installs both).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let programs = manifest.join("../ebpf/programs");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    for path in [
        "../ebpf/programs/src",
        "../ebpf/programs/Cargo.toml",
        "../ebpf/programs/.cargo/config.toml",
        "../ebpf/common/src",
        "../ebpf/common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&programs)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--target-dir",
        ])
        .arg(&target_dir);
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
    let object = target_dir.join("bpfel-unknown-none/release/dove");
    std::fs::copy(&object, out.join("dove.bpf.o"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", object.display()));
}
