#!/usr/bin/env bash
# Start one Apache Cassandra node on loopback (a single-node cluster) for tests and local runs.
#
#   services/cassandra/start.sh DATA_DIR PORT
#
# PORT is the CQL (native protocol) port. The node also binds an inter-node storage port:
# $CHORUS_CASSANDRA_STORAGE_PORT, default PORT+1 (remembered in DATA_DIR/storage_port, so a
# restart with the same arguments binds the same one). $CHORUS_CASSANDRA_HEAP sets the heap
# (default "-Xms512m -Xmx512m"), $CHORUS_CASSANDRA_JVM_OPTS adds JVM options (word-split) and
# $CHORUS_CASSANDRA_EXTRA_YAML adds lines to cassandra.yaml.
#
# Renders DATA_DIR/cassandra.yaml from cassandra.yaml.in, starts CassandraDaemon in the
# background, writes its PID to DATA_DIR/cassandra.pid and its log to DATA_DIR/cassandra.log,
# then waits until CQL answers: an OPTIONS request on PORT gets SUPPORTED back. Exits non-zero
# with the log tail if that does not happen within $CHORUS_CASSANDRA_READY_TIMEOUT seconds
# (default 120). Restarting with the same DATA_DIR keeps the keyspaces and their data.
# Stop it by its PID (kill "$(cat DATA_DIR/cassandra.pid)"), never by name. With
# CHORUS_CASSANDRA_PARENT_PID=PID the node is also stopped once process PID has exited.
#
# The jars come from $CHORUS_CASSANDRA_LIBS (default: .services/cassandra/libs under the
# repository), filled by scripts/install-test-deps.sh from services/cassandra/pom.xml.
# Cassandra 5.0 runs on Java 11 or 17; $JAVA overrides the `java` on PATH.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DATA_DIR PORT" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
mkdir -p "$1"
DATA_DIR=$(cd "$1" && pwd)
PORT=$2
LIBS=${CHORUS_CASSANDRA_LIBS:-$ROOT/.services/cassandra/libs}
JAVA=${JAVA:-java}
READY_TIMEOUT=${CHORUS_CASSANDRA_READY_TIMEOUT:-120}
HEAP=${CHORUS_CASSANDRA_HEAP:--Xms512m -Xmx512m}
if [ -n "${CHORUS_CASSANDRA_STORAGE_PORT:-}" ]; then
    STORAGE_PORT=$CHORUS_CASSANDRA_STORAGE_PORT
elif [ -f "$DATA_DIR/storage_port" ]; then
    STORAGE_PORT=$(cat "$DATA_DIR/storage_port")
else
    STORAGE_PORT=$((PORT + 1))
fi
echo "$STORAGE_PORT" >"$DATA_DIR/storage_port"

PID_FILE=$DATA_DIR/cassandra.pid
LOG_FILE=$DATA_DIR/cassandra.log
YAML=$DATA_DIR/cassandra.yaml

if ! ls "$LIBS"/cassandra-all-*.jar >/dev/null 2>&1; then
    echo "start.sh: no Cassandra jars in $LIBS; run scripts/install-test-deps.sh first" >&2
    exit 1
fi
running() { [ -r "/proc/$1/stat" ] && ! grep -q ') Z ' "/proc/$1/stat"; } # zombies are dead
if [ -f "$PID_FILE" ] && running "$(cat "$PID_FILE")" \
        && tr '\0' ' ' <"/proc/$(cat "$PID_FILE")/cmdline" 2>/dev/null | grep -q CassandraDaemon; then
    echo "start.sh: a node already runs from $DATA_DIR (pid $(cat "$PID_FILE"))" >&2
    exit 1
fi
rm -f "$PID_FILE"

sed -e "s#@PORT@#$PORT#g" -e "s#@STORAGE_PORT@#$STORAGE_PORT#g" -e "s#@DATA@#$DATA_DIR#g" \
    "$HERE/cassandra.yaml.in" >"$YAML"
if [ -n "${CHORUS_CASSANDRA_EXTRA_YAML:-}" ]; then
    printf '%s\n' "$CHORUS_CASSANDRA_EXTRA_YAML" >>"$YAML"
fi

