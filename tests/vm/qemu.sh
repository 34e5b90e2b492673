#!/usr/bin/env bash
# Print the path of a QEMU that boots Debian's 6.12 cloud kernel under TCG, fetching it
# the first time (cached by version under /var/cache/dove/qemu).
#
# bookworm's QEMU 7.2 takes Debian's 6.12 cloud kernel into a double fault (in
# kmem_cache_alloc_noprof, just after a cmpxchg16b, with garbage in EFLAGS) during DOVE's
# scenario, in every boot tried (2-125 s in); the patched 6.12 and Debian's 6.1 run on
# it. QEMU 10 from bookworm-backports runs the same guest to the end. Its packages are
# unpacked here, not installed: the host's QEMU is left as it is, and the binary uses the
# host's own libraries (bookworm's, which backports are built against; the host's QEMU
# brought them) with firmware from its own packages, through the wrapper this prints.
set -euo pipefail
. "$(dirname "$0")/backports.sh"
cache=/var/cache/dove/qemu
version() { apt-cache "${backports_apt_opts[@]}" policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}'; }
want=$(version)
case "$want" in
*bpo*) ;;
*) backports_refresh; want=$(version) ;;
esac
case "$want" in
*bpo*) ;;
*) echo "qemu.sh: bookworm-backports offers no qemu-system-x86 (candidate: '${want:-none}')" >&2; exit 1 ;;
esac
dir="$cache/$(echo "$want" | tr -c 'A-Za-z0-9.+~\n' '_')"
if [ ! -x "$dir/qemu-system-x86_64" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # apt downloads as its sandbox user, which must be able to write there.
    chown _apt "$work" 2>/dev/null || chmod 0777 "$work"
    fetch() {
        (cd "$work" && apt-get "${backports_apt_opts[@]}" download -qq \
            "qemu-system-x86=$want" "qemu-system-common=$want" "qemu-system-data=$want" \
            seabios/bookworm-backports >&2)
    }
    # Stale package lists name a version the mirror may have dropped: refresh and retry.
    fetch || {
        backports_refresh
        want=$(version)
        dir="$cache/$(echo "$want" | tr -c 'A-Za-z0-9.+~\n' '_')"
        fetch
    }
    for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
    mkdir -p "$dir.tmp"
    cp -a "$work/root/usr" "$dir.tmp/"
    # Firmware first from its own packages (seabios newer than bookworm's), not the host's.
    cat > "$dir.tmp/qemu-system-x86_64" <<WRAPPER
#!/bin/sh
exec "$dir/usr/bin/qemu-system-x86_64" -L "$dir/usr/share/qemu" -L "$dir/usr/share/seabios" "\$@"
WRAPPER
    chmod 0755 "$dir.tmp/qemu-system-x86_64"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    if ! "$dir/qemu-system-x86_64" --version > "$work/version" 2>&1; then
        echo "qemu.sh: QEMU $want does not run on this host: $(ldd "$dir/usr/bin/qemu-system-x86_64" |
            awk '/not found/ {printf "%s ", $1}')missing? (apt-get install them from bookworm)" >&2
        rm -rf "$dir"
        exit 1
    fi
    head -n 1 "$work/version" >&2
fi
echo "$dir/qemu-system-x86_64"
