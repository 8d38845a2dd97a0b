#!/usr/bin/env bash
# Installs what the browser suite needs, only what is missing: Debian's Chromium and npm
# peerjs@1.5.5 into tests/browser/node_modules (git-ignored). Python playwright, the driver
# (it never downloads a browser), comes with the test extras. Safe to run again and again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peerjs_version=1.5.5

apt_install() {  # refreshes the package lists only when an install fails without it
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "$@" || {
        apt-get update
        apt-get install -y "$@"
    }
}

[ -x /usr/bin/chromium ] || apt_install chromium
command -v ip >/dev/null || apt_install iproute2
command -v openssl >/dev/null || apt_install openssl
command -v npm >/dev/null || apt_install nodejs npm


installed="$(node -p "require('$here/node_modules/peerjs/package.json').version" 2>/dev/null || true)"
if [ "$installed" != "$peerjs_version" ]; then
    npm install --prefix "$here" --no-save --no-package-lock --no-audit --no-fund \
        "peerjs@$peerjs_version"
fi
test -f "$here/node_modules/peerjs/dist/peerjs.min.js"
