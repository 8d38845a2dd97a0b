#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs all of it: lint
# (ruff), types (mypy --strict on peersig/), and the pytest suite in virtual environments,
# one per Python peersig claims and dependency set:
#
#   newest   the newest releases pip resolves today (the early warning: when it fails, the
#            summary names each dependency that moved past the shipped constraints)
#   shipped  contrib/constraints.txt, what README's install command installs
#   lowest   the floors setup.cfg claims (tests/constraints-lowest.txt)
#
# On the first Python (3.11) every set runs the whole suite, browsers included; on the others
# every set runs all but the browser suite and the cluster's failure tests (marker chaos:
# two minutes of kills, stalls and outages that exercise Twisted and txredisapi, not Python). The virtual environments live in .venvs/ (PEP 668:
# no install touches the system's Python). Extra arguments go to every pytest run.
#
#   PEERSIG_TEST_PYTHONS="3.11 3.12 3.13"   the Pythons to run on (default: every one claimed;
#                                          a claimed one missing here is a failure)
#   PEERSIG_TEST_SETS="newest shipped lowest"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

claimed="3.11 3.12 3.13"
pythons="${PEERSIG_TEST_PYTHONS:-$claimed}"
sets="${PEERSIG_TEST_SETS:-newest shipped lowest}"
started=$SECONDS

apt_install() {  # refreshes the package lists only when an install fails without it
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$@" >/dev/null || { apt-get update -q && apt-get install -y -q "$@"; }
}
command -v systemd-analyze >/dev/null || apt_install systemd        # tests/test_operations.py
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || apt_install haproxy  # test_haproxy
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || apt_install nftables  # a vanished network
command -v turnserver >/dev/null || apt_install coturn              # tests/test_turn.py
command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || apt_install redis-server  # test_cluster
bash tests/browser/install.sh || exit 1                              # chromium, npm peerjs

find_python() {  # an interpreter of version $1 with venv: on PATH, or under pyenv
    local candidate
    for candidate in "python$1" "$HOME/.pyenv/versions/$1"*/bin/python "/usr/bin/python$1" \
                     "/usr/local/bin/python$1"; do
        candidate=$(command -v "$candidate" 2>/dev/null) || continue
        "$candidate" -c "import sys, venv; assert sys.version.startswith('$1.')" 2>/dev/null \
            && { echo "$candidate"; return 0; }
    done
    return 1
}

# compat mode puts the checkout on sys.path, so twistd finds twisted/plugins/ here.
install=(install --quiet --disable-pip-version-check -e '.[test]'
         --config-settings editable_mode=compat)

make_venv() {  # make_venv PYTHON SET -> the venv's python on stdout
    local venv=".venvs/$2-$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    [ -x "$venv/bin/python" ] || "$1" -m venv "$venv" >&2 || return 1
    case "$2" in
        newest) "$venv/bin/python" -m pip "${install[@]}" --upgrade --upgrade-strategy eager >&2 ;;
        shipped) "$venv/bin/python" -m pip "${install[@]}" --constraint contrib/constraints.txt >&2 ;;
        lowest) "$venv/bin/python" -m pip "${install[@]}" --constraint tests/constraints-lowest.txt >&2 ;;
    esac || return 1
    echo "$venv/bin/python"
}

drift() {  # what the newest run has that contrib/constraints.txt pins otherwise
    "$1" - <<'EOF'
import importlib.metadata as md, re
for line in open("contrib/constraints.txt"):
    m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
    if not m:
        continue
    try:
        now = md.version(m[1])
    except md.PackageNotFoundError:
        continue
    if now != m[2]:
        print(f"  {m[1]}: shipped {m[2]}, newest {now}")
EOF
}

summary=()
failed=0
first=1
for version in $pythons; do
    python=$(find_python "$version") || {
        summary+=("python $version: NOT FOUND on this machine (set PEERSIG_TEST_PYTHONS to the ones it has)")
        failed=1
        continue
    }
    for set in $sets; do
        venv_python=$(make_venv "$python" "$set") || {
            summary+=("python $version $set: INSTALL FAILED"); failed=1; continue; }
        if [ $first = 1 ] && [ "$set" = newest ]; then
            "$venv_python" -m ruff check . && "$venv_python" -m mypy \
                || { summary+=("ruff/mypy: FAILED"); failed=1; }
        fi
        versions=$("$venv_python" -m pip list --disable-pip-version-check 2>/dev/null \
            | grep -iE '^(twisted|autobahn|prometheus.client|msgspec|pyjwt|txredisapi|hiredis) ' \
            | awk '{printf "%s %s, ", $1, $2}')
        echo "== python $version, $set: ${versions%, }"
        scope=(tests)
        [ $first = 1 ] || scope=(tests --ignore=tests/browser -m "not chaos")
        run_started=$SECONDS
        # As if activated: twistd, haproxy's helpers and bench find this venv's commands.
        if PATH="$(dirname "$venv_python"):$PATH" "$venv_python" -m pytest "${scope[@]}" "$@"; then
            result="passed"
        else
            result="FAILED"
            failed=1
        fi
        line="python $version $set: $result in $((SECONDS - run_started)) s (${versions%, })"
        if [ "$set" = newest ]; then
            moved=$(drift "$venv_python")
            if [ -n "$moved" ]; then
                line+=$'\n'"  newer than contrib/constraints.txt:"$'\n'"$moved"
            fi
        fi
        summary+=("$line")
    done
    first=0
done

echo
echo "== summary ($((SECONDS - started)) s)"
printf '%s\n' "${summary[@]}"
exit $failed
