#!/usr/bin/env bash
# Install everything the test suite needs, idempotently (a second run does almost nothing).
# Written for a fresh Debian 12 machine as root (uses sudo when not root and something is
# missing):
#   - system packages, only when missing: redis-server, chromium (browser tests), a JDK 17
#     and Maven (to fetch the Kafka jars), a C/C++ compiler and the Python headers (the native
#     extensions are built with CHORUS_BUILD_NATIVE=always), python3-venv;
#   - .venv with the project installed in editable mode with its `test` extra, and the view
#     of the package that mypy reads (.venv/typecheck);
#   - the Apache Kafka broker jars in .services/kafka/libs, resolved from services/kafka/pom.xml;
#   - the Apache Cassandra node jars in .services/cassandra/libs, from services/cassandra/pom.xml.
# CHORUS_REINSTALL=1 forces the pip step even when nothing it depends on changed.
# CHORUS_BUILD_NATIVE defaults to "always" here (a failed native build fails the install);
# a developer may set "never" together with CHORUS_EXPECT_IMPL=pure for the pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# One install at a time (two test runs started together must not pip-install into the same
# .venv or fill the same jar folder at once).
mkdir -p .services
exec 9>.services/install.lock
flock 9

log() { echo "install-test-deps: $*"; }

# ---- system packages --------------------------------------------------------------------
java_major() { # prints the major version of `java` on PATH, 0 if none
    local v=
    if command -v java >/dev/null 2>&1; then
        v=$(java -XshowSettings:properties -version 2>&1 \
            | sed -n 's/^ *java\.specification\.version = \([0-9]*\).*/\1/p' | head -n1)
    fi
    echo "${v:-0}"
}
python_header() { # prints True if python3's C headers (Python.h) are installed
    python3 -c 'import os, sysconfig
print(os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null
}
missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # browser interop tests
[ "$(java_major)" -ge 17 ] || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
{ command -v cc && command -v c++; } >/dev/null 2>&1 || missing+=(build-essential)
[ "$(python_header)" = True ] || missing+=(python3-dev)
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    SUDO=
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
    # The package starts a system redis on port 6379; the tests start their own on a free
    # port, so the system one is not needed (left alone if stopping fails, e.g. no init).
    if [[ " ${missing[*]} " == *" redis-server "* ]]; then
        $SUDO service redis-server stop >/dev/null 2>&1 || true
    fi
fi
if [ "$(java_major)" -lt 17 ]; then
    log "java on PATH is missing or older than 17 (Kafka 4.x needs it); see update-alternatives" >&2
    exit 1
fi

# ---- Python environment -----------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
# Skip the (slow: it compiles the native extensions) pip step when the packaging inputs and
# native sources are unchanged since the last successful install. Generated sources (*.c,
# native/*.cpp) are not inputs.
BUILD_NATIVE=${CHORUS_BUILD_NATIVE:-always}
stamp_file=.venv/.chorus-install-stamp
stamp=$(
    {
        echo "CHORUS_BUILD_NATIVE=$BUILD_NATIVE"
        cat pyproject.toml setup.py
        find native -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pyi' -o -name '*.h' \
            -o -name '*.hpp' -o -name '*_impl.c' -o -path 'native/src/*' \) 2>/dev/null \
            | LC_ALL=C sort | while read -r f; do echo "$f"; cat "$f"; done
    } | sha256sum | cut -d' ' -f1
)
if [ "${CHORUS_REINSTALL:-0}" = 1 ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    log "pip install -e '.[test]' with CHORUS_BUILD_NATIVE=$BUILD_NATIVE"
    rm -f "$stamp_file"
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    CHORUS_BUILD_NATIVE=$BUILD_NATIVE .venv/bin/python -m pip install -q -e '.[test]'
    echo "$stamp" >"$stamp_file"
else
    log "python package up to date (CHORUS_REINSTALL=1 forces a reinstall)"
fi
# mypy cannot follow the package-dir mapping that makes gateway/ chorus.gateway (and so on), so
# it reads the package through this view (pyproject.toml [tool.mypy] mypy_path). Python never
# imports from it; it lives in .venv so editors and search tools do not see the files twice.
view=.venv/typecheck/chorus
mkdir -p "$view"
for role in gateway ingest native; do
    ln -sfn "$ROOT/$role" "$view/$role"
done

# ---- broker and store jars --------------------------------------------------------------
# resolve_jars NAME LABEL JAR_GLOB: the jars services/NAME/pom.xml names, with their runtime
# dependencies, into .services/NAME/libs, again only when the pom changed. copy-dependencies
# writes nothing but the jars; they are resolved into a temporary folder and swapped in, so an
# interrupted download never looks complete.
resolve_jars() {
    local name=$1 label=$2 jar_glob=$3
    local libs=.services/$name/libs
    local pom_sum
    pom_sum=$(sha256sum "services/$name/pom.xml" | cut -d' ' -f1)
    if [ "$(cat "$libs/.pom.sha256" 2>/dev/null)" = "$pom_sum" ]; then
        log "$label jars up to date in $libs"
        return
    fi
    log "resolving the $label jars into $libs"
    rm -rf "$libs.tmp"
    mkdir -p "$(dirname "$libs")"
    (cd "services/$name" && mvn -q -B -Dstyle.color=never \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
        -DoutputDirectory="$ROOT/$libs.tmp" -DincludeScope=runtime)
    # shellcheck disable=SC2086  # the glob names the jar that proves the resolve worked
    ls "$libs.tmp"/$jar_glob >/dev/null
    echo "$pom_sum" >"$libs.tmp/.pom.sha256"
    rm -rf "$libs"
    mv "$libs.tmp" "$libs"
}
resolve_jars kafka Kafka 'kafka_2.13-*.jar'
# One Apache Cassandra node for the history store's tests (services/cassandra/start.sh), from
# org.apache.cassandra:cassandra-all and its runtime dependencies (about 70 MB).
resolve_jars cassandra Cassandra 'cassandra-all-*.jar'
