#!/usr/bin/env bash
# The whole DOVE test suite. Run as root: the integration suites create cgroups, run real
# containers with runc/crun/podman, and start doved on temporary sockets.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Each stage's wall time, printed as a table at the end (also when a stage fails), so a
# slow CI run says where its minutes went.
stages=()
stage_started=$SECONDS
stage_name="dependencies"
stage() {
    stages+=("$(printf '%6d s  %s' $((SECONDS - stage_started)) "$stage_name")")
    stage_name="$1"
    stage_started=$SECONDS
    [ -z "$1" ] || echo "== $1"
}
stage_table() {
    stage ""
    echo "== stage times"
    printf '%s\n' "${stages[@]}"
    printf '%6d s  in all\n' "$SECONDS"
}
fixtures_pid= kernel_pid=
unmount_bpffs=no
fixtures_log= kernel_log=
on_exit() {
    # The background jobs run in sessions of their own: stop each with everything it
    # started.
    local pid
    for pid in $fixtures_pid $kernel_pid; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    rm -f $fixtures_log $kernel_log
    stage_table
    [ "$unmount_bpffs" = no ] || umount /sys/fs/bpf 2>/dev/null || true
}
trap on_exit EXIT

# background NICE LOG COMMAND...: COMMAND in a session of its own (on_exit stops it with
# everything it started), at CPU priority NICE and idle I/O priority. With autogroup
# scheduling (kernel.sched_autogroup_enabled, Debian's default) a new session is a
# scheduling group of its own, competing with this one as an equal whatever its
# processes' nice values: the group's own nice is what lowers it.
background() {
    local nice=$1 log=$2
    shift 2
    setsid bash -c 'echo "$0" > /proc/self/autogroup 2>/dev/null; exec nice -n "$0" ionice -c 3 "$@"' \
        "$nice" "$@" > "$log" 2>&1 < /dev/null &
}

bash scripts/deps.sh

# doved mounts bpffs when the host has not; leave the host as we found it.
mountpoint -q /sys/fs/bpf || unmount_bpffs=yes

# The test fixtures download and unpack while the code compiles: mostly waiting on the
# network; their unpacking gets a tenth of the CPU against the compiler.
fixtures_log=$(mktemp /tmp/dove-fixtures.XXXXXX)
background 10 "$fixtures_log" bash scripts/fixtures.sh
fixtures_pid=$!
# With a cold cache the VM suite's kernel builds from here on, at the lowest priority: it
# takes what the stages below leave idle (cargo's serial crates and links, the tests
# waiting on containers, daemons and traffic). Cached, it returns at once;
# tests/vm/run.sh waits for a build under way.
kernel_log=$(mktemp /tmp/dove-kernel.XXXXXX)
background 19 "$kernel_log" bash tests/vm/build-kernel.sh
kernel_pid=$!

stage "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

stage "build (debug for the tests; release and the .deb/.rpm for the packaging tests)"
cargo build --workspace --bins
bash packaging/build.sh

stage "fixtures fetched in the background (containerd, Docker, Debian root and kernels, QEMU)"
if ! wait $fixtures_pid; then
    echo "test.sh: WARNING: a fixture could not be fetched; the tests that need it run its script again and fail naming it" >&2
fi
fixtures_pid=
cat "$fixtures_log"

stage "tests (unit + integration, as root)"
cargo test --workspace -- --test-threads=4

stage "fuzz: frame decoder and hook state parser, 15 s each (scripts/fuzz.sh 600 for long runs)"
bash scripts/fuzz.sh 15

stage "VM: patched kernel (cached build), KUnit, noisy-neighbour scenario under QEMU"
wait $kernel_pid || echo "test.sh: the kernel build in the background failed; run.sh builds it again" >&2
kernel_pid=
cat "$kernel_log"
bash tests/vm/run.sh

# After the VM suite, never beside the kernel build: the benchmarks read CPU time from
# /proc/stat for the whole machine, and a build taking the idle CPU would be counted as
# the cost of what they measure.
stage "benchmarks (print numbers; no pass/fail thresholds)"
# --workspace: the release build's dependency features, so nothing is compiled again.
cargo bench --workspace --bench hook_latency
cargo bench --workspace --bench observer_overhead
cargo bench --workspace --bench early_drop_placement
