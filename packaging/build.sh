#!/usr/bin/env bash
# Build the .deb and .rpm from this checkout into packaging/out/: the .deb with dpkg-deb
# (packaging/debian/build-deb.sh), the .rpm with rpmbuild (Debian's rpm package, which
# scripts/deps.sh installs) from packaging/rpm/dove.spec.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

command -v dpkg-shlibdeps >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpkg-dev >/dev/null
command -v rpmbuild >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null

static=$(bash scripts/build-release.sh | tail -n1)
# Both packages take the static executables from here. Packages of an older version
# would be found by the packaging tests beside the new ones.
mkdir -p packaging/out/static
rm -f packaging/out/*.deb packaging/out/*.rpm
install -m 0755 "$static/dove-hook" "$static/dove-runtime" packaging/out/static/
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
bash packaging/debian/build-deb.sh "$version" "$PWD/packaging/out"
# rpmbuild packages what is built above (the spec has no %build); the scriptlets are
# the same files the .deb's maintainer scripts mirror.
topdir=$(mktemp -d /tmp/dove-rpmbuild.XXXXXX)
trap 'rm -rf "$topdir"' EXIT
mkdir "$topdir/tmp"
{
    cat packaging/rpm/dove.spec
    echo '%post'
    cat packaging/rpm/post_install.sh
    echo '%preun'
    cat packaging/rpm/pre_uninstall.sh
} > "$topdir/dove.spec"
rpmbuild -bb --nodeps --quiet \
    --define "_topdir $topdir" \
    --define "_tmppath $topdir/tmp" \
    --define "dove_src $PWD" \
    --define "dove_version $version" \
    --define "_rpmdir $PWD/packaging/out" \
    --define '_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm' \
    "$topdir/dove.spec"
ls -l packaging/out/
