#!/usr/bin/env bash
# Writes contrib/constraints.txt, the set of releases peersig ships: the exact versions of
# its runtime dependencies (and theirs) in the newest run that passed, which
# tests/install-and-run.sh left in .venvs/newest-3.11. README's install command, the VM
# install of docs/operations.md and the systemd docs install with it. Run it after a green
# run of the test command, then run the test command again (its shipped set) and commit.
#
#   bash tests/freeze-constraints.sh [VENV_PYTHON]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tested="${1:-.venvs/newest-3.11/bin/python}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$tested" -m pip freeze --exclude-editable --disable-pip-version-check > "$work/tested.txt"
# Only what `pip install .` needs, at the tested versions: a fresh venv of the same Python.
base=$("$tested" -c 'import sys; print(sys._base_executable)')
"$base" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --constraint "$work/tested.txt" '.[cluster]'
{
    echo "# The releases peersig was tested with (tests/install-and-run.sh, set \"shipped\"),"
    echo "# for installs: pip install --constraint contrib/constraints.txt ."
    echo "# Made by tests/freeze-constraints.sh from $("$tested" --version) on $(date -u +%F)."
    "$work/venv/bin/python" -m pip freeze --disable-pip-version-check \
        | grep -viE '^(peersig|pip|setuptools|wheel)( |=|@)' | sort -f
} > contrib/constraints.txt
cat contrib/constraints.txt
