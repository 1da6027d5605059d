#!/usr/bin/env bash
# The test command (README, CI): install what the tests need, then run pytest.
#   bash scripts/test.sh                      # whole suite, `-q -ra`
#   bash scripts/test.sh tests/test_services.py -x
# Exits non-zero on any failure, including "no tests collected" (pytest exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
trap 'echo "scripts/test.sh: elapsed ${SECONDS}s"' EXIT

bash scripts/install-test-deps.sh

[ $# -gt 0 ] || set -- -q -ra
rc=0
.venv/bin/pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treated as a failure" >&2
fi
exit "$rc"
