#!/usr/bin/env bash
# Run podman with the hooks.d file exactly as packaged (hook at /usr/bin/dove-hook, socket
# at the default /run/dove/dove.sock) without touching the host: in a private mount
# namespace, /usr/bin gets the package's binaries through an overlay and /run is a fresh
# tmpfs where a doved of our own serves the default socket.
# usage: podman-packaged-hook.sh EXTRACTED_PACKAGE_ROOT ROOTFS WORKDIR CGROUP_PARENT
# Prints the `dovectl list --json` seen while the container runs, then the one after.
set -euo pipefail
pkg="$1" rootfs="$2" work="$3" parent="$4"
exec unshare -m --propagation private bash -euo pipefail -c '
pkg="$1" rootfs="$2" work="$3" parent="$4"
mount -t overlay overlay -o "lowerdir=$pkg/usr/bin:/usr/bin" /usr/bin
mount -t tmpfs tmpfs /run
printf "[observer]\nenabled = false\n[metrics]\nlisten = \"\"\n" > "$work/doved.toml"
/usr/bin/doved --config "$work/doved.toml" --state-dir "$work/state" 2>"$work/doved.log" &
daemon=$!
trap "kill $daemon 2>/dev/null || true" EXIT
for _ in $(seq 100); do /usr/bin/dovectl status >/dev/null 2>&1 && break; sleep 0.05; done
podman --root "$work/root" --runroot "$work/runroot" --storage-driver vfs \
    --cgroup-manager cgroupfs --events-backend file --runtime runc \
    --hooks-dir "$pkg/usr/share/containers/oci/hooks.d" \
    run --rm --network none --cgroup-parent "$parent" \
    --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
    --rootfs "$rootfs" sleep 2 2>"$work/podman.err" &
podman=$!
for _ in $(seq 200); do
    list=$(/usr/bin/dovectl list --json)
    [ "$list" != "[]" ] && break
    sleep 0.05
done
echo "$list" | tr -d "\n"
echo
wait $podman
/usr/bin/dovectl list --json | tr -d "\n"
echo
' bash "$pkg" "$rootfs" "$work" "$parent"
