#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, from the committed corpus:
#   fuzz/run.sh 600                 # ten minutes per target
#   fuzz/run.sh 30 decode_plain     # one target, 30 s
# Needs nightly Rust and cargo-fuzz; installs both (under ~/.rustup and ~/.cargo) when missing.
# New inputs go to a working corpus under ~/.cache/cdcflow/fuzz-corpus, never into the
# repository; a crash stops the run and names its reproducer. Turn every crash into a
# regression test (see fuzz/README.md). Prints, per target, the runs and the coverage reached.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "usage: fuzz/run.sh SECONDS [TARGET...]" >&2; exit 2; }
shift || true
targets=("$@")
((${#targets[@]})) || targets=(decode_plain decode_wrapped kcat_line config rule_compiler)

log() { printf '\n== %s\n' "$*" >&2; }

if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cache="$HOME/.cache/cdcflow"
export CARGO_TARGET_DIR="${CDCFLOW_FUZZ_TARGET_DIR:-$cache/fuzz-target}"
log "building the fuzz targets (nightly, libFuzzer coverage, no sanitizer)"
cargo +nightly fuzz build --fuzz-dir fuzz --sanitizer none

for target in "${targets[@]}"; do
    work="$cache/fuzz-corpus/$target"
    artifacts="$cache/fuzz-artifacts/$target"
    mkdir -p "$work" "$artifacts"
    log "fuzzing $target for ${seconds}s (corpus fuzz/corpus/$target, new inputs in $work)"
    output="$(mktemp)"
    if ! cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none "$target" "$work" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" >"$output" 2>&1; then
        tail -n 60 "$output" >&2
        echo "fuzz target $target failed; reproducer(s) in $artifacts:" >&2
        ls -1 "$artifacts" >&2
        echo "rerun one with: cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none $target <file>" >&2
        exit 1
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$output" | grep -o '[0-9]*$' || echo '?')"
    coverage="$(grep -o 'cov: [0-9]*' "$output" | tail -n 1 || echo 'cov: ?')"
    corpus_size="$(find "$work" -type f | wc -l)"
    printf '%-16s %ss: %s runs, %s, working corpus %s inputs, no crash\n' \
        "$target" "$seconds" "$runs" "$coverage" "$corpus_size"
    rm -f -- "$output"
done
