# shellcheck shell=bash
# Helpers shared by deploy/local/{postgres,mariadb,connect,stack}.sh (sourced, not run).
# kafka.sh predates this file and stays self-contained.
#
# The sourcing script sets LOG_NAME (its name in messages) before sourcing.

LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$LIB_DIR/../.." && pwd -P)"
CDCFLOW_CACHE="${CDCFLOW_CACHE:-$HOME/.cache/cdcflow}"

log() { printf '%s: %s\n' "${LOG_NAME:-deploy}" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Seconds since the epoch with millisecond precision, and the difference in
# seconds (one decimal) between two such stamps.
now_ms() { date +%s%3N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

require_number() {
    local name="$1" value="$2"
    [[ "$value" =~ ^[0-9]+$ ]] || die "$name must be a number, got '$value'"
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

port_open() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }

# Serialize start/stop/reset of one service: a lock file next to its state dir.
take_lock() {
    local state="$1"
    mkdir -p "$(dirname "$state")"
    exec 9>"$state.lock"
    flock -w 300 9 || die "another $LOG_NAME start/stop holds $state.lock"
}

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

# True while pid runs a process whose command line has the exact argument $2.
pid_has_arg() {
    local pid="$1" arg="$2"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -Fxq -- "$arg"
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
