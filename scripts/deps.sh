#!/usr/bin/env bash
# Install what DOVE needs to build, run and test on Debian 12: Debian packages and the
# Rust components. Idempotent; safe to re-run.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "deps.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(
    build-essential pkg-config ca-certificates
    iproute2 jq util-linux procps
    # a lossy link in the transmit attribution test (the host kernel has no netem)
    iptables
    # container runtimes and a root filesystem for test containers
    runc crun podman busybox-static
    # rootless podman (its user namespace needs newuidmap)
    uidmap
    # eBPF: bpftool inspects what is attached (tests)
    bpftool
    # packaging tests: a fresh Debian root, rpm queries, systemd's unit verifier
    debootstrap rpm systemd
    # VM test bed: the kernel source and what building it needs, QEMU, guest tools
    linux-source-6.12 flex bison bc libelf-dev libssl-dev dwarves cpio kmod ccache
    qemu-system-x86 ethtool
    # the NRI tests' CRI client (k8s-cri generates its gRPC code with protoc at build time)
    protobuf-compiler
    # the Kubernetes schema validator's virtualenv (scripts/kubeval.sh)
    python3-venv
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "deps.sh: no Rust toolchain found. Install rustup (Debian 13: apt-get install rustup; elsewhere see rust-lang.org) and re-run." >&2
        exit 1
    fi
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# Nightly + rust-src + bpf-linker for the eBPF programs (cached; see the script).
bash "$(dirname "$0")/bpf-toolchain.sh" >/dev/null
