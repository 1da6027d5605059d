#!/usr/bin/env bash
# Start a single-node KRaft Apache Kafka broker (broker + controller in one JVM) on loopback,
# or one node of a small KRaft cluster.
#
#   services/kafka/start.sh DATA_DIR PORT CONTROLLER_PORT
#
# A cluster node (tests/services.py start_kafka_cluster starts three) is set by the environment:
# CHORUS_KAFKA_NODE_ID (default 1), CHORUS_KAFKA_VOTERS (the static quorum, "1@127.0.0.1:P1,..."),
# CHORUS_KAFKA_CLUSTER_ID (the same on every node: formatted with it), CHORUS_KAFKA_REPLICAS
# (default and internal topics' replication factor; min.insync.replicas is one less, at least 1),
# CHORUS_KAFKA_HEAP (default "-Xms256m -Xmx512m"), CHORUS_KAFKA_EXTRA_PROPS (lines appended to
# server.properties) and CHORUS_KAFKA_READY=port (ready once the client port is open: a node
# cannot create a replicated topic before the others are up, so the caller does that).
#
# Formats DATA_DIR/data on first use (skipped when it already holds meta.properties, so a
# restart with the same arguments keeps the topics and offsets), starts `kafka.Kafka` in the
# background, writes its PID to DATA_DIR/kafka.pid and its log to DATA_DIR/kafka.log, then
# waits until the broker can create a topic: `comments` with 4 partitions (or
# $CHORUS_KAFKA_TOPIC / $CHORUS_KAFKA_PARTITIONS). Exits non-zero with the log tail if the
# broker is not ready within $CHORUS_KAFKA_READY_TIMEOUT seconds (default 90).
# Stop it by its PID (kill "$(cat DATA_DIR/kafka.pid)"), never by name. With
# CHORUS_KAFKA_PARENT_PID=PID the broker is also stopped once process PID has exited.
#
# The jars come from $CHORUS_KAFKA_LIBS (default: .services/kafka/libs under the repository),
# filled by scripts/install-test-deps.sh from services/kafka/pom.xml. Java 17+ is required;
# $JAVA overrides the `java` on PATH.
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 DATA_DIR PORT CONTROLLER_PORT" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
mkdir -p "$1"
DATA_DIR=$(cd "$1" && pwd)
PORT=$2
CONTROLLER_PORT=$3
LIBS=${CHORUS_KAFKA_LIBS:-$ROOT/.services/kafka/libs}
JAVA=${JAVA:-java}
TOPIC=${CHORUS_KAFKA_TOPIC:-comments}
PARTITIONS=${CHORUS_KAFKA_PARTITIONS:-4}
READY_TIMEOUT=${CHORUS_KAFKA_READY_TIMEOUT:-90}
NODE_ID=${CHORUS_KAFKA_NODE_ID:-1}
VOTERS=${CHORUS_KAFKA_VOTERS:-$NODE_ID@127.0.0.1:$CONTROLLER_PORT}
REPLICAS=${CHORUS_KAFKA_REPLICAS:-1}
MIN_ISR=$((REPLICAS > 1 ? REPLICAS - 1 : 1))
HEAP=${CHORUS_KAFKA_HEAP:--Xms256m -Xmx512m}

PID_FILE=$DATA_DIR/kafka.pid
LOG_FILE=$DATA_DIR/kafka.log
PROPS=$DATA_DIR/server.properties
LOG_DIR=$DATA_DIR/data

if ! ls "$LIBS"/kafka_2.13-*.jar >/dev/null 2>&1; then
    echo "start.sh: no Kafka jars in $LIBS; run scripts/install-test-deps.sh first" >&2
    exit 1
fi
CP="$LIBS/*"
running() { [ -r "/proc/$1/stat" ] && ! grep -q ') Z ' "/proc/$1/stat"; } # zombies are dead
# Short-lived tool JVMs: client compiler only and a small heap start noticeably faster.
TOOL_JVM=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto)

if [ -f "$PID_FILE" ] && running "$(cat "$PID_FILE")" \
        && tr '\0' ' ' <"/proc/$(cat "$PID_FILE")/cmdline" 2>/dev/null | grep -q kafka.Kafka; then
    echo "start.sh: a broker already runs from $DATA_DIR (pid $(cat "$PID_FILE"))" >&2
    exit 1
fi
rm -f "$PID_FILE"

# Render the config on every start (the ports are the same on a restart).
sed -e "s#@PORT@#$PORT#g" -e "s#@CONTROLLER_PORT@#$CONTROLLER_PORT#g" -e "s#@LOG_DIR@#$LOG_DIR#g" \
    -e "s#@NODE_ID@#$NODE_ID#g" -e "s#@VOTERS@#$VOTERS#g" -e "s#@REPLICAS@#$REPLICAS#g" \
    -e "s#@MIN_ISR@#$MIN_ISR#g" "$HERE/server.properties.in" >"$PROPS"
