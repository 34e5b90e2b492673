#!/usr/bin/env bash
# The whole DOVE test suite. Run as root: the integration suites create cgroups, run real
# containers with runc/crun/podman, and start doved on temporary sockets.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/deps.sh

# doved mounts bpffs when the host has not; leave the host as we found it.
if ! mountpoint -q /sys/fs/bpf; then
    trap 'umount /sys/fs/bpf 2>/dev/null || true' EXIT
fi

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== build (debug for the tests; release and the .deb/.rpm for the packaging tests)"
cargo build --workspace --bins
bash packaging/build.sh

echo "== tests (unit + integration, as root)"
cargo test --workspace -- --test-threads=4

echo "== fuzz: frame decoder and hook state parser, 15 s each (scripts/fuzz.sh 600 for long runs)"
bash scripts/fuzz.sh 15

echo "== VM: patched kernel (cached build), KUnit, noisy-neighbour scenario under QEMU"
bash tests/vm/run.sh

echo "== benchmarks (print numbers; no pass/fail thresholds)"
cargo bench -p dove-tests --bench hook_latency
cargo bench -p dove-tests --bench observer_overhead
cargo bench -p dove-tests --bench early_drop_placement
