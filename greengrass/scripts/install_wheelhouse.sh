#!/bin/sh
# Install the qcsight edge agent from this wheelhouse into a virtual environment, offline.
#
# Usage: install.sh VENV        (the recipe passes {work:path}/venv/<component version>)
#
# Every wheel comes from this folder (--no-index) and must match the sha256 in requirements.lock
# (--require-hashes); no configuration file or PIP_* variable of the device can add an index
# (PIP_CONFIG_FILE=/dev/null, --isolated). Idempotent: the nucleus runs install on every start,
# and a venv already made from this very lock is kept. Exits non-zero on any failure, so the
# nucleus reports the component broken instead of running half an install.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
venv=$1
lock="$here/requirements.lock"
python=${QCSIGHT_PYTHON:-python3}
want=$(cat "$here/python-version")
stamp="$venv/.qcsight-wheelhouse.sha256"
lock_sum=$(sha256sum "$lock" | cut -d ' ' -f 1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_sum" ] && [ -x "$venv/bin/qcsight" ]; then
    echo "qcsight: $venv already holds this wheelhouse"
    exit 0
fi
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || {
    echo "qcsight: cannot run $python (set QCSIGHT_PYTHON to a CPython $want)" >&2
    exit 1
}
if [ "$have" != "$want" ]; then
    echo "qcsight: this wheelhouse was built for CPython $want; $python is $have (set QCSIGHT_PYTHON)" >&2
    exit 1
fi

# pip itself runs from its wheel in this folder, checked against installer.sha256 first: the venv
# is made without pip (no ensurepip: slow, and absent without Debian's python3-venv).
installer=$(cut -d ' ' -f 3 "$here/installer.sha256")
if ! (cd "$here" && sha256sum -c installer.sha256 > /dev/null); then
    echo "qcsight: $installer does not match installer.sha256" >&2
    exit 1
fi

rm -rf "$venv"
"$python" -m venv --without-pip "$venv"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" "$here/$installer/pip" install --isolated --quiet \
    --disable-pip-version-check --no-cache-dir --no-index --find-links "$here" --only-binary=:all: \
    --require-hashes -r "$lock"
"$venv/bin/qcsight" --version
echo "$lock_sum" > "$stamp"

# Keep this version's venv and the newest other one (what a rollback returns to); drop older ones.
parent=$(dirname "$venv")
ls -1t "$parent" | tail -n +3 | while read -r old; do
    if [ "$parent/$old" != "$venv" ]; then
        rm -rf "${parent:?}/$old"
    fi
done
