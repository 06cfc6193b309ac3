# shellcheck shell=bash
# Sourced by scripts that run Python tools from a cached venv (tests/check-deploy-files.sh,
# benches/render.sh). The sourcing script defines `log MESSAGE` and `die MESSAGE`.
#
#   ensure_python_venv VENV REQUIREMENTS [PIP_ARGS...]
#
# Creates VENV with python3 (3.11 or newer) and pip-installs REQUIREMENTS into it, once: the venv
# is keyed by the requirements file and the Python version, and editing either rebuilds it.
# When `python3 -m venv` fails for want of Debian's python3-venv, installs it (as root).
ensure_python_venv() {
    local venv="$1" requirements="$2" python want
    shift 2
    python="$(command -v python3)" || die "python3 is missing (apt-get install python3 python3-venv)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "Python 3.11 or newer is needed; found $("$python" --version 2>&1)"
    want="$("$python" --version 2>&1) $(sha256sum "$requirements" | cut -d' ' -f1)"
    if [[ -x "$venv/bin/python" && "$(cat "$venv/.cdcflow-stamp" 2>/dev/null)" == "$want" ]]; then
        return 0
    fi
    log "installing the Python tools into $venv ($requirements)"
    rm -rf -- "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
            die "python3 -m venv failed: install python3-venv (apt-get install python3-venv), or set CDCFLOW_TOOLS_DIR to a writable directory"
        fi
        log "python3 -m venv failed: installing python3-venv"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends python3-venv; } >&2 || die "apt-get install python3-venv failed"
        rm -rf -- "$venv"
        "$python" -m venv "$venv" || die "python3 -m venv $venv failed"
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input "$@" \
        -r "$requirements" >&2 ||
        die "pip install -r $requirements failed (PyPI unreachable, or no wheel for $("$python" --version 2>&1)?)"
    printf '%s\n' "$want" >"$venv/.cdcflow-stamp"
}
