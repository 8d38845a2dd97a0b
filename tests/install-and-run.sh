#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs all of it:
# lint (ruff), types (mypy --strict on peersig/), and every pytest test, browsers included,
# twice: on the newest versions of the dependencies, then on the lowest that setup.cfg
# claims (tests/constraints-lowest.txt, in the virtual environment .venv-lowest).
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ here.
install=(install --quiet --disable-pip-version-check -e '.[test]'
         --config-settings editable_mode=compat)
python3 -m pip "${install[@]}" --upgrade --upgrade-strategy eager
bash tests/browser/install.sh
command -v systemd-analyze >/dev/null || { apt-get install -y systemd || { apt-get update && apt-get install -y systemd; }; }  # tests/test_operations.py
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { apt-get install -y haproxy || { apt-get update && apt-get install -y haproxy; }; }  # tests/test_haproxy.py
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || { apt-get install -y nftables || { apt-get update && apt-get install -y nftables; }; }  # tests/test_process.py (a vanished network)
command -v turnserver >/dev/null || { apt-get install -y coturn || { apt-get update && apt-get install -y coturn; }; }  # tests/test_turn.py, the TURN browser test

ruff check .
mypy
python3 -m pytest "$@"

[ -x .venv-lowest/bin/python ] || python3 -m venv .venv-lowest
.venv-lowest/bin/python -m pip "${install[@]}" --constraint tests/constraints-lowest.txt
.venv-lowest/bin/python -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(twisted|autobahn|prometheus.client|msgspec|pyjwt) '
exec .venv-lowest/bin/python -m pytest "$@"
