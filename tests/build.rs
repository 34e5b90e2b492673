//! Build the empty programs the observer benchmark attaches at DOVE's hooks
//! (`ebpf/programs/src/floor.rs`) into OUT_DIR/dove-floor.bpf.o.

fn main() {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    dove_ebpf_build::build(&manifest.join("../ebpf/programs"), &["dove-floor"]);
}
