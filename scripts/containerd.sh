#!/usr/bin/env bash
# Fetch Debian trixie's containerd (1.7, with NRI) for the NRI integration tests, without
# touching the host's apt sources: a package list of its own under
# /var/cache/dove/apt-trixie (as tests/vm/backports.sh does for bookworm-backports), the
# .deb unpacked (not installed) into /var/cache/dove/containerd/<version>/.
# Idempotent: once a version is unpacked, it is only printed. Prints the directory (its
# usr/bin holds containerd, ctr and containerd-shim-runc-v2). runc comes from the host
# (scripts/deps.sh installs it).
#
# DOVE_CONTAINERD_REFRESH=1 refreshes the package list even when a version is unpacked
# (to pick up a newer trixie update).
set -euo pipefail

cache=/var/cache/dove
lists=$cache/apt-trixie
dest=$cache/containerd

if [ "$(id -u)" -ne 0 ]; then
    echo "containerd.sh: run as root (it writes to $cache)" >&2
    exit 1
fi

newest_unpacked() {
    [ -d "$dest" ] || return 1
    local v
    v=$(ls -1 "$dest" 2>/dev/null | grep -v '^\.' | sort -V | tail -n 1)
    [ -n "$v" ] && [ -x "$dest/$v/usr/bin/containerd" ] && echo "$dest/$v"
}

if [ "${DOVE_CONTAINERD_REFRESH:-0}" != 1 ] && dir=$(newest_unpacked); then
    echo "$dir"
    exit 0
fi

mkdir -p "$lists/lists/partial" "$lists/archives/partial" "$dest"
echo "deb http://deb.debian.org/debian trixie main" > "$lists/sources.list"
apt_opts=(-o "Dir::Etc::sourcelist=$lists/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$lists/lists" -o APT::Get::List-Cleanup=0
    -o "Dir::Cache::archives=$lists/archives")
apt-get "${apt_opts[@]}" update -qq >&2

# The candidate from trixie's list only (the host's own lists are not read).
version=$(apt-cache "${apt_opts[@]}" policy containerd | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "containerd.sh: trixie's package list has no containerd" >&2
    exit 1
fi
# A Debian version may hold ':' and '~'; keep the directory name as the version.
target=$dest/$version
if [ -x "$target/usr/bin/containerd" ]; then
    echo "$target"
    exit 0
fi

work=$(mktemp -d "$dest/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
chown _apt "$work" 2>/dev/null || true # apt downloads as _apt (sandboxed)
(cd "$work" && apt-get "${apt_opts[@]}" download -qq "containerd=$version" >&2)
deb=$(ls "$work"/containerd_*.deb)
mkdir "$work/root"
dpkg-deb -x "$deb" "$work/root"
[ -x "$work/root/usr/bin/containerd" ] || {
    echo "containerd.sh: $deb holds no usr/bin/containerd" >&2
    exit 1
}
# Another run may have won the race; either copy is the same.
mv -T "$work/root" "$target" 2>/dev/null || true
echo "$target"
