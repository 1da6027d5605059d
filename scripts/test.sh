#!/usr/bin/env bash
# The test command (README, CI): install what the tests need, then run pytest.
#   bash scripts/test.sh                      # whole suite, `-q -ra`, with branch coverage
#   bash scripts/test.sh tests/test_services.py -x
# Exits non-zero on any failure, including "no tests collected" (pytest exit code 5) and, on the
# whole suite, branch coverage under [tool.coverage.report] fail_under.
# CHORUS_TEST_COVERAGE=0 runs the whole suite without coverage; CHORUS_TEST_TIMEOUT_SCALE=N
# multiplies the tests' waits and start-up timeouts (tests/waiting.py) on a slow machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
trap 'echo "scripts/test.sh: elapsed ${SECONDS}s"' EXIT

bash scripts/install-test-deps.sh

full=0
[ $# -gt 0 ] || { full=1; set -- -q -ra; }
run=(.venv/bin/pytest)
if [ "$full" -eq 1 ] && [ "${CHORUS_TEST_COVERAGE:-1}" != 0 ]; then
    # One data file per process (parallel = true), the roles' subprocesses included; an absolute
    # path, so a process started in another folder writes beside the others.
    export COVERAGE_FILE=$PWD/.services/coverage/data
    rm -rf "$(dirname "$COVERAGE_FILE")"
    mkdir -p "$(dirname "$COVERAGE_FILE")"
    # The pytest script, not `-m pytest`: the folder stays off sys.path, as in a plain run.
    run=(.venv/bin/python -m coverage run .venv/bin/pytest)
fi
rc=0
"${run[@]}" "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "scripts/test.sh: pytest collected no tests; treated as a failure" >&2
fi
if [ "$rc" -eq 0 ] && [ "$full" -eq 1 ]; then
    # The pure-Python twins are the reference: run the hub, codec and gateway paths on them too.
    echo "scripts/test.sh: again on the pure-Python twins (CHORUS_PURE=1)"
    CHORUS_PURE=1 CHORUS_EXPECT_IMPL=pure "${run[@]}" -q -ra -m "not services" \
        tests/test_codec.py tests/test_hub.py tests/test_e2e.py tests/test_bad_input.py \
        tests/test_handoff.py tests/test_autobahn.py || rc=$?
fi
if [ "$rc" -eq 0 ] && [ -n "${COVERAGE_FILE:-}" ]; then
    .venv/bin/python -m coverage combine -q
    echo "scripts/test.sh: branch coverage of chorus/, gateway/, ingest/, native/ (both runs, roles included)"
    .venv/bin/python -m coverage report --skip-covered || rc=$?
fi
exit "$rc"
