#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs all of it:
# lint (ruff), types (mypy --strict on peersig/), and every pytest test, browsers included.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ here.
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]' \
    --config-settings editable_mode=compat
bash tests/browser/install.sh
command -v systemd-analyze >/dev/null || { apt-get install -y systemd || { apt-get update && apt-get install -y systemd; }; }  # tests/test_operations.py
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { apt-get install -y haproxy || { apt-get update && apt-get install -y haproxy; }; }  # tests/test_haproxy.py
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || { apt-get install -y nftables || { apt-get update && apt-get install -y nftables; }; }  # tests/test_process.py (a vanished network)

ruff check .
mypy
exec python3 -m pytest "$@"
