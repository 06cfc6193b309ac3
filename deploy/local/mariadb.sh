#!/usr/bin/env bash
# A throwaway MariaDB instance for cdcflow's local Debezium stack: its own data
# dir, socket and port on 127.0.0.1, row-based binlog with full row images,
# a database `shop` and a user `cdcflow` (password `cdcflow`) with the grants
# Debezium's MariaDB connector needs.
#
#   mariadb.sh start | stop | status | reset | url | mysql ARGS...
#
# `start` and `url` print only a JDBC-style URL on stdout; everything else goes
# to stderr.  Never touches a system MariaDB service.  See deploy/local/README.md.
set -euo pipefail

LOG_NAME=mariadb.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PORT="${CDCFLOW_MARIADB_PORT:-13306}"
STATE="${CDCFLOW_MARIADB_DIR:-$CDCFLOW_CACHE/mariadb}"
START_TIMEOUT="${CDCFLOW_MARIADB_START_TIMEOUT:-60}"
STOP_TIMEOUT="${CDCFLOW_MARIADB_STOP_TIMEOUT:-30}"
SERVER=MariaDB

check_settings() {
    check_service_settings MARIADB
    DATA="$STATE/data"
    SERVER_OUT="$LOGS/mariadb.out"
    SERVER_LOG="$LOGS/mariadb.err"
    BINLOG="$STATE/binlog"
    CNF="$STATE/my.cnf"
    SOCKET="$STATE/run/mariadb.sock"
    PIDFILE="$STATE/run/mariadb.pid"
    ((${#SOCKET} < 100)) || die "state dir path too long for a unix socket: $SOCKET (set CDCFLOW_MARIADB_DIR)"
    URL="mariadb://$APP_USER:$APP_PASSWORD@$HOST:$PORT/$DB"
}

# ------------------------------------------------------------ prerequisites --

MARIADBD="" INSTALL_DB="" CLIENT="" ADMIN=""
find_bins() {
    [[ -z "$MARIADBD" ]] || return 0
    locate() {
        local c
        for c in "$@"; do
            if command -v "$c" >/dev/null 2>&1; then
                command -v "$c"
                return 0
            fi
            [[ -x "/usr/sbin/$c" ]] && printf '/usr/sbin/%s\n' "$c" && return 0
        done
        return 1
    }
    if ! locate mariadbd >/dev/null; then
        apt_install "MariaDB server binaries (mariadbd) not found" mariadb-server
    fi
    MARIADBD="$(locate mariadbd mysqld)" || die "mariadbd not found after installing mariadb-server"
    INSTALL_DB="$(locate mariadb-install-db mysql_install_db)" || die "mariadb-install-db not found"
    CLIENT="$(locate mariadb mysql)" || die "the mariadb client is missing (apt-get install -y mariadb-client)"
    ADMIN="$(locate mariadb-admin mysqladmin)" || die "mariadb-admin is missing (apt-get install -y mariadb-client)"
}

# ------------------------------------------------------------ server files --

write_config() {
    mkdir -p "$DATA" "$LOGS" "$BINLOG" "$STATE/run" "$STATE/tmp"
    cat >"$CNF" <<EOF
# Written by deploy/local/mariadb.sh on every start; edit the script, not this.
[client]
socket = $SOCKET
port = $PORT
host = localhost

[mariadbd]
datadir = $DATA
socket = $SOCKET
pid-file = $PIDFILE
tmpdir = $STATE/tmp
bind-address = $HOST
port = $PORT
skip-name-resolve
log_error = $LOGS/mariadb.err

# Debezium: row-based binlog with full row images; a server id of its own.
server_id = 1
log_bin = $BINLOG/mariadb-bin
binlog_format = ROW
binlog_row_image = FULL
binlog_expire_logs_seconds = 86400

character_set_server = utf8mb4
collation_server = utf8mb4_general_ci

# Throwaway instance: small and fast, not durable.
innodb_buffer_pool_size = 64M
innodb_log_file_size = 48M
innodb_flush_log_at_trx_commit = 2
sync_binlog = 0
performance_schema = OFF
EOF
}

# mariadb-install-db the first time; the config on every start.
prepare_server() {
    install_db_once
    write_config
    rm -f -- "$SOCKET" "$PIDFILE"
}

install_db_once() {
    [[ -d "$DATA/mysql" ]] && return 0
    local t0
    t0="$(now_ms)"
    rm -rf -- "$DATA"
    write_config
    log "mariadb-install-db into $DATA ($("$MARIADBD" --version | sed 's/^.*Ver //'))"
    "${AS_USER[@]}" "$INSTALL_DB" --defaults-file="$CNF" --auth-root-authentication-method=normal \
        --skip-test-db >>"$LOGS/install-db.log" 2>&1 || {
        tail -n 20 "$LOGS/install-db.log" >&2
        die "mariadb-install-db failed (log: $LOGS/install-db.log)"
    }
    log "mariadb-install-db done in $(elapsed "$t0" "$(now_ms)") s"
}

# ---------------------------------------------------------- process checks --

server_pid() { pidfile_pid "$PIDFILE" "--defaults-file=$CNF"; }

answers() {
    "$ADMIN" --defaults-file="$CNF" --user=root --connect-timeout=2 ping >/dev/null 2>&1
}

root_sql() {
    "$CLIENT" --defaults-file="$CNF" --user=root --batch --skip-column-names
}

# The database and the user with Debezium's grants (after every start).
provision() {
    root_sql <<EOF
CREATE DATABASE IF NOT EXISTS $DB CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS '$APP_USER'@'%' IDENTIFIED BY '$APP_PASSWORD';
CREATE USER IF NOT EXISTS '$APP_USER'@'localhost' IDENTIFIED BY '$APP_PASSWORD';
-- What Debezium's MariaDB connector needs: snapshot (SELECT, RELOAD for
-- FLUSH TABLES WITH READ LOCK, SHOW DATABASES) and binlog streaming
-- (REPLICATION SLAVE; BINLOG MONITOR for SHOW MASTER STATUS / SHOW BINARY
-- LOGS in 10.5+, where REPLICATION CLIENT is its old name).
GRANT SELECT, RELOAD, SHOW DATABASES, REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, LOCK TABLES
    ON *.* TO '$APP_USER'@'%', '$APP_USER'@'localhost';
GRANT ALL PRIVILEGES ON $DB.* TO '$APP_USER'@'%', '$APP_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

# -------------------------------------------------------------- subcommands --

cmd_start() {
    find_bins
    as_service_user mysql
    # --defaults-file must be the first option.  setsid, nohup and unshare exec
    # in turn: the launcher pid becomes mariadbd's.
    start_server CDCFLOW_MARIADB_PORT "socket $SOCKET, state $STATE" \
        "${AS_USER[@]}" "$MARIADBD" --defaults-file="$CNF"
}

cmd_stop() { stop_service server_pid TERM "$SERVER"; }

cmd_status() {
    find_bins
    service_status server_pid answers "$URL, socket $SOCKET, state $STATE" "port $PORT, logs $LOGS"
}

cmd_reset() {
    cmd_stop
    delete_state
}

cmd_url() { printf '%s\n' "$URL"; }

# mysql ARGS...: the client as root over the socket, database shop; later
# options in ARGS win (e.g. --user=cdcflow --password=cdcflow).
cmd_mysql() {
    find_bins
    require_running server_pid "$SERVER"
    exec "$CLIENT" --defaults-file="$CNF" --user=root --database="$DB" "$@"
}

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND [ARGS...]

  start          mariadb-install-db once, start, wait until ready, create database
                 $DB and user $APP_USER; prints the URL ($URL)
  stop           SIGTERM (clean shutdown), SIGKILL after ${STOP_TIMEOUT}s
  status         exit 0 running and answering, 1 running not answering, 3 stopped
  reset          stop and delete the state dir ($STATE)
  url            print the URL
  mysql ARGS...  the mariadb client as root on $DB over the socket
EOF
}

dispatch "start stop status reset url mysql" "$@"
