# $1 is 0 on erase, 1 on upgrade.
if [ "$1" = "0" ] && command -v systemctl >/dev/null 2>&1; then
    [ -d /run/systemd/system ] && systemctl stop doved.service >/dev/null 2>&1 || true
    systemctl disable doved.service >/dev/null 2>&1 || true
fi
# Erase (not upgrade): take dove-runtime out of dockerd's daemon.json before the binary
# goes, and have dockerd reload it (see packaging/README.md). Never fails the erase.
if [ "$1" = "0" ] && [ -f /etc/docker/daemon.json ] &&
    grep -qs dove /etc/docker/daemon.json && [ -x /usr/bin/dovectl ]; then
    /usr/bin/dovectl docker remove-runtime --config /etc/docker/daemon.json --reload ||
        echo "dove: could not take dove-runtime out of /etc/docker/daemon.json (see above); remove it there by hand and reload dockerd, or docker run will fail" >&2
fi
exit 0