# What the distribution's conf/jvm17-server.options opens for Cassandra 5.0 (it reaches into
# the JDK's internals for off-heap memory, direct buffers and its own instrumentation).
JDK_OPENS=(
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
    --add-exports java.base/jdk.internal.ref=ALL-UNNAMED
    --add-exports java.base/sun.nio.ch=ALL-UNNAMED
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
    --add-exports java.sql/java.sql=ALL-UNNAMED
    --add-exports java.base/java.lang.ref=ALL-UNNAMED
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
    --add-opens java.base/java.lang.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens java.base/java.io=ALL-UNNAMED
    --add-opens java.base/java.nio=ALL-UNNAMED
    --add-opens java.base/java.util.concurrent=ALL-UNNAMED
    --add-opens java.base/java.util=ALL-UNNAMED
    --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED
    --add-opens java.base/java.lang=ALL-UNNAMED
    --add-opens java.base/java.math=ALL-UNNAMED
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens java.base/java.net=ALL-UNNAMED
)
# A single seed node: nothing to gossip with, so skip the waits a cluster member needs.
FAST_START=(
    -Dcassandra.skip_wait_for_gossip_to_settle=0
    -Dcassandra.ring_delay_ms=0
    -Dcassandra.auto_bootstrap=false
)
JAMM=$(ls "$LIBS"/jamm-*.jar | head -n1)

t0=$(date +%s%N)
# The node. stdin/stdout/stderr are detached from the caller so that a caller that captures
# this script's output (subprocess.run) returns when the script exits. No JMX port is opened
# (neither cassandra.jmx.local.port nor .remote.port is set): the tests do not use nodetool.
# shellcheck disable=SC2086
"$JAVA" $HEAP -XX:+UseG1GC -XX:+ExitOnOutOfMemoryError \
    -Xss256k -XX:+AlwaysPreTouch -Djava.awt.headless=true -Djdk.attach.allowAttachSelf=true \
    "${JDK_OPENS[@]}" "-javaagent:$JAMM" "${FAST_START[@]}" ${CHORUS_CASSANDRA_JVM_OPTS:-} \
    -Dcassandra-foreground=yes -Dcassandra.config="file://$YAML" \
    -Dcassandra.storagedir="$DATA_DIR" -Dcassandra.logdir="$DATA_DIR" \
    -Dlogback.configurationFile="file://$HERE/logback.xml" \
    -cp "$LIBS/*" org.apache.cassandra.service.CassandraDaemon </dev/null >>"$LOG_FILE" 2>&1 &
NODE_PID=$!
echo "$NODE_PID" >"$PID_FILE"

# Optional watchdog: with CHORUS_CASSANDRA_PARENT_PID set (the test runner does), the node is
# stopped when that process is gone, e.g. if pytest itself is killed and can't clean up.
if [ -n "${CHORUS_CASSANDRA_PARENT_PID:-}" ]; then
    (
        while running "$CHORUS_CASSANDRA_PARENT_PID" && running "$NODE_PID"; do sleep 1; done
        kill "$NODE_PID" 2>/dev/null || true
    ) </dev/null >/dev/null 2>&1 &
fi

fail() {
    echo "start.sh: $1; last lines of $LOG_FILE:" >&2
    tail -n 60 "$LOG_FILE" >&2
    kill "$NODE_PID" 2>/dev/null || true
    exit 1
}

# CQL answers = an OPTIONS frame (protocol v4 request header: version 0x04, flags 0, stream 1,
# opcode 0x05, body length 0) gets a response whose opcode (the 5th byte) is 0x06 SUPPORTED.
cql_answers() {
    local reply
    reply=$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1
        printf "\x04\x00\x00\x01\x05\x00\x00\x00\x00" >&3
        head -c 5 <&3 | od -An -tx1' "$PORT" 2>/dev/null) || return 1
    [ "$(echo "$reply" | awk '{print $5}')" = 06 ]
}

deadline=$(($(date +%s) + READY_TIMEOUT))
until cql_answers; do
    running "$NODE_PID" || fail "the node exited during startup"
    [ "$(date +%s)" -lt "$deadline" ] || fail "CQL on port $PORT did not answer after ${READY_TIMEOUT}s"
    sleep 0.3
done
echo "cassandra ready on 127.0.0.1:$PORT (pid $NODE_PID, $((($(date +%s%N) - t0) / 1000000)) ms)"
