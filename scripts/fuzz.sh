#!/usr/bin/env bash
# Fuzz the frame decoder and the hook's state parser with cargo-fuzz (libFuzzer, address
# sanitizer, nightly Rust). usage: fuzz.sh [SECONDS per target, default 30]
# cargo-fuzz is installed from crates.io once (cached under $DOVE_CACHE); each target's
# corpus is kept there too, so every run starts where the last one stopped.
set -euo pipefail
seconds="${1:-30}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"
cache="${DOVE_CACHE:-/var/cache/dove}"
tool="$cache/cargo-fuzz"
if [ ! -x "$tool/bin/cargo-fuzz" ]; then
    echo "fuzz.sh: installing cargo-fuzz into $tool"
    # --debug: cargo-fuzz only drives cargo and libFuzzer, and an unoptimised build of it
    # is ready in about half the CPU time (26 s against 48 s; a cold CI run pays for it).
    cargo install cargo-fuzz --locked --debug --root "$tool" 2>&1 | tail -n 2
fi
export PATH="$tool/bin:$PATH"
# The sanitised build is kept outside the clone: a fresh clone rebuilds nothing.
export CARGO_TARGET_DIR="$cache/fuzz-target"
cd "$repo"
for target in frame_decoder hook_state; do
    corpus="$cache/fuzz-corpus/$target"
    mkdir -p "$corpus"
    echo "fuzz.sh: $target for ${seconds}s"
    log="$(mktemp)"
    # libFuzzer ends with "Done N runs in S second(s)"; a crash exits non-zero with the
    # input saved under fuzz/artifacts/.
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus" -- \
        -max_total_time="$seconds" -print_final_stats=1 > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        echo "fuzz.sh: $target FAILED (the input is under fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    grep -E "^Done|stat::number_of_executed_units|stat::peak_rss_mb" "$log" || tail -n 5 "$log"
    rm -f "$log"
done
