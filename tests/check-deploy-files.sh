#!/usr/bin/env bash
# Offline checks of the deployment files: docker-compose.yml, deploy/docker/Dockerfile,
# deploy/k8s/, deploy/prometheus/ and deploy/grafana/, of the metric names the alerts and the
# dashboard use against src/metrics/, and of examples/*.toml against the config schema. No
# Docker engine, cluster or network is needed after the tools are cached: the first run installs
# them into ~/.cache/cdcflow/tools (a Python venv with pinned check-jsonschema,
# kubernetes-validate and hadolint from PyPI; promtool taken from Debian's `prometheus`
# package), later runs reuse them.
#
#   tests/check-deploy-files.sh            # one line per check, then "deploy: N passed, M failed"
#
# Exits non-zero when a check fails (each failure names the file and the problem) or when a
# tool cannot be installed: a missing tool is a failure, never a skip.
# Environment: CDCFLOW_TOOLS_DIR (default ~/.cache/cdcflow/tools).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

TOOLS="${CDCFLOW_TOOLS_DIR:-$HOME/.cache/cdcflow/tools}"
VENV="$TOOLS/deploy-venv"
REQUIREMENTS="tests/deploy/requirements.txt"
PROMTOOL_DIR="$TOOLS/promtool"
HELPER="tests/deploy/check_deploy.py"

