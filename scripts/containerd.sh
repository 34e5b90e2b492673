#!/usr/bin/env bash
# Fetch a Debian containerd with NRI for the NRI integration tests, without touching the
# host's apt sources: a package list of its own per suite under /var/cache/dove/apt-<suite>
# (as tests/vm/backports.sh does for bookworm-backports), the .deb unpacked (not
# installed) into /var/cache/dove/containerd/<version>/.
#
#   scripts/containerd.sh [1]   containerd 1.7 from Debian trixie (the default)
#   scripts/containerd.sh 2     containerd 2.x from Debian sid (NRI on by default)
#
# Idempotent: once a version of the series is unpacked, it is only printed. Prints the
# directory (its usr/bin holds containerd, ctr and containerd-shim-runc-v2). runc comes
# from the host (scripts/deps.sh installs it).
#
# DOVE_CONTAINERD_REFRESH=1 refreshes the package list even when a version is unpacked
# (to pick up a newer update of the suite).
set -euo pipefail

major=${1:-1}
case "$major" in
    1) suite=trixie ;;
    2) suite=sid ;;
    *)
        echo "containerd.sh: which series? 1 (trixie's 1.7, the default) or 2 (sid's 2.x), not '$major'" >&2
        exit 2
        ;;
esac

cache=/var/cache/dove
# Tests running at once (and test.sh's fetch ahead) may all find the cache cold: one
# fetches, the others wait for it (apt's package lists take one user at a time).
mkdir -p "$cache"
exec 9>"$cache/.containerd-$major.lock"
flock 9
lists=$cache/apt-$suite
dest=$cache/containerd

if [ "$(id -u)" -ne 0 ]; then
    echo "containerd.sh: run as root (it writes to $cache)" >&2
    exit 1
fi

# The newest unpacked version of the series (both series share $dest).
newest_unpacked() {
    [ -d "$dest" ] || return 1
    local v
    v=$(ls -1 "$dest" 2>/dev/null | grep "^$major\." | sort -V | tail -n 1)
    [ -n "$v" ] && [ -x "$dest/$v/usr/bin/containerd" ] && echo "$dest/$v"
}

if [ "${DOVE_CONTAINERD_REFRESH:-0}" != 1 ] && dir=$(newest_unpacked); then
    echo "$dir"
    exit 0
fi

mkdir -p "$lists/lists/partial" "$lists/archives/partial" "$dest"
echo "deb http://deb.debian.org/debian $suite main" > "$lists/sources.list"
apt_opts=(-o "Dir::Etc::sourcelist=$lists/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$lists/lists" -o APT::Get::List-Cleanup=0
    -o "Dir::Cache::archives=$lists/archives")
apt-get "${apt_opts[@]}" update -qq >&2

# The candidate from the suite's list only (the host's own lists are not read).
version=$(apt-cache "${apt_opts[@]}" policy containerd | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "containerd.sh: $suite's package list has no containerd" >&2
    exit 1
fi
case "$version" in
    "$major".*) ;;
    *)
        echo "containerd.sh: $suite's containerd is $version, not of the $major.x series" >&2
        exit 1
        ;;
esac
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
# The binary must run here (sid's may want a newer glibc than this host's).
if ! "$work/root/usr/bin/containerd" --version >&2; then
    echo "containerd.sh: $suite's containerd $version does not run on this host" >&2
    exit 1
fi
# Another run may have won the race; either copy is the same.
mv -T "$work/root" "$target" 2>/dev/null || true
echo "$target"
