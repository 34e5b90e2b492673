#!/usr/bin/env bash
# Fetch Debian bookworm's Docker (docker.io 20.10) for the Docker integration tests
# (tests/tests/docker.rs), without installing it: the host's services and apt sources are
# left as they are. docker.io and the packages whose programs dockerd runs (containerd
# with its shims, tini as docker-init) are downloaded through a package list of its own
# under /var/cache/dove/apt-bookworm and unpacked (not installed) together into
# /var/cache/dove/docker/<docker.io version>/. runc comes from the host (scripts/deps.sh
# installs it); dockerd also needs iptables' programs only when it manages networks,
# which the tests turn off (--iptables=false --bridge=none, containers on --network host).
# The shared libraries dockerd loads (libdevmapper, libsystemd) are on every Debian host
# with systemd and lvm2's library; the script checks.
#
# Idempotent: once a version is unpacked, it is only printed. Prints the directory: its
# usr/bin and usr/sbin go first on PATH (dockerd finds containerd, the shim, docker-init
# and docker-proxy there).
#
# DOVE_DOCKER_REFRESH=1 refreshes the package list even when a version is unpacked.
set -euo pipefail

cache=/var/cache/dove
# Tests running at once (and test.sh's fetch ahead) may all find the cache cold: one
# fetches, the others wait for it (apt's package lists take one user at a time).
mkdir -p "$cache"
exec 9>"$cache/.docker.lock"
flock 9
lists=$cache/apt-bookworm
dest=$cache/docker
packages=(docker.io containerd tini)

if [ "$(id -u)" -ne 0 ]; then
    echo "docker.sh: run as root (it writes to $cache)" >&2
    exit 1
fi

complete() {
    [ -x "$1/usr/sbin/dockerd" ] && [ -x "$1/usr/bin/docker" ] &&
        [ -x "$1/usr/bin/containerd" ] && [ -x "$1/usr/bin/containerd-shim-runc-v2" ] &&
        [ -x "$1/usr/bin/tini-static" ]
}

newest_unpacked() {
    [ -d "$dest" ] || return 1
    local v
    v=$(ls -1 "$dest" 2>/dev/null | grep -v '^\.' | sort -V | tail -n 1)
    [ -n "$v" ] && complete "$dest/$v" && echo "$dest/$v"
}

check_libraries() {
    local missing
    missing=$(ldd "$1/usr/sbin/dockerd" "$1/usr/bin/containerd" 2>/dev/null | awk '/not found/ {print $1}' | sort -u)
    if [ -n "$missing" ]; then
        echo "docker.sh: dockerd needs libraries this host lacks: $missing (apt-get install libdevmapper1.02.1 libsystemd0)" >&2
        exit 1
    fi
}

if [ "${DOVE_DOCKER_REFRESH:-0}" != 1 ] && dir=$(newest_unpacked); then
    check_libraries "$dir"
    echo "$dir"
    exit 0
fi

mkdir -p "$lists/lists/partial" "$lists/archives/partial" "$dest"
echo "deb http://deb.debian.org/debian bookworm main" > "$lists/sources.list"
echo "deb http://deb.debian.org/debian-security bookworm-security main" >> "$lists/sources.list"
apt_opts=(-o "Dir::Etc::sourcelist=$lists/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$lists/lists" -o APT::Get::List-Cleanup=0
    -o "Dir::Cache::archives=$lists/archives")
apt-get "${apt_opts[@]}" update -qq >&2

candidate() {
    apt-cache "${apt_opts[@]}" policy "$1" | awk '/Candidate:/ {print $2}'
}
version=$(candidate docker.io)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "docker.sh: bookworm's package list has no docker.io" >&2
    exit 1
fi
target=$dest/$version
if complete "$target"; then
    check_libraries "$target"
    echo "$target"
    exit 0
fi

work=$(mktemp -d "$dest/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
chown _apt "$work" 2>/dev/null || true # apt downloads as _apt (sandboxed)
pinned=()
for p in "${packages[@]}"; do
    v=$(candidate "$p")
    [ -n "$v" ] && [ "$v" != "(none)" ] || {
        echo "docker.sh: bookworm's package list has no $p" >&2
        exit 1
    }
    pinned+=("$p=$v")
done
(cd "$work" && apt-get "${apt_opts[@]}" download -qq "${pinned[@]}" >&2)
mkdir "$work/root"
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$work/root"
done
complete "$work/root" || {
    echo "docker.sh: the unpacked packages (${pinned[*]}) lack dockerd, docker, containerd, its runc v2 shim or tini-static" >&2
    exit 1
}
# What was unpacked, for the record (and for a reader wondering which containerd runs).
printf '%s\n' "${pinned[@]}" > "$work/root/PACKAGES"
check_libraries "$work/root"
# Another run may have won the race; either copy is the same.
mv -T "$work/root" "$target" 2>/dev/null || true
echo "$target"
