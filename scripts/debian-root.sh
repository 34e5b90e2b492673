#!/usr/bin/env bash
# Print the path of a cached minimal Debian 12 root filesystem tarball, building it with
# debootstrap from the mirror apt already uses when it is not cached yet.
# Cache: $DOVE_CACHE/debootstrap (default /var/cache/dove/debootstrap).
set -euo pipefail
cache="${DOVE_CACHE:-/var/cache/dove}/debootstrap"
tarball="$cache/bookworm-minbase.tar"
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
# Two tests (or test.sh's fetch ahead and a test) may find the cache cold at once: one
# builds, the other waits and takes its tarball.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 1800 9 || { echo "debian-root.sh: $cache/.lock held for 30 min: is another build stuck?" >&2; exit 1; }
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
# The lock is not theirs to keep: an orphan of a killed run must not hold it.
command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 9>&-

mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    mirror=$(awk '/^URIs:/ {uri=$2} /^Suites:/ && /bookworm( |$)/ && uri !~ /security/ {print uri; exit}' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

# Under the lock, any build directory is a killed run's.
rm -rf "$cache"/build.*
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "debian-root.sh: debootstrap bookworm from $mirror (cached afterwards)" >&2
debootstrap --variant=minbase bookworm "$work/root" "$mirror" >"$work/log" 2>&1 9>&- || {
    tail -n 20 "$work/log" >&2
    exit 1
}
tar -C "$work/root" -cf "$work/root.tar" .
mv "$work/root.tar" "$tarball"
echo "$tarball"
