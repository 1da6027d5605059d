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

full=0
[ $# -gt 0 ] || { full=1; set -- -q -ra; }
rc=0
.venv/bin/pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treated as a failure" >&2
fi
if [ "$rc" -eq 0 ] && [ "$full" -eq 1 ]; then
    # The pure-Python twins are the reference: run the hub, codec and gateway paths on them too.
    echo "scripts/test.sh: again on the pure-Python twins (CHORUS_PURE=1)"
    CHORUS_PURE=1 CHORUS_EXPECT_IMPL=pure .venv/bin/pytest -q -ra -m "not services" \
        tests/test_codec.py tests/test_hub.py tests/test_e2e.py tests/test_bad_input.py \
        tests/test_handoff.py tests/test_autobahn.py || rc=$?
fi
exit "$rc"
