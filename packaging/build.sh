#!/usr/bin/env bash
# Build the .deb and .rpm from this checkout into packaging/out/.
# Installs cargo-deb and cargo-generate-rpm from crates.io when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm

static=$(bash scripts/build-release.sh | tail -n1)
# cargo-deb accepts built products only under target/release; the static executables
# are staged beside the packages instead.
mkdir -p packaging/out/static
install -m 0755 "$static/dove-hook" "$static/dove-runtime" packaging/out/static/
mkdir -p packaging/out
cargo deb -p dove-daemon --no-build --output packaging/out/
cargo generate-rpm -p daemon --output packaging/out/
ls -l packaging/out/
