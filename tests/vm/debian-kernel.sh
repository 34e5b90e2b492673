#!/usr/bin/env bash
# Fetch one of Debian's own cloud kernels for the compatibility runs, cached by version
# under /var/cache/dove/debian-kernel, and print the directory holding its vmlinuz and the
# modules the guest loads (veth, and clsact with cls_bpf for early drop's filter where
# tcx is missing, before 6.6), uncompressed for busybox's insmod.
# usage: debian-kernel.sh [6.1|6.12]
#   6.1:  bookworm's linux-image-cloud-amd64, from the apt sources the host already has
#   6.12: bookworm-backports' linux-image-cloud-amd64, from a package list of its own
#         (tests/vm/backports.sh): the host's apt sources are left as they are
set -euo pipefail
series="${1:-6.1}"
cache=/var/cache/dove/debian-kernel
apt_opts=()
case "$series" in
6.1) ;;
6.12)
    . "$(dirname "$0")/backports.sh"
    apt_opts=("${backports_apt_opts[@]}")
    ;;
*) echo "debian-kernel: unknown series '$series': want 6.1 or 6.12" >&2; exit 2 ;;
esac
refresh() { apt-get "${apt_opts[@]}" update -qq >&2; }
image() { # the kernel package linux-image-cloud-amd64 names; nothing before the lists exist
    { apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 2>/dev/null || true; } |
        awk '/Depends: linux-image-/ {print $2; exit}'
}

package=$(image)
if [ -z "$package" ]; then
    refresh
    package=$(image)
fi
[ -n "$package" ] || { echo "debian-kernel: no linux-image-cloud-amd64 for $series in the apt sources" >&2; exit 1; }
case "$package" in
linux-image-"$series".*) ;;
*) echo "debian-kernel: linux-image-cloud-amd64 for $series depends on $package, not a $series kernel" >&2; exit 1 ;;
esac
dir="$cache/$package"
if [ ! -f "$dir/vmlinuz" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # apt downloads as its sandbox user, which must be able to write there.
    chown _apt "$work" 2>/dev/null || chmod 0777 "$work"
    # Stale package lists name a version the mirror may have dropped: refresh and retry.
    (cd "$work" && apt-get "${apt_opts[@]}" download -qq "$package" >&2) || {
        refresh
        package=$(image)
        dir="$cache/$package"
        (cd "$work" && apt-get "${apt_opts[@]}" download -qq "$package" >&2)
    }
    dpkg-deb -x "$work"/*.deb "$work/x"
    mkdir -p "$dir.tmp/modules"
    cp "$work"/x/boot/vmlinuz-* "$dir.tmp/vmlinuz"
    cp "$work"/x/boot/config-* "$dir.tmp/config"
    for m in drivers/net/veth net/sched/sch_ingress net/sched/cls_bpf; do
        src=$(echo "$work"/x/lib/modules/*/kernel/$m.ko*)
        case "$src" in
        *.ko) cp "$src" "$dir.tmp/modules/" ;;
        *.ko.xz) xz -dc "$src" > "$dir.tmp/modules/$(basename "$m").ko" ;;
        *.ko.zst) zstd -qdc "$src" > "$dir.tmp/modules/$(basename "$m").ko" ;;
        *) echo "debian-kernel: $package has no $m module" >&2; exit 1 ;;
        esac
    done
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
fi
echo "$dir"
