#!/usr/bin/env bash
# Undo scripts/install.sh: stop doved, remove what install.sh put in place, its state and
# its pinned maps. Containers keep starting: the hook goes with the hooks.d file.
set -uo pipefail
if [ -d /run/systemd/system ] && [ -f /etc/systemd/system/doved.service ]; then
    systemctl disable --now doved.service
    rm -f /etc/systemd/system/doved.service
    systemctl daemon-reload
else
    bash "$(cd "$(dirname "$0")" && pwd)/stop-doved.sh" /run/dove/doved.pid
fi
rm -f /usr/local/bin/doved /usr/local/bin/dovectl /usr/local/bin/dove-hook
rm -f /usr/share/containers/oci/hooks.d/dove.json
rm -rf /etc/dove /var/lib/dove /var/log/dove /run/dove /sys/fs/bpf/dove
echo "DOVE removed"
