#!/usr/bin/env bash
# Build the .deb and .rpm from this checkout into packaging/out/.
# Installs cargo-deb and cargo-generate-rpm from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm

cargo build --release --workspace --bins
mkdir -p packaging/out
cargo deb -p dove-daemon --no-build --output packaging/out/
cargo generate-rpm -p daemon --output packaging/out/
ls -l packaging/out/
