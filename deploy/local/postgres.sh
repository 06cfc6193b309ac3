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

PORT="${CDCFLOW_PG_PORT:-15432}"
STATE="${CDCFLOW_PG_DIR:-$CDCFLOW_CACHE/postgres}"
START_TIMEOUT="${CDCFLOW_PG_START_TIMEOUT:-60}"
STOP_TIMEOUT="${CDCFLOW_PG_STOP_TIMEOUT:-30}"
SERVER=PostgreSQL
SUPERUSER=postgres

check_settings() {
    check_service_settings PG
    DATA="$STATE/data"
    SOCKDIR="$STATE/run"
    SERVER_OUT="$LOGS/postgres.log"
    SERVER_LOG="$SERVER_OUT"
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

# initdb the first time; the config on every start.
prepare_server() {
    initdb_once
    write_config
}

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

server_pid() { pidfile_pid "$DATA/postmaster.pid" "$DATA"; }

answers() {
    "$BIN/pg_isready" -q -h "$SOCKDIR" -p "$PORT" -U "$SUPERUSER" -d postgres -t 2 2>/dev/null
}

# psql as the superuser over the unix socket.
su_psql() {
    "$BIN/psql" -X -v ON_ERROR_STOP=1 -q -h "$SOCKDIR" -p "$PORT" -U "$SUPERUSER" "$@"
}

# The role and the database (after every start).
provision() {
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
    # setsid, nohup and unshare exec in turn: the launcher pid becomes the postmaster's.
    start_server CDCFLOW_PG_PORT "state $STATE" "${AS_USER[@]}" "$BIN/postgres" -D "$DATA"
}

cmd_stop() {
    # SIGINT = fast shutdown: roll back open transactions, close WAL senders.
    stop_service server_pid INT "$SERVER" "fast shutdown"
}

cmd_status() {
    find_bin
    service_status server_pid answers "$URL, state $STATE" "port $PORT, logs $LOGS"
}

cmd_reset() {
    cmd_stop
    delete_state
}

cmd_url() { printf '%s\n' "$URL"; }

# psql ARGS...: as the superuser over the socket, database shop, unless ARGS
# say otherwise (psql's later options win).
cmd_psql() {
    find_bin
    require_running server_pid "$SERVER"
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

dispatch "start stop status reset url psql" "$@"
