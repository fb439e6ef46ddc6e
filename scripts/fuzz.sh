#!/usr/bin/env bash
# Fuzzing (docs/operations.md, "Fuzzing"): builds the cargo-fuzz targets of fuzz/ and runs each
# for CHAT_FUZZ_SECONDS on a copy of its committed corpus (fuzz/corpus/<target>/), so that a run
# never writes into the clone. Exits non-zero on the first crash (a panic, a failed property, a
# timeout or running out of memory), after printing libFuzzer's output and the crashing input.
#
#   scripts/fuzz.sh                       every target, 60 s each
#   scripts/fuzz.sh event_decode          one target
#
#   CHAT_FUZZ_SECONDS=N        seconds per target (default 60)
#   CHAT_FUZZ_SANITIZER=S      none (default: the code is safe Rust, and it runs ~4x faster and
#                              builds in half the time) or address
#   CHAT_FUZZ_TARGET_DIR=DIR   build directory, outside the clone (default ~/.cache/chat-fuzz-target)
#
# cargo-fuzz needs nightly-only flags (-Z sanitizer, sancov passes); RUSTC_BOOTSTRAP=1 lets the
# stable toolchain take them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${CHAT_FUZZ_SECONDS:-60}
sanitizer=${CHAT_FUZZ_SANITIZER:-none}
target_dir=${CHAT_FUZZ_TARGET_DIR:-$HOME/.cache/chat-fuzz-target}
targets=("$@")
((${#targets[@]})) || targets=(client_frame event_decode)

export RUSTC_BOOTSTRAP=1
unset CARGO_TARGET_DIR

if [[ $(cargo fuzz --version 2>/dev/null || true) != "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
  echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked </dev/null
fi

start=$SECONDS
for t in "${targets[@]}"; do
  [[ -f fuzz/fuzz_targets/$t.rs ]] || { echo "[fuzz] no target $t (fuzz/fuzz_targets/)" >&2; exit 2; }
done
echo "[fuzz] building ${targets[*]} (sanitizer $sanitizer, in $target_dir)"
for t in "${targets[@]}"; do
  cargo fuzz build --fuzz-dir fuzz -s "$sanitizer" --target-dir "$target_dir" "$t" </dev/null
done
echo "[fuzz] built in $((SECONDS - start)) s"
if git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet -- fuzz/Cargo.lock; then
  echo "[fuzz] note: the build updated fuzz/Cargo.lock (the workspace's dependencies changed): commit it"
fi

host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$target_dir/$host/release
work=$(mktemp -d "${TMPDIR:-/tmp}/chat-fuzz.XXXXXX")
keep_work=0
trap '((keep_work)) || rm -rf "$work"' EXIT

passed=0
for t in "${targets[@]}"; do
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
  [[ -d fuzz/corpus/$t ]] && cp -R "fuzz/corpus/$t/." "$work/$t/corpus/"
  echo "[fuzz] $t: ${seconds} s on $(find "$work/$t/corpus" -type f | wc -l) corpus inputs"
  log=$work/$t/libfuzzer.log
  rc=0
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: libFuzzer's default, stated.
  "$bin_dir/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$work/$t/artifacts/" "$work/$t/corpus" >"$log" 2>&1 </dev/null || rc=$?
  if ((rc != 0)); then
    keep_work=1
    echo "[fuzz] $t FAILED (exit $rc); libFuzzer's output:" >&2
    tail -n 80 "$log" >&2
    for a in "$work/$t/artifacts"/*; do
      [[ -f $a ]] || continue
      echo "[fuzz] crashing input: $a ($(wc -c <"$a") bytes); as base64:" >&2
      base64 -w 0 "$a" >&2
      echo >&2
      echo "[fuzz] reproduce: $bin_dir/$t '$a'  (or RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -s $sanitizer --target-dir $target_dir $t '$a')" >&2
    done
    echo "[fuzz] kept $work" >&2
    echo "fuzz: $passed passed, 1 failed"
    exit 1
  fi
  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" | sed "s/^/[fuzz] $t: /" || true
  passed=$((passed + 1))
done
echo "[fuzz] done in $((SECONDS - start)) s"
echo "fuzz: $passed passed, 0 failed"
