#!/usr/bin/env bash
# Stop every node that services/redis-cluster/start.sh (or node.sh) started under DATA_DIR, by
# the PIDs in DATA_DIR/*/redis.pid (checked to still be a redis-server), never by name.
#
#   services/redis-cluster/stop.sh DATA_DIR
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 DATA_DIR" >&2
    exit 2
fi
pids=()
for file in "$1"/*/redis.pid; do
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q redis-server; then
        kill "$pid" 2>/dev/null && pids+=("$pid")
    fi
done
for _ in $(seq 1 100); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && exit 0
    sleep 0.05
done
for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
exit 0
