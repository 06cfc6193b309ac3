#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for cdcflow's local Debezium stack: its own
# data dir, its own port on 127.0.0.1, wal_level=logical, a database `shop`
# owned by the user `cdcflow` (password `cdcflow`, REPLICATION).
#
#   postgres.sh start | stop | status | reset | url | psql ARGS...
#
# `start` and `url` print only the connection URL on stdout
# (URL=$(deploy/local/postgres.sh start) works); everything else goes to
# stderr.  Never touches a system PostgreSQL service.  See deploy/local/README.md.
set -euo pipefail

LOG_NAME=postgres.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

HOST=127.0.0.1
PORT="${CDCFLOW_PG_PORT:-15432}"
STATE="${CDCFLOW_PG_DIR:-$CDCFLOW_CACHE/postgres}"
START_TIMEOUT="${CDCFLOW_PG_START_TIMEOUT:-60}"
STOP_TIMEOUT="${CDCFLOW_PG_STOP_TIMEOUT:-30}"
DB=shop
APP_USER=cdcflow
APP_PASSWORD=cdcflow
SUPERUSER=postgres

check_settings() {
    require_number CDCFLOW_PG_PORT "$PORT"
    require_number CDCFLOW_PG_START_TIMEOUT "$START_TIMEOUT"
    require_number CDCFLOW_PG_STOP_TIMEOUT "$STOP_TIMEOUT"
    STATE="$(check_dir "$STATE")"
    DATA="$STATE/data"
    LOGS="$STATE/logs"
    SOCKDIR="$STATE/run"
    # A unix socket path is limited to 107 bytes.
    ((${#SOCKDIR} < 80)) || die "state dir path too long for a unix socket: $SOCKDIR (set CDCFLOW_PG_DIR)"
    URL="postgresql://$APP_USER:$APP_PASSWORD@$HOST:$PORT/$DB"
}

# ------------------------------------------------------------ prerequisites --

BIN=""
find_bin() {
    [[ -z "$BIN" ]] || return 0
    local candidate
    if [[ -n "${CDCFLOW_PG_BIN:-}" ]]; then
        [[ -x "$CDCFLOW_PG_BIN/postgres" ]] || die "CDCFLOW_PG_BIN=$CDCFLOW_PG_BIN has no postgres binary"
        BIN="$CDCFLOW_PG_BIN"
        return 0
    fi
    # Newest installed major version (Debian: /usr/lib/postgresql/<major>/bin).
    find_newest() {
        # shellcheck disable=SC2012 # names are digits
        ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4,4n | tail -n 1
    }
    candidate="$(find_newest)"
    if [[ -z "$candidate" || ! -x "$candidate/postgres" ]]; then
        apt_install "PostgreSQL server binaries not found under /usr/lib/postgresql" postgresql
        candidate="$(find_newest)"
    fi
    [[ -n "$candidate" && -x "$candidate/postgres" && -x "$candidate/initdb" ]] ||
        die "no PostgreSQL server binaries under /usr/lib/postgresql (set CDCFLOW_PG_BIN)"
    BIN="$candidate"
}

# ------------------------------------------------------------ server files --

initdb_once() {
    [[ -f "$DATA/PG_VERSION" ]] && return 0
    local t0
    t0="$(now_ms)"
    rm -rf -- "$DATA"
    mkdir -p "$STATE"
    log "initdb $DATA ($("$BIN/postgres" --version))"
    # --no-sync: a throwaway cluster; -A trust for the local socket only, the
    # TCP rules come from pg_hba.conf below.
    "${AS_USER[@]}" "$BIN/initdb" -D "$DATA" -U "$SUPERUSER" -A trust -E UTF8 \
        --locale=C.UTF-8 --no-sync >>"$LOGS/initdb.log" 2>&1 || {
        tail -n 20 "$LOGS/initdb.log" >&2
        die "initdb failed (log: $LOGS/initdb.log)"
    }
    cat >"$DATA/pg_hba.conf" <<'EOF'
# Written by deploy/local/postgres.sh.
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
EOF
    printf "\n# deploy/local/postgres.sh rewrites this file on every start.\ninclude_if_exists = 'cdcflow.conf'\n" \
        >>"$DATA/postgresql.conf"
    log "initdb done in $(elapsed "$t0" "$(now_ms)") s"
}

write_config() {
    mkdir -p "$SOCKDIR"
    cat >"$DATA/cdcflow.conf" <<EOF
# Written by deploy/local/postgres.sh on every start; edit the script, not this.
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = '$SOCKDIR'
# Debezium (pgoutput): logical decoding, one slot and one WAL sender per connector.
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_connections = 100
# Throwaway cluster: durability is not the point, speed is.
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 64MB
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
}

# ---------------------------------------------------------- process checks --

server_pid() {
    local pid
    [[ -f "$DATA/postmaster.pid" ]] || return 1
    pid="$(head -n 1 "$DATA/postmaster.pid" | tr -dc '0-9')"
    pid_has_arg "$pid" "$DATA" || return 1
    printf '%s\n' "$pid"
}

answers() {
    "$BIN/pg_isready" -q -h "$SOCKDIR" -p "$PORT" -U "$SUPERUSER" -d postgres -t 2 2>/dev/null
}

# psql as the superuser over the unix socket.
su_psql() {
    "$BIN/psql" -X -v ON_ERROR_STOP=1 -q -h "$SOCKDIR" -p "$PORT" -U "$SUPERUSER" "$@"
}

bootstrap_roles() {
    local exists
    exists="$(su_psql -d postgres -Atc "SELECT 1 FROM pg_roles WHERE rolname = '$APP_USER'")"
    if [[ "$exists" != 1 ]]; then
        log "creating role $APP_USER (LOGIN REPLICATION)"
        su_psql -d postgres -c "CREATE ROLE $APP_USER LOGIN REPLICATION PASSWORD '$APP_PASSWORD'" >&2
    fi
    exists="$(su_psql -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB'")"
    if [[ "$exists" != 1 ]]; then
        log "creating database $DB owned by $APP_USER"
        su_psql -d postgres -c "CREATE DATABASE $DB OWNER $APP_USER" >&2
    fi
}

# -------------------------------------------------------------- subcommands --

cmd_start() {
    find_bin
    as_service_user postgres
    take_lock "$STATE"
    mkdir -p "$LOGS"
    local pid t0
    t0="$(now_ms)"
    if pid="$(server_pid)"; then
        local i
        for i in $(seq "$START_TIMEOUT"); do
            answers && break
            ((i < START_TIMEOUT)) || die "running (pid $pid) but not answering; logs in $LOGS"
            sleep 1
        done
        bootstrap_roles
        log "already running (pid $pid, state $STATE)"
        printf '%s\n' "$URL"
        return 0
    fi
    ! port_open "$PORT" || die "$HOST:$PORT is already in use by another process (set CDCFLOW_PG_PORT)"
    initdb_once
    write_config
    printf '\n===== %s start =====\n' "$(date '+%F %T')" >>"$LOGS/postgres.log"
    log "starting PostgreSQL on $HOST:$PORT (state $STATE)"
    local launcher
    # setsid, nohup and unshare exec in turn: the launcher pid becomes the postmaster's.
    launcher="$(launch_detached "$LOGS/postgres.log" "${AS_USER[@]}" "$BIN/postgres" -D "$DATA")"
    local deadline=$((SECONDS + START_TIMEOUT))
    while ! answers; do
        if ! kill -0 "$launcher" 2>/dev/null; then
            tail -n 30 "$LOGS/postgres.log" >&2 || true
            die "PostgreSQL exited during start-up (log: $LOGS/postgres.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$LOGS/postgres.log" >&2 || true
            die "PostgreSQL did not answer within ${START_TIMEOUT}s (log: $LOGS/postgres.log; '$0 stop' ends it)"
        fi
        sleep 0.1
    done
    bootstrap_roles
    pid="$(server_pid)" || die "PostgreSQL answers but its pid file is missing"
    log "ready in $(elapsed "$t0" "$(now_ms)") s: $URL (pid $pid, logs $LOGS)"
    printf '%s\n' "$URL"
}

cmd_stop() {
    take_lock "$STATE"
    local pid
    if ! pid="$(server_pid 2>/dev/null)"; then
        log "not running"
        return 0
    fi
    log "stopping PostgreSQL (pid $pid, fast shutdown)"
    # SIGINT = fast shutdown: roll back open transactions, close WAL senders.
    stop_pid "$pid" INT "$STOP_TIMEOUT"
    log "stopped"
}

cmd_status() {
    find_bin
    local pid
    if ! pid="$(server_pid)"; then
        printf 'stopped (state %s)\n' "$STATE"
        return 3
    fi
    if answers; then
        printf 'running, healthy: pid %s, %s, state %s\n' "$pid" "$URL" "$STATE"
        return 0
    fi
    printf 'running, NOT answering: pid %s, port %s, logs %s\n' "$pid" "$PORT" "$LOGS"
    return 1
}

cmd_reset() {
    cmd_stop
    if [[ -d "$STATE" ]]; then
        rm -rf -- "$STATE"
        log "deleted $STATE"
    fi
    rm -f -- "$STATE.lock"
}

# psql ARGS...: as the superuser over the socket, database shop, unless ARGS
# say otherwise (psql's later options win).
cmd_psql() {
    find_bin
    server_pid >/dev/null || die "PostgreSQL is not running ('$0 start')"
    exec "$BIN/psql" -X -h "$SOCKDIR" -p "$PORT" -U "$SUPERUSER" -d "$DB" "$@"
}

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND [ARGS...]

  start          initdb once, start, wait until ready, create role $APP_USER and
                 database $DB; prints the URL ($URL)
  stop           fast shutdown (SIGINT), SIGKILL after ${STOP_TIMEOUT}s
  status         exit 0 running and answering, 1 running not answering, 3 stopped
  reset          stop and delete the state dir ($STATE)
  url            print the URL
  psql ARGS...   psql as superuser $SUPERUSER on $DB over the unix socket
                 (-U $APP_USER to act as the application user)
EOF
}

main() {
    local cmd="${1:-}"
    [[ $# -gt 0 ]] && shift
    check_settings
    case "$cmd" in
        start) cmd_start ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        reset) cmd_reset ;;
        url) printf '%s\n' "$URL" ;;
        psql) cmd_psql "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
