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
# librdkafka's TLS and SASL (SCRAM, GSSAPI) link the system's OpenSSL and Cyrus SASL; the
# secured test broker's certificates are made with the openssl tool.
command -v openssl >/dev/null 2>&1 || need_packages+=(openssl)
if command -v dpkg >/dev/null 2>&1; then
    for package in libssl-dev libsasl2-dev; do
        dpkg -s "$package" >/dev/null 2>&1 || need_packages+=("$package")
    done
fi
command -v java >/dev/null 2>&1 || need_packages+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_packages+=(maven)
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
cargo clippy --release --all-targets --features kafka-it -- -D warnings

# The deployment files (docker-compose.yml, the Dockerfile, deploy/k8s, Prometheus rules),
# validated offline: Compose and Kubernetes schemas, hadolint, promtool.
log "deployment files (tests/check-deploy-files.sh)"
bash tests/check-deploy-files.sh
# It unpacked promtool and the Prometheus server from Debian's package: the operations tests
# (tests/kafka_operations.rs) run both against cdcflow.
export CDCFLOW_PROMETHEUS_DIR="${CDCFLOW_TOOLS_DIR:-$HOME/.cache/cdcflow/tools}/promtool"

# A real single-node Kafka for the integration tests, on its own port and state directory so
# that it never meets a developer's broker; stopped again when this script ends.
export CDCFLOW_KAFKA_PORT="${CDCFLOW_TEST_KAFKA_PORT:-19292}"
export CDCFLOW_KAFKA_CONTROLLER_PORT="${CDCFLOW_TEST_KAFKA_CONTROLLER_PORT:-19293}"
export CDCFLOW_KAFKA_DIR="${CDCFLOW_TEST_KAFKA_DIR:-$HOME/.cache/cdcflow/kafka-test}"
# Mutual TLS on port + 3 and SASL_SSL/SCRAM-SHA-512 on port + 4, beside PLAINTEXT
# (tests/kafka_security.rs reads them from `kafka.sh secure-info`).
export CDCFLOW_KAFKA_SECURE=1
log "starting the local Kafka broker (deploy/local/kafka.sh)"
deploy/local/kafka.sh reset >/dev/null
stop_services() {
    deploy/local/connect.sh stop >/dev/null 2>&1 || true
    deploy/local/mariadb.sh stop >/dev/null 2>&1 || true
    deploy/local/postgres.sh stop >/dev/null 2>&1 || true
    deploy/local/kafka.sh stop >/dev/null 2>&1 || true
}
trap stop_services EXIT
CDCFLOW_KAFKA_BOOTSTRAP="$(deploy/local/kafka.sh start)"
export CDCFLOW_KAFKA_BOOTSTRAP

# The real Debezium stack for the end-to-end tests (tests/debezium_e2e.rs), once for the
# suite, on ports and state directories of its own: PostgreSQL and MariaDB from Debian's
# packages (installed when missing), Kafka Connect with Debezium's connectors from Maven
# Central. Connect flushes source offsets every 10 s, so that a kill -9 of Connect can be
# aimed between two flushes (Debezium then re-sends what it streamed since the last one).
export CDCFLOW_PG_PORT="${CDCFLOW_TEST_PG_PORT:-25432}"
export CDCFLOW_PG_DIR="${CDCFLOW_TEST_PG_DIR:-$HOME/.cache/cdcflow/postgres-test}"
export CDCFLOW_MARIADB_PORT="${CDCFLOW_TEST_MARIADB_PORT:-23306}"
export CDCFLOW_MARIADB_DIR="${CDCFLOW_TEST_MARIADB_DIR:-$HOME/.cache/cdcflow/mariadb-test}"
export CDCFLOW_CONNECT_PORT="${CDCFLOW_TEST_CONNECT_PORT:-28083}"
export CDCFLOW_CONNECT_DIR="${CDCFLOW_TEST_CONNECT_DIR:-$HOME/.cache/cdcflow/connect-test}"
export CDCFLOW_CONNECT_GROUP=cdcflow-connect-test
export CDCFLOW_CONNECT_OFFSET_FLUSH_MS=10000
stack_started=$SECONDS
log "starting PostgreSQL, MariaDB and Kafka Connect with Debezium (deploy/local/*.sh)"
for service in postgres mariadb connect; do
    deploy/local/$service.sh reset >/dev/null
    deploy/local/$service.sh start >/dev/null
done
log "Debezium stack ready in $((SECONDS - stack_started)) s"

# One test at a time: the Kafka tests start cdcflow processes and a JVM per read-back, and
# this machine has two cores.
log "cargo test (with the Kafka integration tests against $CDCFLOW_KAFKA_BOOTSTRAP)"
cargo test --release --features kafka-it -- --test-threads=1

# The README's demo, verbatim (examples/shop-demo.toml, default ports), on a stack of its own
# in state directories of its own: real SQL changes must come out as business events.
log "the demo (deploy/local/demo --fresh)"
stop_services
demo_output="$(mktemp)"
env -u CDCFLOW_KAFKA_PORT -u CDCFLOW_KAFKA_CONTROLLER_PORT -u CDCFLOW_KAFKA_BOOTSTRAP \
    -u CDCFLOW_KAFKA_SECURE \
    -u CDCFLOW_PG_PORT -u CDCFLOW_MARIADB_PORT -u CDCFLOW_CONNECT_PORT \
    -u CDCFLOW_CONNECT_GROUP -u CDCFLOW_CONNECT_OFFSET_FLUSH_MS \
    CDCFLOW_KAFKA_DIR="$HOME/.cache/cdcflow/demo-test/kafka" \
    CDCFLOW_PG_DIR="$HOME/.cache/cdcflow/demo-test/postgres" \
    CDCFLOW_MARIADB_DIR="$HOME/.cache/cdcflow/demo-test/mariadb" \
    CDCFLOW_CONNECT_DIR="$HOME/.cache/cdcflow/demo-test/connect" \
    CDCFLOW__STATE__PATH="$HOME/.cache/cdcflow/demo-test/state.db" \
    CDCFLOW_DEMO_PAUSE=2 CDCFLOW_DEMO_SKIP_BUILD=1 \
    deploy/local/demo --fresh 2>&1 | tee "$demo_output"
for event in OrderCreated OrderPaid CustomerEmailChanged; do
    if ! grep -q "⇢ $event" "$demo_output"; then
        echo "the demo showed no $event event (output above)" >&2
        exit 1
    fi
done

log "benchmarks build"
cargo bench --no-run --features kafka-it

# A short run of every fuzz target from the committed corpus (fuzz/README.md), 20 s each to keep
# the suite under 30 minutes; longer runs are
# `fuzz/run.sh 600`.
log "fuzz smoke (fuzz/run.sh 20)"
fuzz/run.sh "${CDCFLOW_FUZZ_SECONDS:-20}"

log "all tests passed"
