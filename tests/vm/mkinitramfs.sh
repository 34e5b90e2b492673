#!/usr/bin/env bash
# Build the guest's initramfs: busybox, DOVE's binaries, runc, iproute2 and the test
# suite's traffic tool (dove-traffic) with their shared libraries, a container root
# filesystem, and tests/vm/guest-init.sh as /init.
# usage: mkinitramfs.sh OUTPUT.cpio BINDIR TRAFFIC_TOOL [MODULES_DIR]
# MODULES_DIR: kernel modules (*.ko) the guest loads at boot (a distribution kernel's).
set -euo pipefail
out="$1" bindir="$2" traffic="$3" modules="${4:-}"
here="$(cd "$(dirname "$0")" && pwd)"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

copy_with_libs() { # copy_with_libs DEST_ROOT BINARY [NAME]
    local dest="$1" bin="$2" name="${3:-$(basename "$2")}"
    install -D -m 0755 "$bin" "$dest/bin/$name"
    ldd "$bin" 2>/dev/null | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
        [ -n "$lib" ] && [ -f "$lib" ] || continue
        install -D -m 0644 "$lib" "$dest$lib"
        # The dynamic loader must be executable.
        case "$lib" in */ld-linux*) chmod 0755 "$dest$lib" ;; esac
    done
}

make_busybox_root() { # a directory with busybox and its applets
    local dest="$1"
    mkdir -p "$dest"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,var}
    install -m 0755 "$(command -v busybox)" "$dest/bin/busybox"
    for applet in $("$dest/bin/busybox" --list); do
        [ -e "$dest/bin/$applet" ] || ln -s busybox "$dest/bin/$applet"
    done
    echo "root:x:0:0:root:/root:/bin/sh" > "$dest/etc/passwd"
    echo "root:x:0:" > "$dest/etc/group"
}

make_busybox_root "$root"
for b in doved dovectl dove-hook; do
    copy_with_libs "$root" "$bindir/$b"
done
copy_with_libs "$root" "$(command -v runc)"
copy_with_libs "$root" "$traffic"
# iproute2 (for netns), outside PATH and called by full path: busybox's shell runs its
# own applet for a bare `ip`, and iproute2 picks a subcommand from any other argv[0].
copy_with_libs "$root" "$(command -v ip)"
mkdir -p "$root/usr/sbin"
mv "$root/bin/ip" "$root/usr/sbin/ip"
ln -sf busybox "$root/bin/ip"
# The containers' root filesystem: busybox and the traffic tool (B's receiver).
make_busybox_root "$root/ctr"
copy_with_libs "$root/ctr" "$traffic"
if [ -n "$modules" ]; then
    mkdir -p "$root/lib/modules"
    cp "$modules"/*.ko "$root/lib/modules/"
fi
install -m 0755 "$here/guest-init.sh" "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out"
