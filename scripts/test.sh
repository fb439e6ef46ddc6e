#!/usr/bin/env bash
# The project's test command: starts the real services (Kafka, Cassandra, Redis and an
# S3-compatible store, SeaweedFS, on 127.0.0.1: see scripts/services.sh), points the tests at
# them through CHAT_TEST_* variables (CHAT_TEST_S3_* for media), runs the
# whole workspace's tests, and stops the services again on exit.
#
#   scripts/test.sh                          all tests
#   scripts/test.sh some_filter              cargo arguments (a test-name filter, --release, ...)
#   scripts/test.sh -- --nocapture           arguments after `--` go to the test binaries
#
#   CHAT_KEEP_SERVICES=1   leave the services running afterwards (faster next run)
#   CHAT_TEST_THREADS=N    test threads per test binary (default 2: the machines have 2 cores)
#   CHAT_FUZZ_SECONDS=N    seconds per fuzz target on a full run (default 60; 0 skips fuzzing)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Split our arguments at the first `--`: before it for cargo, after it for the test binaries.
cargo_args=()
test_args=()
while (($#)); do
  if [[ $1 == -- ]]; then
    shift
    test_args=("$@")
    break
  fi
  cargo_args+=("$1")
  shift
done

# What the services need and this machine cannot get (Go for SeaweedFS, apt for Java, Maven,
# Redis), said up front, before anything is downloaded or built.
bash scripts/services.sh check || {
  echo "[test] the services of the end-to-end tests cannot be set up here (above); README.md, \"Prerequisites\"" >&2
  exit 1
}

# A full run starts with the fuzz targets (scripts/fuzz.sh: the client frame parser and the
# event decoder, from their committed corpora), before the services take the machine's memory.
if ((${#cargo_args[@]} == 0)) && [[ ${CHAT_FUZZ_SECONDS:-60} != 0 ]]; then
  bash scripts/fuzz.sh
fi

# Install the trap before `up`, so that a half-started set of services is stopped too.
if [[ ${CHAT_KEEP_SERVICES:-0} != 1 ]]; then
  trap 'bash scripts/services.sh down || true' EXIT
  # Make Ctrl-C / a CI cancel go through the EXIT trap as well.
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi

bash scripts/services.sh up
eval "$(bash scripts/services.sh env)"

# The WebSocket conformance test drives the Autobahn TestSuite's cases with `kosoku` (PyPI),
# installed once into a virtualenv beside the services (outside the clone).
KOSOKU_VERSION=0.1.0
kosoku_venv="${CHAT_SERVICES_HOME:-$HOME/.cache/chat-services}/kosoku-$KOSOKU_VERSION"
if [[ ! -x $kosoku_venv/bin/kosoku ]]; then
  echo "[test] installing kosoku $KOSOKU_VERSION into $kosoku_venv"
  rm -rf "$kosoku_venv"
  python3 -m venv "$kosoku_venv"
  "$kosoku_venv/bin/pip" install -q --disable-pip-version-check "kosoku==$KOSOKU_VERSION" </dev/null
fi
export CHAT_TEST_KOSOKU="$kosoku_venv/bin/kosoku"
env | grep '^CHAT_TEST_' | sort

# --locked only when there is a lock file to hold the build to.
locked=()
[[ -f Cargo.lock ]] && locked=(--locked)

cargo test --workspace "${locked[@]}" "${cargo_args[@]}" \
  -- --test-threads="${CHAT_TEST_THREADS:-2}" "${test_args[@]}"
