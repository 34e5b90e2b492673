#!/usr/bin/env bash
# Install DOVE on this host and start it: dependencies, a release build, the binaries in
# /usr/local/bin, the OCI hook in hooks.d, and doved running with its built-in defaults
# (as a systemd service where systemd runs, else as a background process logging to
# /var/log/dove/doved.log).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/deps.sh
static=$(bash scripts/build-release.sh | tail -n1)

install -m 0755 target/release/doved target/release/dovectl "$static/dove-hook" /usr/local/bin/
install -d /etc/dove /usr/share/containers/oci/hooks.d
[ -f /etc/dove/doved.toml ] || install -m 0644 config/doved.toml /etc/dove/doved.toml
sed 's|/usr/bin/dove-hook|/usr/local/bin/dove-hook|' config/hooks.d/dove.json \
    > /usr/share/containers/oci/hooks.d/dove.json

if [ -d /run/systemd/system ]; then
    sed 's|/usr/bin/doved|/usr/local/bin/doved|' config/systemd/doved.service > /etc/systemd/system/doved.service
    systemctl daemon-reload
    systemctl enable --now doved.service
    systemctl --no-pager status doved.service | head -5
else
    # Without systemd the daemon install.sh started is the one in its pid file; a doved
    # that someone else started on the default socket is left alone.
    pidfile=/run/dove/doved.pid
    bash scripts/stop-doved.sh "$pidfile"
    if dovectl status >/dev/null 2>&1; then
        echo "install.sh: a doved that install.sh did not start serves /run/dove/dove.sock; stop it first" >&2
        exit 1
    fi
    install -d /var/log/dove /run/dove
    setsid /usr/local/bin/doved --config /etc/dove/doved.toml >>/var/log/dove/doved.log 2>&1 < /dev/null &
    echo $! > "$pidfile"
    for _ in $(seq 100); do dovectl status >/dev/null 2>&1 && break; sleep 0.1; done
fi
dovectl status
echo "install.sh: done in ${SECONDS} s"
