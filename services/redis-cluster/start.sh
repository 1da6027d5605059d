#!/usr/bin/env bash
# Start a Redis Cluster of three masters and three replicas on loopback ports
# BASE_PORT .. BASE_PORT+5 (Debian's redis-server; no Docker).
#
#   services/redis-cluster/start.sh DATA_DIR BASE_PORT
#
# Each node is started by node.sh (PID in DATA_DIR/PORT/redis.pid, log in DATA_DIR/PORT/redis.log,
# cluster-node-timeout from CHORUS_REDIS_CLUSTER_NODE_TIMEOUT_MS, default 1000 ms), then
# `redis-cli --cluster create ... --cluster-replicas 1` gives the first three the 16,384 slots
# and each a replica among the last three. Returns once every node reports cluster_state:ok and
# sees six nodes (or fails after $CHORUS_REDIS_CLUSTER_READY_TIMEOUT s, default 60, stopping
# what it started). Stop it with services/redis-cluster/stop.sh DATA_DIR: by PID, never by name.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 DATA_DIR BASE_PORT" >&2
    exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
DATA_DIR=$(cd "$1" && pwd)
BASE=$2
READY_TIMEOUT=${CHORUS_REDIS_CLUSTER_READY_TIMEOUT:-60}
REDIS_CLI=${REDIS_CLI:-redis-cli}
PORTS=()
for i in 0 1 2 3 4 5; do PORTS+=("$((BASE + i))"); done

fail() {
    echo "start.sh: $1" >&2
    "$HERE/stop.sh" "$DATA_DIR" || true
    exit 1
}

for port in "${PORTS[@]}"; do
    "$HERE/node.sh" "$DATA_DIR" "$port" || fail "node $port did not start"
done

NODES=()
for port in "${PORTS[@]}"; do NODES+=("127.0.0.1:$port"); done
"$REDIS_CLI" --cluster create "${NODES[@]}" --cluster-replicas 1 --cluster-yes \
    >"$DATA_DIR/create.log" 2>&1 || fail "redis-cli --cluster create failed: $(tail -n 20 "$DATA_DIR/create.log")"

# Ready when every node agrees: the slots are covered and all six nodes know each other.
deadline=$(($(date +%s) + READY_TIMEOUT))
while :; do
    ready=1
    for port in "${PORTS[@]}"; do
        info=$("$REDIS_CLI" -h 127.0.0.1 -p "$port" cluster info 2>/dev/null | tr -d '\r') || info=""
        if ! grep -q '^cluster_state:ok$' <<<"$info" || ! grep -q '^cluster_known_nodes:6$' <<<"$info"; then
            ready=0
            break
        fi
    done
    # replicas: each master must have its replica attached before a failover test may kill it
    if [ "$ready" = 1 ]; then
        replicas=$("$REDIS_CLI" -h 127.0.0.1 -p "$BASE" cluster nodes 2>/dev/null | grep -c ' slave ' || true)
        [ "$replicas" = 3 ] && exit 0
    fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "the cluster was not ready in ${READY_TIMEOUT}s"
    sleep 0.2
done
