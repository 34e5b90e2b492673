#!/usr/bin/env bash
# Fetch what the test suite runs against besides this host's own packages: containerd 1.7
# and 2.x, Docker 20.10, the Kubernetes schema validator, a Debian root for the packaging
# tests, and the VM suite's Debian kernels and QEMU. Everything lands under
# /var/cache/dove; each script is idempotent, and each test runs its script itself when
# the cache is cold, so this only fetches ahead: test.sh runs it in the background while
# the code compiles (downloads and unpacking, not the CPU, are what these wait on).
#
# One fetch after another (several share a package list of their own under
# /var/cache/dove); goes on past one that fails and exits non-zero at the end, naming it.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
failed=()
fetch() { # fetch WHAT SCRIPT [ARGS]
    local what=$1 started=$SECONDS
    shift
    if bash "$repo/$@" >/dev/null; then
        echo "fixtures.sh: $what ready in $((SECONDS - started)) s"
    else
        echo "fixtures.sh: $what FAILED ($*)" >&2
        failed+=("$what")
    fi
}
fetch "containerd 1.7" scripts/containerd.sh 1
fetch "containerd 2.x" scripts/containerd.sh 2
fetch "Docker 20.10" scripts/docker.sh
fetch "kubernetes-validate" scripts/kubeval.sh
fetch "Debian root" scripts/debian-root.sh
fetch "Debian 6.1 kernel" tests/vm/debian-kernel.sh 6.1
fetch "Debian 6.12 kernel" tests/vm/debian-kernel.sh 6.12
fetch "backports' QEMU" tests/vm/qemu.sh
if [ ${#failed[@]} -gt 0 ]; then
    echo "fixtures.sh: could not fetch: ${failed[*]}" >&2
    exit 1
fi
