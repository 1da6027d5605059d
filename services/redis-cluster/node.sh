#!/usr/bin/env bash
# Start (or start again) one Redis Cluster node on loopback: Debian's redis-server with
# cluster mode on, no persistence but its cluster state (DATA_DIR/PORT/nodes.conf, so a node
# started again rejoins the cluster it was in, as a replica of whoever took over its slots).
#
#   services/redis-cluster/node.sh DATA_DIR PORT
#
# Runs the server in the background, writes its PID to DATA_DIR/PORT/redis.pid and its log to
# DATA_DIR/PORT/redis.log, and returns once it answers PING (or fails with the log's tail).
# CHORUS_REDIS_CLUSTER_NODE_TIMEOUT_MS (default 1000) is cluster-node-timeout: how long a
# master may not answer before its replica takes over (a short one for the failover tests).
# With CHORUS_REDIS_CLUSTER_PARENT_PID=PID the node is also stopped once process PID is gone.
# Stop it by its PID (kill "$(cat DATA_DIR/PORT/redis.pid)"), never by name.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DATA_DIR PORT" >&2
    exit 2
fi
PORT=$2
mkdir -p "$1/$PORT"
DIR=$(cd "$1/$PORT" && pwd)
TIMEOUT_MS=${CHORUS_REDIS_CLUSTER_NODE_TIMEOUT_MS:-1000}
REDIS_SERVER=${REDIS_SERVER:-redis-server}
REDIS_CLI=${REDIS_CLI:-redis-cli}

# cluster-require-full-coverage no: while one master is down (until its replica takes over)
# the other masters keep serving their slots instead of the whole cluster refusing.
"$REDIS_SERVER" --port "$PORT" --bind 127.0.0.1 --dir "$DIR" \
    --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout "$TIMEOUT_MS" --cluster-require-full-coverage no \
    --save "" --appendonly no --daemonize no \
    </dev/null >>"$DIR/redis.log" 2>&1 &
PID=$!
echo "$PID" >"$DIR/redis.pid"

if [ -n "${CHORUS_REDIS_CLUSTER_PARENT_PID:-}" ]; then
    (
        while kill -0 "$CHORUS_REDIS_CLUSTER_PARENT_PID" 2>/dev/null && kill -0 "$PID" 2>/dev/null; do
            sleep 1
        done
        kill "$PID" 2>/dev/null || true
    ) </dev/null >/dev/null 2>&1 &
fi

for _ in $(seq 1 300); do
    if [ "$("$REDIS_CLI" -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = "PONG" ]; then
        exit 0
    fi
    if ! kill -0 "$PID" 2>/dev/null; then
        break
    fi
    sleep 0.05
done
echo "node.sh: redis-server on port $PORT did not start; last lines of $DIR/redis.log:" >&2
tail -n 40 "$DIR/redis.log" >&2
kill "$PID" 2>/dev/null || true
exit 1
