#!/usr/bin/env bash
# Turns the benchmarks' JSON results into the results section of docs/performance.md (between
# its <!-- results:begin --> and <!-- results:end --> markers) and the chart docs/performance.png.
#
#   benches/render.sh                      # reads $CDCFLOW_BENCH_RESULTS, else <repo>/target/bench
#   benches/render.sh --results DIR --doc FILE --chart FILE
#
# The first run installs matplotlib (pinned in benches/requirements.txt) from PyPI into a venv
# under ${CDCFLOW_TOOLS_DIR:-~/.cache/cdcflow/tools}/bench-venv; later runs reuse it until
# requirements.txt or the Python version changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${CDCFLOW_TOOLS_DIR:-$HOME/.cache/cdcflow/tools}"
VENV="$TOOLS/bench-venv"
REQUIREMENTS="$ROOT/benches/requirements.txt"

log() { printf 'render.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
# shellcheck source=tests/common/python-venv.sh
source "$ROOT/tests/common/python-venv.sh"

# Same rule as the Rust benches, which run with the repo root as working directory.
results="${CDCFLOW_BENCH_RESULTS:-target/bench}"
[[ "$results" == /* ]] || results="$ROOT/$results"

# Wheels only: building numpy from source on a 2-core machine is not worth a silent half hour.
ensure_python_venv "$VENV" "$REQUIREMENTS" --only-binary=:all:
# The defaults come first so that the caller's options override them; the caller's relative
# paths stay relative to the caller's working directory.
exec "$VENV/bin/python" "$ROOT/benches/render.py" \
    --results "$results" --doc "$ROOT/docs/performance.md" --chart "$ROOT/docs/performance.png" "$@"
