#!/usr/bin/env bash
# Stop the doved that install.sh started, and only that one: the pid in PIDFILE (or, for
# an install from before pid files, the pid the daemon on the default socket reports),
# and only while that pid still runs /usr/local/bin/doved, so a recycled pid or a daemon
# someone else started (a test suite's, a package's) is never signalled. Waits until it
# has exited. usage: stop-doved.sh PIDFILE
set -uo pipefail
pidfile="$1"
installed=/usr/local/bin/doved
pid=""
if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
elif command -v dovectl >/dev/null 2>&1; then
    pid=$(dovectl status 2>/dev/null | sed -n 's/.*, pid \([0-9][0-9]*\),.*/\1/p')
fi
exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
exe="${exe% (deleted)}" # an upgrade replaced the binary under the running daemon
if [ -n "$pid" ] && [ "$exe" = "$installed" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    if [ -e "/proc/$pid" ]; then
        echo "stop-doved.sh: doved (pid $pid) did not exit within 10 s of SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        for _ in $(seq 50); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    fi
fi
rm -f "$pidfile"
