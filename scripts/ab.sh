#!/usr/bin/env bash
# One A/B run of a `chat` build under the load generator, on a fresh data directory (embedded)
# or fresh keyspace, topics and Redis prefix (cluster: Kafka, Cassandra and Redis already up, as
# `bash scripts/services.sh up` starts them). Prints the load generator's summary line.
#
#   bash scripts/ab.sh embedded|cluster CHAT_BINARY TAG [chat-loadgen arguments...]
#
# e.g. alternate two builds:
#   for i in 1 2; do for b in old new; do
#     bash scripts/ab.sh embedded /tmp/chat-$b $b-$i --receipts direct --pairs 200 --rate 1000 --duration 20s
#   done; done
# CHAT_LOADGEN names the load generator (default: chat-loadgen of the release target directory);
# the run's files are in /tmp/chat-ab/TAG (server.log, lg.log, out.json, metrics.txt).
set -euo pipefail
mode=$1 bin=$2 tag=$3
shift 3
target=${CARGO_TARGET_DIR:-$HOME/.cache/chat-target}
loadgen=${CHAT_LOADGEN:-$target/release/chat-loadgen}
port=${CHAT_AB_PORT:-8190}
d=/tmp/chat-ab/$tag
rm -rf "$d"
mkdir -p "$d"
env=(CHAT_LOG=info CHAT_REGISTRATIONS_PER_ADDRESS=0 CHAT_SENDS_PER_USER_PER_SEC=0)
case $mode in
  embedded) args=(--listen "127.0.0.1:$port" --data-dir "$d/data" run) ;;
  cluster)
    ks=ab_$(tr -c 'a-z0-9' '_' <<<"$tag" | head -c 24)_$RANDOM
    eval "$(bash "$(dirname "$0")/services.sh" env)"
    env+=(CHAT_KAFKA_BROKERS="$CHAT_TEST_KAFKA" CHAT_CASSANDRA_NODES="$CHAT_TEST_CASSANDRA" CHAT_REDIS_URL="$CHAT_TEST_REDIS"
      CHAT_KEYSPACE="$ks" CHAT_TOPIC_PREFIX="$ks." CHAT_REDIS_PREFIX="$ks:" CHAT_TOKEN_SECRET="ab-token-secret-$ks-0123456789abcdef0123456789"
      CHAT_MEDIA_DIR="$d/media" CHAT_SEARCH_DIR="$d/search")
    args=(--listen "127.0.0.1:$port" run) ;;
  *) echo "mode is embedded or cluster" >&2; exit 2 ;;
esac
env "${env[@]}" "$bin" "${args[@]}" >"$d/server.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 240); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.5; done
"$loadgen" --url "http://127.0.0.1:$port" --server-pid "$pid" --sources 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 --out "$d/out.json" "$@" 2>"$d/lg.log" >/dev/null || true
curl -s "http://127.0.0.1:$port/metrics" >"$d/metrics.txt" || true
echo "$tag: $(tail -1 "$d/lg.log")"
