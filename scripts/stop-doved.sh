#!/usr/bin/env bash
# Stop the doved whose pid is in PIDFILE (written by install.sh), and only that one: the
# pid must still be a doved, so a recycled pid or a daemon someone else started is never
# signalled. Waits for it to exit (it unpins nothing and keeps its state on SIGTERM).
# usage: stop-doved.sh PIDFILE
set -euo pipefail
pidfile="$1"
[ -s "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
exe="${exe% (deleted)}" # an upgrade replaced the binary under the running daemon
if [ "${exe##*/}" = doved ]; then
    kill -TERM "$pid"
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    if [ -e "/proc/$pid" ]; then
        echo "stop-doved.sh: doved (pid $pid) did not exit within 10 s of SIGTERM; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
fi
rm -f "$pidfile"
