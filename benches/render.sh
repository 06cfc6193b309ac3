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

die() {
    printf 'render.sh: error: %s\n' "$*" >&2
    exit 1
}

ensure_venv() {
    local python want
    python="$(command -v python3)" || die "python3 is missing (apt-get install python3 python3-venv)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "Python 3.11 or newer is needed; found $("$python" --version 2>&1)"
    want="$("$python" --version 2>&1) $(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
    if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.cdcflow-stamp" 2>/dev/null)" == "$want" ]]; then
        return 0
    fi
    printf 'render.sh: installing matplotlib into %s (%s)\n' "$VENV" "${REQUIREMENTS#"$ROOT"/}" >&2
    rm -rf -- "$VENV"
    mkdir -p "$TOOLS"
    "$python" -m venv "$VENV" ||
        die "python3 -m venv $VENV failed (apt-get install python3-venv, or set CDCFLOW_TOOLS_DIR to a writable directory)"
    # Wheels only: building numpy from source on a 2-core machine is not worth a silent half hour.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input --only-binary=:all: \
        -r "$REQUIREMENTS" >&2 ||
        die "pip install -r $REQUIREMENTS failed (PyPI unreachable, or no wheel for $("$python" --version 2>&1)?)"
    printf '%s\n' "$want" >"$VENV/.cdcflow-stamp"
}

# Same rule as the Rust benches, which run with the repo root as working directory.
results="${CDCFLOW_BENCH_RESULTS:-target/bench}"
[[ "$results" == /* ]] || results="$ROOT/$results"

ensure_venv
# The defaults come first so that the caller's options override them; the caller's relative
# paths stay relative to the caller's working directory.
exec "$VENV/bin/python" "$ROOT/benches/render.py" \
    --results "$results" --doc "$ROOT/docs/performance.md" --chart "$ROOT/docs/performance.png" "$@"
