#!/usr/bin/env bash
# The release build every installer and package uses: the workspace's binaries in
# target/release/, and the two that runtimes spawn for every container (dove-hook at each
# hook stage, dove-runtime for each runtime command) again as static, non-PIE
# executables in target/<host triple>/release/.
#
# Why: a container start waits for the hook. A dynamically linked 5 MB PIE spends about
# 1 ms (p50; 2 ms at p99) before main() in the loader: mapping libc and libgcc_s,
# applying relocations, faulting in the pages it touched. Static and non-PIE, it starts
# about as fast as /bin/true (the hook_latency benchmark prints both). doved and dovectl
# stay dynamic: doved resolves socket_group through NSS, which static glibc cannot load.
#
# Prints the directory of the static binaries on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release --workspace --bins
host=$(rustc -vV | sed -n 's/^host: //p')
# With --target, RUSTFLAGS reach only the target's artifacts, not build scripts or proc
# macros, and the output goes to its own directory. Whole-program LTO in one codegen
# unit makes these two a fifth smaller (4.8 MB against 6.0): fewer pages to fault in at
# every start, about 0.1 ms at p50 and more at p99, for a minute more of build.
CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
    RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
    cargo build --release --target "$host" -p dove-hook -p dove-runtime
echo "target/$host/release"
