#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the build needs when it is missing,
# then runs formatting, clippy and every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

need_packages=()
command -v cc >/dev/null 2>&1 || need_packages+=(build-essential)
command -v make >/dev/null 2>&1 || need_packages+=(make)
command -v pkg-config >/dev/null 2>&1 || need_packages+=(pkg-config)
command -v perl >/dev/null 2>&1 || need_packages+=(perl)
if ((${#need_packages[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing ${need_packages[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}"
    else
        echo "missing build tools: ${need_packages[*]}; install them (e.g. apt-get install ${need_packages[*]})" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        log "adding rustup component ${component}"
        rustup component add "${component}"
    fi
done

# Build artefacts live under the user's cache so that fresh clones (CI) reuse them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cdcflow/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log "cargo fmt --check"
cargo fmt --all -- --check

# --release everywhere: the tests, the benches and the binary share one build of librdkafka.
log "cargo clippy --all-targets -- -D warnings"
cargo clippy --release --all-targets -- -D warnings

log "cargo test"
cargo test --release

log "benchmarks build"
cargo bench --no-run

log "all tests passed"
