#!/usr/bin/env bash
# The whole local CDC stack in one command: Kafka (kafka.sh), PostgreSQL
# (postgres.sh), MariaDB (mariadb.sh) and Kafka Connect with Debezium
# (connect.sh); loads the example schema (sql/*.sql) and registers the
# connectors (deploy/debezium/*.json).
#
#   stack.sh up | down | status | reset
#
# Every step is idempotent: `up` on a running stack only checks it.  `up`
# prints the Kafka bootstrap address on stdout; everything else goes to stderr.
# Each script's environment variables apply (see deploy/local/README.md), and:
#   CDCFLOW_STACK_CONNECTORS  connector files (names in deploy/debezium/, without
#                             .json) that `up` registers; default
#                             "postgres-shop mariadb-shop"
#   CDCFLOW_STACK_MARIADB     0 to leave MariaDB out (default 1)
set -euo pipefail

LOG_NAME=stack.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HERE="$LIB_DIR"
CONNECTOR_DIR="$REPO_ROOT/deploy/debezium"
CONNECTORS="${CDCFLOW_STACK_CONNECTORS:-postgres-shop mariadb-shop}"
WITH_MARIADB="${CDCFLOW_STACK_MARIADB:-1}"

step() { printf '\n%s: == %s\n' "$LOG_NAME" "$*" >&2; }

# Run one step and report its wall time.
timed() {
    local what="$1" t0
    shift
    t0="$(now_ms)"
    "$@"
    log "$what: $(elapsed "$t0" "$(now_ms)") s"
}

check_connectors() {
    local c
    for c in $CONNECTORS; do
        [[ -f "$CONNECTOR_DIR/$c.json" ]] || die "CDCFLOW_STACK_CONNECTORS: no $CONNECTOR_DIR/$c.json"
        if [[ "$WITH_MARIADB" == 0 && "$c" == mariadb* ]]; then
            die "CDCFLOW_STACK_MARIADB=0 but CDCFLOW_STACK_CONNECTORS names $c"
        fi
    done
}

BOOT=""
start_kafka() { BOOT="$("$HERE/kafka.sh" start)"; }
start_postgres() { "$HERE/postgres.sh" start >/dev/null; }
start_mariadb() { "$HERE/mariadb.sh" start >/dev/null; }
start_connect() { "$HERE/connect.sh" start >/dev/null; }

load_schema() {
    "$HERE/postgres.sh" psql -U cdcflow -v ON_ERROR_STOP=1 -q -f "$HERE/sql/postgres-shop.sql" >&2
    if [[ "$WITH_MARIADB" != 0 ]]; then
        "$HERE/mariadb.sh" mysql <"$HERE/sql/mariadb-shop.sql" >&2
    fi
}

register_connectors() {
    local c
    for c in $CONNECTORS; do
        "$HERE/connect.sh" register "$CONNECTOR_DIR/$c.json" >/dev/null
    done
}

cmd_up() {
    check_connectors
    local t0
    t0="$(now_ms)"
    step "Kafka"
    timed "Kafka" start_kafka
    export CDCFLOW_KAFKA_BOOTSTRAP="$BOOT"
    step "PostgreSQL"
    timed "PostgreSQL" start_postgres
    if [[ "$WITH_MARIADB" != 0 ]]; then
        step "MariaDB"
        timed "MariaDB" start_mariadb
    fi
    step "Kafka Connect"
    timed "Kafka Connect" start_connect
    step "schema (deploy/local/sql)"
    timed "schema" load_schema
    if [[ -n "${CONNECTORS// /}" ]]; then
        step "connectors: $CONNECTORS"
        timed "connectors" register_connectors
    fi
    log ""
    log "stack up in $(elapsed "$t0" "$(now_ms)") s:"
    log "  Kafka       $BOOT"
    log "  PostgreSQL  $("$HERE/postgres.sh" url)"
    [[ "$WITH_MARIADB" == 0 ]] || log "  MariaDB     $("$HERE/mariadb.sh" url)"
    log "  Connect     $("$HERE/connect.sh" url)"
    "$HERE/connect.sh" connectors 2>/dev/null | sed 's/^/  connector   /' >&2 || true
    printf '%s\n' "$BOOT"
}

cmd_down() {
    local t0 rc=0
    t0="$(now_ms)"
    # Reverse order: Connect before the databases and the broker it uses.
    "$HERE/connect.sh" stop || rc=1
    "$HERE/mariadb.sh" stop || rc=1
    "$HERE/postgres.sh" stop || rc=1
    "$HERE/kafka.sh" stop || rc=1
    log "stack down in $(elapsed "$t0" "$(now_ms)") s"
    return "$rc"
}

cmd_status() {
    local s rc=0 name
    for name in kafka postgres mariadb connect; do
        if s="$("$HERE/$name.sh" status 2>&1)"; then
            :
        else
            rc=1
        fi
        printf '%-9s %s\n' "$name" "$s"
    done
    if "$HERE/connect.sh" status >/dev/null 2>&1; then
        "$HERE/connect.sh" connectors 2>/dev/null | sed 's/^/connector /' || true
    fi
    return "$rc"
}

# reset: stop everything and delete all state (topics, databases, Connect's
# offsets) together: a database reset under surviving Connect offsets, or the
# reverse, leaves connectors that resume from positions that no longer exist.
cmd_reset() {
    "$HERE/connect.sh" reset
    "$HERE/mariadb.sh" reset
    "$HERE/postgres.sh" reset
    "$HERE/kafka.sh" reset
}

usage() {
    cat <<EOF
usage: $(basename "$0") up | down | status | reset

  up      start Kafka, PostgreSQL, MariaDB, Kafka Connect (each idempotent), load
          deploy/local/sql/*.sql, register deploy/debezium/{${CONNECTORS// /,}}.json;
          prints the Kafka bootstrap address
  down    stop them all (state kept)
  status  one line per service; exit 0 when all run and answer
  reset   stop them all and delete all their state
EOF
}

dispatch "up down status reset" "$@"
