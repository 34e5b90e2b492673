#!/usr/bin/env bash
# Fetch Debian's own cloud kernel (bookworm's linux-image-cloud-amd64, 6.1) for the
# compatibility run, cached by version under /var/cache/dove/debian-kernel, and print
# the directory holding its vmlinuz and the modules the guest loads (veth, and clsact
# with cls_bpf for early drop's filter: tcx arrived in 6.6). usage: debian-kernel.sh
set -euo pipefail
cache=/var/cache/dove/debian-kernel
package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$package" ]; then
    apt-get update -qq >&2
    package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
[ -n "$package" ] || { echo "debian-kernel: no linux-image-cloud-amd64 in the apt sources" >&2; exit 1; }
dir="$cache/$package"
if [ ! -f "$dir/vmlinuz" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # apt downloads as its sandbox user, which must be able to write there.
    chown _apt "$work" 2>/dev/null || chmod 0777 "$work"
    # Stale package lists name a version the mirror may have dropped: refresh and retry.
    (cd "$work" && apt-get download -qq "$package" >&2) || {
        apt-get update -qq >&2
        package=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
        dir="$cache/$package"
        (cd "$work" && apt-get download -qq "$package" >&2)
    }
    dpkg-deb -x "$work"/*.deb "$work/x"
    mkdir -p "$dir.tmp/modules"
    cp "$work"/x/boot/vmlinuz-* "$dir.tmp/vmlinuz"
    cp "$work"/x/boot/config-* "$dir.tmp/config"
    for m in drivers/net/veth.ko net/sched/sch_ingress.ko net/sched/cls_bpf.ko; do
        cp "$work"/x/lib/modules/*/kernel/$m "$dir.tmp/modules/"
    done
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
fi
echo "$dir"
