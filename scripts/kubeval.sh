#!/usr/bin/env bash
# The Kubernetes schema validator the packaging tests check the DaemonSet with:
# kubernetes-validate from PyPI (the OpenAPI schemas of every Kubernetes release, checked
# offline), in a virtualenv of its own under /var/cache/dove, so the host's Python is left
# as it is. Idempotent; prints the validator's path.
set -euo pipefail

version=1.37.0
venv=/var/cache/dove/kubeval-$version
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    rm -rf "$venv"
    trap 'rm -rf "$venv"' ERR
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$version" >&2
fi
echo "$venv/bin/kubernetes-validate"
