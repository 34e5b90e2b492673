//! Build the benchmarks' own programs into OUT_DIR: the empty programs the observer
//! benchmark attaches at DOVE's hooks (`ebpf/programs/src/floor.rs`, dove-floor.bpf.o)
//! and the drops the early-drop placement benchmark compares
//! (`ebpf/programs/src/drop_placement.rs`, dove-drop-placement.bpf.o).

fn main() {
    // Where scripts/build-release.sh leaves the static dove-hook the hook bench measures.
    println!(
        "cargo:rustc-env=DOVE_TARGET_TRIPLE={}",
        std::env::var("TARGET").unwrap()
    );
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    dove_ebpf_build::build(
        &manifest.join("../ebpf/programs"),
        &["dove-floor", "dove-drop-placement"],
    );
}
