#!/usr/bin/env bash
# Runs the platform in cluster mode on this machine: starts Kafka, Cassandra, Redis and S3 on
# 127.0.0.1 (installing and fetching what is missing, see scripts/services.sh), then one projection
# worker and one gateway node on http://127.0.0.1:${CHAT_PORT:-8080}. (The default, embedded mode
# needs none of this: `cargo run --release`.) Ctrl-C stops the gateway and the worker (the
# worker commits its offsets first), then the services (CHAT_KEEP_SERVICES=1 keeps them running;
# `scripts/services.sh down [--wipe]` stops them later).
#
# The settings of this cluster are written to ~/.cache/chat-services/cluster.env: `source` it in
# another shell to point the `chat` tools (replay, audit, rebuild, ...) at this cluster instead of
# the embedded ./chat-data (each tool says on stderr which one it reads).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ${CHAT_KEEP_SERVICES:-0} != 1 ]]; then
  trap 'bash scripts/services.sh down || true' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
bash scripts/services.sh up
eval "$(bash scripts/services.sh env)"
export CHAT_KAFKA_BROKERS="$CHAT_TEST_KAFKA"
export CHAT_CASSANDRA_NODES="$CHAT_TEST_CASSANDRA"
export CHAT_REDIS_URL="$CHAT_TEST_REDIS"
export CHAT_S3_ENDPOINT="$CHAT_TEST_S3_ENDPOINT" CHAT_S3_BUCKET="$CHAT_TEST_S3_BUCKET"
export CHAT_S3_ACCESS_KEY="$CHAT_TEST_S3_ACCESS_KEY" CHAT_S3_SECRET_KEY="$CHAT_TEST_S3_SECRET_KEY"
export CHAT_S3_REGION="$CHAT_TEST_S3_REGION"
export CHAT_LISTEN="${CHAT_LISTEN:-127.0.0.1:${CHAT_PORT:-8080}}"
# A stable secret for this machine, so tokens survive restarts.
secret_file="${CHAT_SERVICES_HOME:-$HOME/.cache/chat-services}/token-secret"
if [[ -z ${CHAT_TOKEN_SECRET:-} ]]; then
  [[ -s $secret_file ]] || head -c 48 /dev/urandom | base64 | tr -d '\n/+=' >"$secret_file"
  CHAT_TOKEN_SECRET="$(cat "$secret_file")"
  export CHAT_TOKEN_SECRET
fi

env_file="${CHAT_SERVICES_HOME:-$HOME/.cache/chat-services}/cluster.env"
(umask 077 && for v in CHAT_KAFKA_BROKERS CHAT_CASSANDRA_NODES CHAT_REDIS_URL CHAT_S3_ENDPOINT CHAT_S3_BUCKET \
    CHAT_S3_ACCESS_KEY CHAT_S3_SECRET_KEY CHAT_S3_REGION CHAT_TOKEN_SECRET; do
  printf 'export %s=%q\n' "$v" "${!v}"
done >"$env_file")
echo "[run-cluster] this cluster's settings are in $env_file: \`source $env_file\` in another shell, then run the chat tools there"

cargo build --release --locked --bin chat
bin="${CARGO_TARGET_DIR:-target}/release/chat"
"$bin" migrate
"$bin" worker &
worker=$!
stop_worker='kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true'
if [[ ${CHAT_KEEP_SERVICES:-0} != 1 ]]; then
  trap "$stop_worker; bash scripts/services.sh down || true" EXIT
else
  trap "$stop_worker" EXIT
fi
"$bin" gateway
