# shellcheck shell=bash
# Helpers shared by the scripts in deploy/local (sourced, not run).
#
# The sourcing script sets LOG_NAME (its name in messages) before sourcing;
# one that calls dispatch defines usage, its cmd_* functions and, optionally,
# check_settings.  The service scripts (kafka.sh, postgres.sh, mariadb.sh,
# connect.sh) also set PORT, STATE (the state dir), START_TIMEOUT and
# STOP_TIMEOUT, which the service helpers below read (check_service_settings
# sets LOGS).

LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$LIB_DIR/../.." && pwd -P)"
CDCFLOW_CACHE="${CDCFLOW_CACHE:-$HOME/.cache/cdcflow}"

# Every service listens on this address only.
HOST=127.0.0.1

log() { printf '%s: %s\n' "${LOG_NAME:-deploy}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Seconds since the epoch with millisecond precision, and the difference in
# seconds (one decimal) between two such stamps.
now_ms() { date +%s%3N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

# ---------------------------------------------------------------- settings --

require_number() {
    local name="$1" value="$2"
    [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be a number, got '$value'"
}

# A JVM heap size (-Xmx).
require_heap() {
    local name="$1" value="$2"
    [[ "$value" =~ ^[0-9]+[kKmMgG]?$ ]] || die "$name must look like 512m, got '$value'"
}

# A cache or state directory: absolute, not inside the repository, not / or $HOME.
check_dir() {
    local d
    d="$(realpath -m -- "$1")"
    case "$d/" in
        "$REPO_ROOT/"*) die "$d is inside the repository $REPO_ROOT; point it elsewhere" ;;
    esac
    [[ "$d" != / && "$d" != "$HOME" ]] || die "refusing to use $d as a cache or state directory"
    printf '%s\n' "$d"
}

# check_service_settings NAME: the settings every service has, from the
# variables CDCFLOW_NAME_PORT, _START_TIMEOUT and _STOP_TIMEOUT (numbers) and
# the state dir (checked, made absolute); LOGS under it.
check_service_settings() {
    local prefix="CDCFLOW_$1"
    require_number "${prefix}_PORT" "$PORT"
    require_number "${prefix}_START_TIMEOUT" "$START_TIMEOUT"
    require_number "${prefix}_STOP_TIMEOUT" "$STOP_TIMEOUT"
    STATE="$(check_dir "$STATE")"
    LOGS="$STATE/logs"
}

# Run the subcommand: dispatch "COMMAND..." "$@" checks the settings (the
# script's check_settings, when it has one), then runs cmd_COMMAND (dashes
# become underscores) with the remaining arguments when $1 is one of the
# COMMANDs.  help, -h and --help print the usage; anything else prints it on
# stderr and exits 2.
dispatch() {
    local commands=" $1 " cmd="${2:-}"
    shift
    [[ $# -gt 0 ]] && shift
    if declare -F check_settings >/dev/null; then
        check_settings
    fi
    case "$cmd" in
        -h | --help | help) usage ;;
        *)
            if [[ "$cmd" =~ ^[a-z-]+$ && "$commands" == *" $cmd "* ]]; then
                "cmd_${cmd//-/_}" "$@"
            else
                usage >&2
                exit 2
            fi
            ;;
    esac
}

# ------------------------------------------------------------ prerequisites --

# apt-get install PACKAGES as root, or die with the command to run.  Services
# that a package would start are held back (policy-rc.d exit 101) when the
# machine has no policy of its own, so a package install never starts a
# system-wide database.
apt_install() {
    local why="$1"
    shift
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "$why; install it: apt-get install -y $*"
    fi
    log "$why: installing $* with apt-get"
    local policy=/usr/sbin/policy-rc.d added=0 rc=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\n# written by cdcflow deploy/local for one apt-get run\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "$@" >&2; then
        apt-get update -q >&2 && apt-get install -y -q "$@" >&2 || rc=$?
    fi
    ((added == 0)) || rm -f -- "$policy"
    ((rc == 0)) || die "apt-get install $* failed"
}

need_cmd() {
    local cmd="$1" pkg="${2:-$1}"
    command -v "$cmd" >/dev/null 2>&1 && return 0
    apt_install "$cmd is missing" "$pkg"
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing $pkg"
}

# find_java WHO: JAVA=$JAVA_HOME/bin/java or the java on PATH, which must be
# Java 17+ (WHO, e.g. "Kafka Connect 4.3.1", needs it: the error says so).
JAVA=""
find_java() {
    local who="$1"
    [[ -z "$JAVA" ]] || return 0
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
        JAVA="$JAVA_HOME/bin/java"
    elif command -v java >/dev/null 2>&1; then
        JAVA="$(command -v java)"
    else
        die "java not found; $who needs Java 17+:
  Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless   (or set JAVA_HOME)"
    fi
    local version major
    version="$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
    major="${version%%.*}"
    [[ "$major" == 1 ]] && major="$(cut -d. -f2 <<<"$version")"
    if [[ ! "$major" =~ ^[0-9]+$ ]] || ((major < 17)); then
        die "$JAVA is Java '$version'; $who needs Java 17+ (set JAVA_HOME)"
    fi
}

# AS_USER=(...): a command prefix that runs a database server as an
# unprivileged user.  PostgreSQL and MariaDB refuse to run as root, and root's
# home (0700) is closed to the postgres/mysql system users, so as root the
# server runs in a user namespace where root's uid is mapped to the system
# user's: the server sees itself as that user, and every file it writes is
# root's outside.  No chown, no permission change anywhere.  As another user
# the prefix is empty.
AS_USER=()
as_service_user() {
    local name="$1"
    AS_USER=()
    [[ $(id -u) -eq 0 ]] || return 0
    local uid gid
    if uid="$(id -u "$name" 2>/dev/null)" && gid="$(id -g "$name" 2>/dev/null)"; then
        :
    else
        uid="$(id -u nobody)"
        gid="$(id -g nobody)"
    fi
    AS_USER=(unshare --user --map-user="$uid" --map-group="$gid" --)
    "${AS_USER[@]}" true 2>/dev/null && return 0
    die "running as root and 'unshare --user' does not work here (user namespaces disabled?).
  Run this script as an ordinary user instead, or point the state dir at a place that the
  '$name' user can reach and run it as that user."
}

# ----------------------------------------------------------- jar resolution --

digest() { sha256sum "$1" | cut -d' ' -f1; }

# is_resolved DIR MARKER WANT: DIR holds what WANT describes.
is_resolved() {
    local dir="$1" marker="$2" want="$3"
    [[ -d "$dir" && "$(cat "$marker" 2>/dev/null)" == "$want" ]]
}

# resolve_into WHAT DIR MARKER WANT LOCK JAR MVN_ARGS...: mvn
# dependency:copy-dependencies into DIR once (WHAT names the jars in messages);
# the file MARKER records what is in DIR, the file LOCK serializes resolutions,
# and the result must hold JAR.  Markers stay outside DIR (and plugin.path).
resolve_into() {
    local what="$1" dir="$2" marker="$3" want="$4" lock="$5" jar="$6"
    shift 6
    is_resolved "$dir" "$marker" "$want" && return 0
    command -v mvn >/dev/null 2>&1 || die "mvn not found; it is needed once, to fetch $what from Maven Central:
  Debian/Ubuntu: apt-get install -y maven"
    mkdir -p "$(dirname "$dir")" "$(dirname "$marker")" "$(dirname "$lock")"
    exec 8>"$lock"
    flock -w 600 8 || die "timed out waiting for another resolution into $dir"
    if ! is_resolved "$dir" "$marker" "$want"; then
        log "resolving $what with Maven into $dir (once) ..."
        local tmp="$dir.tmp.$$" t0=$SECONDS
        rm -rf -- "$tmp"
        # Maven 3.8 prints colour resets even in batch mode: strip escapes
        # (pipefail: the pipeline fails when mvn does).
        if ! mvn -q -B -Dstyle.color=never "$@" dependency:copy-dependencies \
            -DoutputDirectory="$tmp" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2; then
            rm -rf -- "$tmp"
            exec 8>&-
            die "maven could not resolve $what ($want); see above"
        fi
        if [[ ! -f "$tmp/$jar" ]]; then
            rm -rf -- "$tmp"
            exec 8>&-
            die "resolution finished but $jar is missing"
        fi
        rm -rf -- "$dir"
        mv -- "$tmp" "$dir"
        printf '%s\n' "$want" >"$marker"
        log "resolved $(find "$dir" -name '*.jar' | wc -l) jars in $((SECONDS - t0)) s"
    fi
    exec 8>&-
}

# ---------------------------------------------------------------- processes --

# port_open PORT [HOST]: something listens there.
port_open() { (exec 3<>"/dev/tcp/${2:-$HOST}/$1") 2>/dev/null; }

# require_free_port PORT VARIABLES: die when something listens on HOST:PORT.
require_free_port() {
    local p="$1" vars="$2"
    ! port_open "$p" || die "$HOST:$p is already in use by another process (set $vars)"
}

# Serialize start/stop/reset of one service: a lock file next to its state dir.
take_lock() {
    local dir="$1"
    mkdir -p "$(dirname "$dir")"
    exec 9>"$dir.lock"
    flock -w 300 9 || die "another $LOG_NAME start/stop holds $dir.lock"
}

# Start "$@" in the background, detached from the terminal (setsid; a Ctrl-C
# in the caller leaves it alone), stdin from /dev/null, output appended to
# $1 (the log).  Echoes the launcher pid.
launch_detached() {
    local out="$1"
    shift
    local -a detach=()
    command -v setsid >/dev/null 2>&1 && detach=(setsid)
    "${detach[@]}" nohup "$@" </dev/null >>"$out" 2>&1 8>&- 9>&- &
    printf '%s\n' "$!"
}

# launch_with_pidfile LOG PIDFILE CMD...: launch_detached through a bash that
# records its own pid in PIDFILE and execs CMD, so that PIDFILE holds CMD's
# pid (the launcher's too).  Echoes it.
launch_with_pidfile() {
    local out="$1" pidfile="$2"
    shift 2
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner bash.
    launch_detached "$out" bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@"
}

# A line that marks a start in a service's output log: start_banner LOG [DETAIL].
start_banner() {
    printf '\n===== %s start%s =====\n' "$(date '+%F %T')" "${2:+ ($2)}" >>"$1"
}

# True while pid runs a process whose command line has the exact argument $2.
pid_has_arg() {
    local pid="$1" arg="$2"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -Fxq -- "$arg"
}

# pidfile_pid FILE ARG: the pid on the first line of FILE while it runs a
# process with the exact argument ARG (our config file or data dir, so that a
# reused pid never counts); fails otherwise.
pidfile_pid() {
    local file="$1" arg="$2" pid
    [[ -f "$file" ]] || return 1
    pid="$(head -n 1 "$file" | tr -dc '0-9')"
    pid_has_arg "$pid" "$arg" || return 1
    printf '%s\n' "$pid"
}

# await_pid PID_FN LAUNCHER OUT WHAT: up to 5 s for PID_FN to print the pid of
# the process that LAUNCHER started (it writes the pid file), less when
# LAUNCHER ends first.  Prints the pid; when there is none, shows the end of
# the output log OUT and dies ("the WHAT process did not come up").
await_pid() {
    local pid_fn="$1" launcher="$2" out="$3" what="$4" _
    for _ in $(seq 50); do
        "$pid_fn" && return 0
        kill -0 "$launcher" 2>/dev/null || break
        sleep 0.1
    done
    "$pid_fn" && return 0
    tail -n 30 "$out" >&2 || true
    die "the $what process did not come up (logs in $LOGS)"
}

# wait_ready PID INTERVAL HOOKS PROBE...: run PROBE (with the seconds left
# until the deadline as an extra last argument) every INTERVAL seconds until it
# succeeds, for up to START_TIMEOUT seconds.  When process PID is gone,
# HOOKS_exited PID explains and dies; at the deadline, HOOKS_timed_out PID.
wait_ready() {
    local pid="$1" interval="$2" hooks="$3"
    shift 3
    local deadline=$((SECONDS + START_TIMEOUT))
    while ! "$@" "$((deadline - SECONDS))"; do
        kill -0 "$pid" 2>/dev/null || "${hooks}_exited" "$pid"
        ((SECONDS < deadline)) || "${hooks}_timed_out" "$pid"
        sleep "$interval"
    done
}

# The last steps of a start: say so and print the address on stdout.
# report_running PID ADDRESS [LABEL]: it was running already.
# report_ready T0 PID ADDRESS [LABEL]: it started (T0 from now_ms).
report_running() {
    local pid="$1" address="$2" label="${3:-}"
    log "already running (pid $pid, ${label:+$label $address, }state $STATE)"
    printf '%s\n' "$address"
}
report_ready() {
    local t0="$1" pid="$2" address="$3" label="${4:-}"
    log "ready in $(elapsed "$t0" "$(now_ms)") s: ${label:+$label }$address (pid $pid, logs $LOGS)"
    printf '%s\n' "$address"
}

# require_running PID_FN WHAT: die unless the service runs.
require_running() {
    "$1" >/dev/null || die "$2 is not running ('$0 start')"
}

# Signal pid, wait up to $3 seconds, then SIGKILL.
stop_pid() {
    local pid="$1" sig="$2" timeout="$3"
    kill "-$sig" "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid still running after ${timeout}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
}

# stop_service PID_FN SIGNAL WHAT [NOTE]: under the state dir's lock, stop the
# process that PID_FN names (SIGNAL, SIGKILL after STOP_TIMEOUT seconds);
# succeeds when it does not run.
stop_service() {
    local pid_fn="$1" sig="$2" what="$3" note="${4:-}" pid
    take_lock "$STATE"
    if ! pid="$("$pid_fn" 2>/dev/null)"; then
        log "not running"
        return 0
    fi
    log "stopping $what (pid $pid${note:+, $note})"
    stop_pid "$pid" "$sig" "$STOP_TIMEOUT"
    log "stopped"
}

# service_status PID_FN PROBE HEALTHY UNHEALTHY: one line on stdout, and exit
# status 0 running and answering (PROBE succeeds), 1 running and not
# answering, 3 stopped.  HEALTHY and UNHEALTHY follow "pid N, " in the line.
service_status() {
    local pid_fn="$1" probe="$2" healthy="$3" unhealthy="$4" pid
    if ! pid="$("$pid_fn")"; then
        printf 'stopped (state %s)\n' "$STATE"
        return 3
    fi
    if "$probe"; then
        printf 'running, healthy: pid %s, %s\n' "$pid" "$healthy"
        return 0
    fi
    printf 'running, NOT answering: pid %s, %s\n' "$pid" "$unhealthy"
    return 1
}

# delete_state: the state dir and its lock file (after a stop).
delete_state() {
    if [[ -d "$STATE" ]]; then
        rm -rf -- "$STATE"
        log "deleted $STATE"
    fi
    rm -f -- "$STATE.lock"
}

# --------------------------------------------------------- database servers --
# postgres.sh and mariadb.sh: each holds the database DB with the user
# APP_USER (as deploy/debezium/*.json expect).  They set SERVER (the server's
# name in messages), SERVER_OUT (its output log), SERVER_LOG (its error log)
# and URL, and define server_pid, answers, prepare_server (data dir and
# config: before a launch) and provision (user and database: after a start).

# shellcheck disable=SC2034 # used by postgres.sh and mariadb.sh
DB=shop APP_USER=cdcflow APP_PASSWORD=cdcflow

server_exited() {
    tail -n 30 "$SERVER_LOG" >&2 2>/dev/null || tail -n 30 "$SERVER_OUT" >&2 || true
    die "$SERVER exited during start-up (log: $SERVER_LOG)"
}

server_timed_out() {
    tail -n 30 "$SERVER_LOG" >&2 || true
    die "$SERVER did not answer within ${START_TIMEOUT}s (log: $SERVER_LOG; '$0 stop' ends it)"
}

# start_server PORT_VARIABLE DETAIL CMD...: `start`.  When the server runs
# already, wait until it answers; otherwise prepare_server, then launch CMD
# (whose pid becomes the server's) and wait.  Then provision, and print the
# URL.  DETAIL goes into the "starting" message.
start_server() {
    local port_var="$1" detail="$2"
    shift 2
    take_lock "$STATE"
    mkdir -p "$LOGS"
    local pid t0
    t0="$(now_ms)"
    if pid="$(server_pid)"; then
        wait_ready "$pid" 1 server answers
        provision
        report_running "$pid" "$URL"
        return 0
    fi
    require_free_port "$PORT" "$port_var"
    prepare_server
    start_banner "$SERVER_OUT"
    log "starting $SERVER on $HOST:$PORT ($detail)"
    local launcher
    launcher="$(launch_detached "$SERVER_OUT" "$@")"
    wait_ready "$launcher" 0.1 server answers
    provision
    pid="$(server_pid)" || die "$SERVER answers but its pid file is missing"
    report_ready "$t0" "$pid" "$URL"
}

# ------------------------------------------------------------- JVM services --

# log4j2_head NAME WHAT PROPERTY PATTERN: the start of a log4j2 configuration
# (up to <Appenders>) for WHAT's logs in the directory that the system
# property PROPERTY names, in the layout PATTERN.
log4j2_head() {
    local name="$1" what="$2" property="$3" pattern="$4"
    cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by deploy/local/$LOG_NAME: $what logs under \${sys:$property}. -->
<Configuration status="warn" name="$name">
  <Properties>
    <Property name="dir">\${sys:$property}</Property>
    <Property name="pattern">$pattern</Property>
  </Properties>
  <Appenders>
EOF
}

# log4j2_rolling NAME FILE KEEP: an appender to FILE in that directory, rolled
# over at 20 MB, KEEP old files kept.
log4j2_rolling() {
    local name="$1" file="$2" keep="$3"
    cat <<EOF
    <RollingFile name="$name" fileName="\${dir}/$file" filePattern="\${dir}/$file.%i">
      <PatternLayout pattern="\${pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="$keep"/>
    </RollingFile>
EOF
}
