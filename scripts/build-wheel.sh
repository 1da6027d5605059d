#!/usr/bin/env bash
# Build this machine's wheel into dist/ and check it holds both compiled extensions
# (chorus/native/_hub and chorus/native/_wsframe, both C++). For the manylinux/musllinux set run
# `cibuildwheel --platform linux` ([tool.cibuildwheel] in pyproject.toml).
#   bash scripts/build-wheel.sh            # dist/chorus_live-<version>-cp3XX-...whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
mkdir -p dist
CHORUS_BUILD_NATIVE=always "$PY" -m pip wheel . --no-deps -w dist/ -q
wheel=$(ls -t dist/chorus_live-*.whl | head -n1)
echo "built $wheel"
"$PY" -m zipfile -l "$wheel" | awk '/\.so /{print "  " $1}'
for ext in _hub _wsframe; do
    if ! "$PY" -m zipfile -l "$wheel" | grep -q "chorus/native/${ext}\..*\.so "; then
        echo "build-wheel: $wheel has no compiled chorus/native/$ext" >&2
        exit 1
    fi
done
echo "ok: both native extensions are in the wheel"
