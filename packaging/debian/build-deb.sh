#!/usr/bin/env bash
# Build the .deb from what packaging/build.sh built (the release binaries in
# target/release, the static dove-hook and dove-runtime in packaging/out/static) with
# dpkg's own tools: the tree staged as it installs, `control` filled in (Depends from
# dpkg-shlibdeps), conffiles, md5sums and the maintainer scripts beside this file.
# usage: build-deb.sh VERSION OUTDIR
set -euo pipefail
# dpkg-deb refuses a control directory others cannot read, and the tree's modes are what
# dpkg installs: neither may depend on the caller's umask.
umask 022
version=$1 outdir=$2
# Debian sorts "1.0~rc1" before "1.0" (a cargo pre-release "1.0-rc1" would sort after).
deb_version="${version//-/\~}-1"
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
stage=$(mktemp -d /tmp/dove-deb.XXXXXX)
trap 'rm -rf "$stage"' EXIT
# debian/dove: where dpkg-shlibdeps expects the package's tree.
root="$stage/debian/dove"

put() { # put MODE SOURCE DEST: SOURCE relative to the checkout, DEST to /
    install -D -m "$1" "$repo/$2" "$root/$3"
}
put 0755 target/release/doved usr/bin/doved
put 0755 target/release/dovectl usr/bin/dovectl
# Stripped as dh_strip would (Debian policy 10.1). The static dove-hook and dove-runtime
# are linked with LTO and ship as built, in both packages.
strip --remove-section=.comment --remove-section=.note "$root/usr/bin/doved" "$root/usr/bin/dovectl"
put 0755 packaging/out/static/dove-hook usr/bin/dove-hook
put 0755 packaging/out/static/dove-runtime usr/bin/dove-runtime
put 0644 config/doved.toml etc/dove/doved.toml
put 0644 config/hooks.d/dove.json usr/share/containers/oci/hooks.d/dove.json
put 0644 config/systemd/doved.service lib/systemd/system/doved.service
put 0644 config/systemd/doved.socket lib/systemd/system/doved.socket
put 0644 config/docker/daemon.json usr/share/doc/dove/docker-daemon.json
put 0644 README.md usr/share/doc/dove/README.md
put 0644 ebpf/README.md usr/share/doc/dove/ebpf.md
put 0644 packaging/kubernetes/doved-daemonset.yaml usr/share/doc/dove/kubernetes/doved-daemonset.yaml
# Machine-readable copyright format 1.0: the license text indented, blank lines as " .".
{
    echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: dove"
    echo
    echo "Files: *"
    echo "Copyright: 2026, DOVE developers"
    echo "License: Apache-2.0"
    sed -e 's/^$/./' -e 's/^/ /' "$repo/LICENSE"
    echo " ."
    echo " On Debian systems, the full text of the Apache License, Version 2.0 is in"
    echo " /usr/share/common-licenses/Apache-2.0."
} > "$stage/copyright"
install -D -m 0644 "$stage/copyright" "$root/usr/share/doc/dove/copyright"

# dpkg-shlibdeps reads debian/control of the source package it is run in (a minimal one
# names the binary package) and finds the package's tree by its DEBIAN directory. The
# static executables link nothing.
mkdir -p "$root/DEBIAN"
printf 'Source: dove\n\nPackage: dove\nArchitecture: any\n' > "$stage/debian/control"
depends=$(cd "$stage" && dpkg-shlibdeps -O debian/dove/usr/bin/doved debian/dove/usr/bin/dovectl |
    sed -n 's/^shlibs:Depends=//p')
[ -n "$depends" ] || { echo "build-deb.sh: dpkg-shlibdeps found no dependencies of doved" >&2; exit 1; }

sed -e "s/@VERSION@/$deb_version/" \
    -e "s/@ARCH@/$(dpkg --print-architecture)/" \
    -e "s/@INSTALLED_SIZE@/$(du -sk --exclude=DEBIAN "$root" | cut -f1)/" \
    -e "s/@DEPENDS@/$depends/" \
    "$here/control" > "$root/DEBIAN/control"
echo /etc/dove/doved.toml > "$root/DEBIAN/conffiles"
# dpkg keeps the conffiles' sums itself: md5sums lists every other file.
(cd "$root" && find . -path ./DEBIAN -prune -o -type f ! -path ./etc/dove/doved.toml -printf '%P\0' |
    sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$root/DEBIAN/"
# The last commit's time for every file's mtime (dpkg-deb clamps to it): the same
# checkout gives the same package.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}" \
    dpkg-deb --root-owner-group -Zxz --build "$root" \
    "$outdir/dove_${deb_version}_$(dpkg --print-architecture).deb" >/dev/null