log() { printf 'check-deploy-files: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ------------------------------------------------------------------------------- tools --

as_root_apt() {
    # apt-get update once per run, and only when a look-up or download failed without it.
    [[ $(id -u) -eq 0 ]] || die "$1: run as root, or install it by hand (apt-get $2)"
    command -v apt-get >/dev/null 2>&1 || die "$1: no apt-get on this machine"
    if [[ -z "${APT_UPDATED:-}" ]]; then
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# shellcheck source=tests/common/python-venv.sh
source "$ROOT/tests/common/python-venv.sh"

ensure_venv() {
    ensure_python_venv "$VENV" "$REQUIREMENTS"
    for tool in check-jsonschema hadolint; do
        [[ -x "$VENV/bin/$tool" ]] || die "$tool is missing from $VENV after pip install"
    done
}

# promtool comes from Debian's `prometheus` package, unpacked into the tools cache rather than
# installed: installing it would also install (and on some machines start) a Prometheus server.
ensure_promtool() {
    [[ -x "$PROMTOOL_DIR/promtool" ]] && "$PROMTOOL_DIR/promtool" --version >/dev/null 2>&1 &&
        [[ -x "$PROMTOOL_DIR/prometheus" ]] && "$PROMTOOL_DIR/prometheus" --version >/dev/null 2>&1 &&
        return 0
    command -v apt-get >/dev/null 2>&1 || die "promtool: needs apt-get (Debian's prometheus package)"
    command -v dpkg-deb >/dev/null 2>&1 || die "promtool: needs dpkg-deb"
    local tmp="$TOOLS/.promtool-download"
    rm -rf -- "$tmp"
    mkdir -p "$tmp"
    log "fetching promtool (Debian package prometheus) into $PROMTOOL_DIR"
    local sandbox=()
    [[ $(id -u) -ne 0 ]] || sandbox=(-o APT::Sandbox::User=root)
    if ! (cd "$tmp" && apt-get "${sandbox[@]}" download -qq prometheus >&2 2>/dev/null); then
        as_root_apt "apt-get download prometheus failed" "install prometheus"
        (cd "$tmp" && apt-get "${sandbox[@]}" download -qq prometheus >&2) || die "apt-get download prometheus failed"
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/unpacked" || die "cannot unpack $(ls "$tmp"/*.deb)"
    mkdir -p "$PROMTOOL_DIR"
    install -m 0755 "$tmp/unpacked/usr/bin/promtool" "$PROMTOOL_DIR/promtool"
    # The server too: tests/kafka_operations.rs runs it to scrape cdcflow.
    install -m 0755 "$tmp/unpacked/usr/bin/prometheus" "$PROMTOOL_DIR/prometheus"
    rm -rf -- "$tmp"
    "$PROMTOOL_DIR/promtool" --version >/dev/null 2>&1 || die "the unpacked promtool does not run"
    "$PROMTOOL_DIR/prometheus" --version >/dev/null 2>&1 || die "the unpacked prometheus does not run"
}

started="$(date +%s%N)"
ensure_venv
ensure_promtool
PY="$VENV/bin/python"
export PYTHONDONTWRITEBYTECODE=1 # the helper imports its siblings: no __pycache__ in the work tree
PROMTOOL="$PROMTOOL_DIR/promtool"
WORK="$(mktemp -d)"
trap 'rm -rf -- "$WORK"' EXIT

# -------------------------------------------------------------------------------- checks --

passed=0
failed=0
# check NAME COMMAND...: one line per check; the command's output is the detail or, on
# failure, the problems (one per line, each naming its file).
check() {
    local name="$1" output status=0
    shift
    output="$("$@" 2>&1)" || status=$?
    if ((status == 0)); then
        passed=$((passed + 1))
        printf 'ok   %-18s %s\n' "$name" "$(printf '%s' "$output" | tail -n 1)"
    else
        failed=$((failed + 1))
        printf 'FAIL %-18s\n' "$name"
        printf '%s\n' "$output" | sed 's/^/       /'
    fi
}

compose_schema() {
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml &&
        echo "docker-compose.yml is valid against the Compose specification"
}

hadolint_dockerfile() {
    # Findings start with the file and line: deploy/docker/Dockerfile:12 DL3015 ...
    "$VENV/bin/hadolint" --no-color --config deploy/docker/hadolint.yaml deploy/docker/Dockerfile || return 1
    echo "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'): no findings (deploy/docker/hadolint.yaml)"
}

prometheus_rules() {
    local detail status=0 label file
    # The helper writes the PrometheusRule's groups to $WORK/prometheusrule-groups.yml.
    detail="$("$PY" "$HELPER" "$ROOT" rules "$WORK")" || { printf '%s\n' "$detail"; status=1; }
    [[ -f "$WORK/prometheusrule-groups.yml" ]] || return 1
    for file in "$WORK/prometheusrule-groups.yml" deploy/prometheus/cdcflow-alerts.yml; do
        label="$file"
        [[ "$file" != "$WORK/"* ]] || label="deploy/k8s/prometheusrule.yaml (spec.groups)"
        if ! "$PROMTOOL" check rules "$file" >"$WORK/promtool.out" 2>&1; then
            grep -v -e '^Checking ' -e '^$' "$WORK/promtool.out" | sed -e "s|$WORK/prometheusrule-groups.yml|spec.groups|" -e "s|^ *|$label: |"
            status=1
        fi
    done
    cp tests/deploy/alerts.test.yml "$WORK/"
    if ! (cd "$WORK" && "$PROMTOOL" test rules alerts.test.yml) >"$WORK/promtool.out" 2>&1; then
        grep -v -e '^Unit Testing: ' -e '^$' "$WORK/promtool.out" | awk '!seen[$0]++' | sed 's|^|tests/deploy/alerts.test.yml: |'
        status=1
    fi
    ((status == 0)) || return 1
    echo "$detail; promtool check rules: both valid; promtool test rules: $(grep -c 'alertname:' tests/deploy/alerts.test.yml) cases pass"
}

grafana_dashboard() {
    local detail status=0
    # The helper writes the dashboard's panel queries, as recording rules, to
    # $WORK/dashboard-queries.yml: promtool parses them as Prometheus would.
    detail="$("$PY" "$HELPER" "$ROOT" dashboard "$WORK")" || { printf '%s\n' "$detail"; status=1; }
    if [[ -f "$WORK/dashboard-queries.yml" ]] &&
        ! "$PROMTOOL" check rules "$WORK/dashboard-queries.yml" >"$WORK/promtool.out" 2>&1; then
        # The rules are named dashboard:panel_<id>_<refId>.
        grep -v -e '^Checking ' -e '^$' -e '^ *FAILED:$' "$WORK/promtool.out" |
            sed -e "s|$WORK/dashboard-queries.yml|queries|" -e 's|^ *|deploy/grafana/cdcflow.json: |'
        status=1
    fi
    ((status == 0)) || return 1
    echo "$detail; promtool parses every query"
}

prometheus_config() {
    "$PROMTOOL" check config deploy/prometheus/prometheus.yml >"$WORK/promtool.out" 2>&1 || {
        grep -v -e '^Checking ' -e '^$' "$WORK/promtool.out" | sed 's|^ *|deploy/prometheus/prometheus.yml: |'
        return 1
    }
    echo "promtool check config: valid, with its rule file"
}

check compose-schema compose_schema
check image-pins "$PY" "$HELPER" "$ROOT" images
check compose-deps "$PY" "$HELPER" "$ROOT" compose
check compose-versions "$PY" "$HELPER" "$ROOT" compose-versions
check dockerfile-lint hadolint_dockerfile
check dockerfile-readme "$PY" "$HELPER" "$ROOT" dockerfile
check k8s-schema "$PY" "$HELPER" "$ROOT" k8s-schema
check k8s-manifests "$PY" "$HELPER" "$ROOT" k8s
check prometheus-rules prometheus_rules
check prometheus-config prometheus_config
check grafana-dashboard grafana_dashboard
check metric-names "$PY" "$HELPER" "$ROOT" metrics
check config-examples "$PY" "$HELPER" "$ROOT" config-examples

elapsed_ms=$((($(date +%s%N) - started) / 1000000))
log "tools: $("$PY" --version), $("$VENV/bin/pip" show check-jsonschema kubernetes-validate 2>/dev/null | awk '/^(Name|Version):/ {printf "%s ", $2}')hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'), promtool $("$PROMTOOL" --version 2>&1 | awk 'NR==1 {print $3}'); ${elapsed_ms} ms"
echo "deploy: $passed passed, $failed failed"
((failed == 0))
