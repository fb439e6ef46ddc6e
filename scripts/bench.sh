#!/usr/bin/env bash
# Runs the benchmark set against a release build, prints the goal-vs-measured table and rewrites
# the results section of docs/benchmarks.md (between the `bench:begin` / `bench:end` markers).
#
#   scripts/bench.sh              embedded and cluster, full length (about 35 minutes)
#   scripts/bench.sh --quick      shorter runs (about 15 minutes; the sustained run lasts 1 minute)
#   BENCH_MODES=embedded scripts/bench.sh --quick
#   BENCH_ONLY="idle group" scripts/bench.sh   some of the parts (idle, direct, group, sustain),
#                                              into an existing $BENCH_OUT to update its table
#
# Every run is `chat-loadgen` (crates/loadgen) against a freshly started `chat` process on
# 127.0.0.1:8190, with the clients on 127.0.0.2-5. Cluster mode starts Kafka, Cassandra and Redis
# through scripts/services.sh (and leaves them running; `scripts/services.sh down` stops them)
# and gives every server start its own keyspace, topic prefix and Redis prefix.
# The JSON of every run is kept in $BENCH_OUT (default ~/.cache/chat-bench/<time>).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=0
[[ ${1:-} == --quick ]] && quick=1
modes="${BENCH_MODES:-embedded cluster}"
only=" ${BENCH_ONLY:-idle direct group sustain} "
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/chat-target}"
out="${BENCH_OUT:-$HOME/.cache/chat-bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
port=8190
url="http://127.0.0.1:$port"
sources=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
if ((quick)); then step=10s sustain=60s; else step=20s sustain=600s; fi

cargo build --release --locked -p chat -p chat-loadgen
bin="$CARGO_TARGET_DIR/release"
server_pid=""

stop_server() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# start_server MODE TAG: a fresh server (fresh data directory, or fresh keyspace and topics).
start_server() {
  local mode=$1 tag=$2
  stop_server
  local args=(--listen "127.0.0.1:$port")
  if [[ $mode == embedded ]]; then
    rm -rf "$out/data-$tag"
    args+=(--data-dir "$out/data-$tag")
  else
    local p="b$(date +%s)${tag//[^a-z0-9]/}"
    args+=(--kafka-brokers "$CHAT_TEST_KAFKA" --cassandra-nodes "$CHAT_TEST_CASSANDRA" --redis-url "$CHAT_TEST_REDIS")
    args+=(--keyspace "$p" --topic-prefix "$p." --redis-prefix "$p:" --media-dir "$out/media-$tag")
    "$bin/chat" "${args[@]}" migrate >>"$out/server-$mode-$tag.log" 2>&1
  fi
  # The load generator registers thousands of users from four addresses, and its senders send
  # up to 100 messages a second each.
  CHAT_REGISTRATIONS_PER_ADDRESS=0 CHAT_SENDS_PER_USER_PER_SEC=0 "$bin/chat" "${args[@]}" run >>"$out/server-$mode-$tag.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 240); do
    curl -sf "$url/readyz" >/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.5
  done
  echo "server ($mode) did not become ready; see $out/server-$mode-$tag.log" >&2
  exit 1
}

# lg MODE NAME ARGS...: one load-generator run, JSON to $out/MODE-NAME.json, summary to stdout.
lg() {
  local mode=$1 name=$2
  shift 2
  local svc=()
  [[ $mode == cluster ]] && svc=(--service-pids "$service_pids")
  "$bin/chat-loadgen" --url "$url" --server-pid "$server_pid" --sources "$sources" "${svc[@]}" \
    --out "$out/$mode-$name.json" "$@" 2>"$out/$mode-$name.log" >/dev/null
  echo "$mode $name: $(tail -1 "$out/$mode-$name.log")"
}

# ok JSON: kept up with the offered rate: delivered it (within 2 %, over the time the deliveries
# really took), lost nothing, and no message waited a second.
ok() {
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d["lost"]==0 and d["delivered_per_second"]>=0.98*d["offered_rate"] and d["latency_ms"]["p99"]<1000 else 1)' "$1"
}

# projections_ok JSON: the projections kept up as the sustained goal asks (projection lag p99
# at most 100 ms).
projections_ok() {
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); p=d.get("projection_delay_ms") or {}; sys.exit(0 if p.get("p99") is not None and p["p99"]<=100 else 1)' "$1"
}

for mode in $modes; do
  service_pids=""
  if [[ $mode == cluster ]]; then
    bash scripts/services.sh up
    eval "$(bash scripts/services.sh env)"
    service_pids="$(pgrep -d, -f 'kafka\.Kafka|CassandraDaemon|redis-server' || true)"
    # Warm-up, not in the table: right after it starts, Cassandra (JIT, caches) is several times
    # slower for about a minute, and a ladder started then stops at its first rung.
    start_server "$mode" warmup
    lg "$mode" warmup direct --pairs 200 --rate 250 --duration 45s
  fi
  goal=20000
  [[ $mode == cluster ]] && goal=10000

  # Idle connections: memory per connection at 19,000, then accepts while they are held.
  if [[ $only == *" idle "* ]]; then
    start_server "$mode" idle
    lg "$mode" idle idle --connections 19000 --processes 2 --hold 15s --churn 4000
  fi

  # One-to-one: a ladder of offered rates (stops once the server no longer keeps up), then the
  # goal rate whatever the ladder found.
  if [[ $only == *" direct "* ]]; then
    start_server "$mode" direct
    best=0
    sustainable=0
    for rate in 250 500 1000 2000 4000 8000 16000; do
      ((rate >= goal)) && break
      lg "$mode" "direct-$rate" direct --pairs 200 --rate "$rate" --duration "$step" --probe-projections
      if ok "$out/$mode-direct-$rate.json"; then best=$rate; else break; fi
      projections_ok "$out/$mode-direct-$rate.json" && sustainable=$rate
    done
    lg "$mode" "direct-$goal" --drain 180s direct --pairs 200 --rate "$goal" --duration 10s
    ok "$out/$mode-direct-$goal.json" && best=$goal
    echo "$best" >"$out/$mode-best-rate"
    echo "$sustainable" >"$out/$mode-sustainable-rate"

    # The loss and duplicate counters catch what they should: 5 deliveries dropped, 3 doubled.
    lg "$mode" selftest --inject-loss 5 --inject-dup 3 direct --pairs 10 --rate 100 --duration 5s
  fi

  # Group fan-out: a message to 100 and to 1,024 members.
  if [[ $only == *" group "* ]]; then
    start_server "$mode" group
    lg "$mode" group-100 group --groups 1 --size 100 --rate 20 --duration "$step"
    lg "$mode" group-1024 group --groups 1 --size 1024 --rate 2 --duration "$step"
  fi

  # The whole pipeline for a sustained period at the highest rate of the ladder at which the
  # projections kept up too (else the highest at which deliveries kept up), with the projection
  # delay sampled (ack -> the receipts table has the message). BENCH_SUSTAIN_RATE overrides it.
  best="$(cat "$out/$mode-sustainable-rate" 2>/dev/null || echo 0)"
  ((best > 0)) || best="$(cat "$out/$mode-best-rate" 2>/dev/null || echo 0)"
  best="${BENCH_SUSTAIN_RATE:-$best}"
  if [[ $only == *" sustain "* ]] && ((best > 0)); then
    start_server "$mode" sustain
    lg "$mode" sustain direct --pairs 200 --rate "$best" --duration "$sustain" --probe-projections
  fi
  stop_server
done

python3 scripts/bench_table.py "$out" docs/benchmarks.md
echo "results: $out"