if [ -n "${CHORUS_KAFKA_EXTRA_PROPS:-}" ]; then
    printf '%s\n' "$CHORUS_KAFKA_EXTRA_PROPS" >>"$PROPS"
fi

# log4j2 config: INFO to stdout (redirected to kafka.log), chatty loggers at WARN.
cat >"$DATA_DIR/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
EOF
LOG4J="-Dlog4j2.configurationFile=file:$DATA_DIR/log4j2.properties"

t0=$(date +%s%N)
if [ ! -f "$LOG_DIR/meta.properties" ]; then
    # A cluster id is 16 random bytes in URL-safe base64 without padding (22 characters),
    # what `StorageTool random-uuid` prints; made here to save a JVM start. Like Kafka, avoid
    # a leading '-' so it can't be read as a flag.
    CLUSTER_ID=${CHORUS_KAFKA_CLUSTER_ID:--}
    while [ "${CLUSTER_ID#-}" != "$CLUSTER_ID" ]; do
        CLUSTER_ID=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)
    done
    # kafka.tools.StorageTool lives in the kafka_2.13 jar (checked for 4.1.1 with unzip -l).
    "$JAVA" "${TOOL_JVM[@]}" "$LOG4J" -cp "$CP" kafka.tools.StorageTool format \
        -t "$CLUSTER_ID" -c "$PROPS" >>"$LOG_FILE" 2>&1 || {
        echo "start.sh: formatting $LOG_DIR failed:" >&2
        tail -n 30 "$LOG_FILE" >&2
        exit 1
    }
fi

# The broker. Its stdin/stdout/stderr are detached from the caller so that a caller that
# captures this script's output (subprocess.run) returns when the script exits.
# $CHORUS_KAFKA_JVM_OPTS adds JVM options (word-split), e.g. -XX:TieredStopAtLevel=1.
# shellcheck disable=SC2086
"$JAVA" $HEAP -XX:+UseSerialGC -Djava.awt.headless=true ${CHORUS_KAFKA_JVM_OPTS:-} \
    "$LOG4J" -cp "$CP" kafka.Kafka "$PROPS" </dev/null >>"$LOG_FILE" 2>&1 &
BROKER_PID=$!
echo "$BROKER_PID" >"$PID_FILE"

# Optional watchdog: with CHORUS_KAFKA_PARENT_PID set (the test runner does), the broker is
# stopped when that process is gone, e.g. if pytest itself is killed and can't clean up.
if [ -n "${CHORUS_KAFKA_PARENT_PID:-}" ]; then
    (
        while running "$CHORUS_KAFKA_PARENT_PID" && running "$BROKER_PID"; do sleep 1; done
        kill "$BROKER_PID" 2>/dev/null || true
    ) </dev/null >/dev/null 2>&1 &
fi

fail() {
    echo "start.sh: $1; last lines of $LOG_FILE:" >&2
    tail -n 60 "$LOG_FILE" >&2
    kill "$BROKER_PID" 2>/dev/null || true
    exit 1
}

deadline=$(($(date +%s) + READY_TIMEOUT))
# 1) cheap wait until the client listener accepts connections (bash's /dev/tcp)
until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
    running "$BROKER_PID" || fail "the broker exited during startup"
    [ "$(date +%s)" -lt "$deadline" ] || fail "port $PORT not open after ${READY_TIMEOUT}s"
    sleep 0.2
done
if [ "${CHORUS_KAFKA_READY:-}" = port ]; then
    echo "kafka node $NODE_ID listening on 127.0.0.1:$PORT (pid $BROKER_PID, $((($(date +%s%N) - t0) / 1000000)) ms)"
    exit 0
fi
# 2) readiness = a topic can be created (on a restart the topic exists: --if-not-exists still
#    needs a working metadata round trip with the broker). Short client timeouts, so that one
#    attempt cannot outlast the deadline by the admin client's default 60 s.
printf 'request.timeout.ms=5000\ndefault.api.timeout.ms=10000\n' >"$DATA_DIR/admin.properties"
until "$JAVA" "${TOOL_JVM[@]}" "$LOG4J" -cp "$CP" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "127.0.0.1:$PORT" --command-config "$DATA_DIR/admin.properties" \
        --create --if-not-exists --topic "$TOPIC" --partitions "$PARTITIONS" \
        --replication-factor 1 >>"$LOG_FILE" 2>&1; do
    running "$BROKER_PID" || fail "the broker exited during startup"
    [ "$(date +%s)" -lt "$deadline" ] || fail "no topic could be created after ${READY_TIMEOUT}s"
    sleep 0.5
done
echo "kafka ready on 127.0.0.1:$PORT (pid $BROKER_PID, $((($(date +%s%N) - t0) / 1000000)) ms)"
