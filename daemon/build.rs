//! Build DOVE's eBPF programs (`ebpf/programs`) into OUT_DIR/dove.bpf.o, which
//! `observer.rs` embeds.

fn main() {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    dove_ebpf_build::build(&manifest.join("../ebpf/programs"), &["dove"]);
}
