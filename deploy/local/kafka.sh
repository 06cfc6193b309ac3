#!/usr/bin/env bash
# Run a real single-node Apache Kafka 4.x broker (KRaft, broker+controller in
# one JVM) on 127.0.0.1, from jars that Maven resolves from Maven Central.
#
#   kafka.sh start | stop | status | reset | bootstrap
#   kafka.sh topics ARGS... | console-producer ARGS... | console-consumer ARGS...
#   kafka.sh tool CLASS ARGS...
#
# Only the bootstrap address goes to stdout for `start` and `bootstrap`
# (BOOT=$(deploy/local/kafka.sh start) works); everything else the script says
# goes to stderr.  See deploy/local/README.md.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd -P)"
POM="$SCRIPT_DIR/pom.xml"

KAFKA_VERSION="${CDCFLOW_KAFKA_VERSION:-4.4.0}"
HOST=127.0.0.1
PORT="${CDCFLOW_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${CDCFLOW_KAFKA_CONTROLLER_PORT:-19093}"
CACHE="${CDCFLOW_KAFKA_CACHE:-$HOME/.cache/cdcflow/kafka-$KAFKA_VERSION}"
STATE="${CDCFLOW_KAFKA_DIR:-$HOME/.cache/cdcflow/kafka-run}"
HEAP="${CDCFLOW_KAFKA_HEAP:-512m}"
START_TIMEOUT="${CDCFLOW_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${CDCFLOW_KAFKA_STOP_TIMEOUT:-30}"

# Main classes (all checked against the 4.4.0 jars with `unzip -l`).
CLASS_BROKER=kafka.Kafka
CLASS_STORAGE=kafka.tools.StorageTool
CLASS_TOPICS=org.apache.kafka.tools.TopicCommand
CLASS_PRODUCER=org.apache.kafka.tools.ConsoleProducer
CLASS_CONSUMER=org.apache.kafka.tools.consumer.ConsoleConsumer

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- settings --

check_settings() {
    local p
    for p in "$PORT" "$CONTROLLER_PORT" "$START_TIMEOUT" "$STOP_TIMEOUT"; do
        [[ "$p" =~ ^[0-9]+$ ]] || die "not a number: '$p' (check CDCFLOW_KAFKA_* variables)"
    done
    [[ "$PORT" != "$CONTROLLER_PORT" ]] || die "broker and controller ports must differ ($PORT)"
    [[ "$HEAP" =~ ^[0-9]+[kKmMgG]?$ ]] || die "CDCFLOW_KAFKA_HEAP must look like 512m, got '$HEAP'"

    CACHE="$(realpath -m -- "$CACHE")"
    STATE="$(realpath -m -- "$STATE")"
    local d
    for d in "$CACHE" "$STATE"; do
        case "$d/" in
            "$REPO_ROOT/"*) die "$d is inside the repository $REPO_ROOT; point it elsewhere" ;;
        esac
        # Kafka splits log.dirs on commas; backslashes are escapes in .properties.
        [[ "$d" != *[,\\]* ]] || die "path must not contain ',' or '\\': $d"
        [[ "$d" != / && "$d" != "$HOME" ]] || die "refusing to use $d as a cache or state directory"
    done

    LIB="$CACHE/lib"
    MARKER="$CACHE/.resolved"
    DATA="$STATE/data"
    LOGS="$STATE/logs"
    CONF="$STATE/config"
    PIDFILE="$STATE/kafka.pid"
    SERVER_PROPS="$CONF/server.properties"
    BOOTSTRAP="$HOST:$PORT"
}

# ------------------------------------------------------------ prerequisites --

JAVA=""
find_java() {
    [[ -z "$JAVA" ]] || return 0
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
        JAVA="$JAVA_HOME/bin/java"
    elif command -v java >/dev/null 2>&1; then
        JAVA="$(command -v java)"
    else
        die "java not found. Kafka $KAFKA_VERSION needs a Java 17+ runtime:
  Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless   (or set JAVA_HOME)"
    fi
    local version major
    version="$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
    major="${version%%.*}"
    [[ "$major" == 1 ]] && major="$(cut -d. -f2 <<<"$version")"
    if [[ ! "$major" =~ ^[0-9]+$ ]] || ((major < 17)); then
        die "$JAVA is Java '$version'; the Kafka $KAFKA_VERSION broker needs Java 17+ (set JAVA_HOME)"
    fi
}

find_mvn() {
    command -v mvn >/dev/null 2>&1 && return 0
    die "mvn not found; it is needed once, to fetch the Kafka jars from Maven Central:
  Debian/Ubuntu: apt-get install -y maven"
}

# ----------------------------------------------------------- jar resolution --

pom_digest() { sha256sum "$POM" | cut -d' ' -f1; }

is_resolved() {
    [[ -f "$MARKER" && -d "$LIB" ]] || return 1
    [[ "$(cat "$MARKER")" == "kafka=$KAFKA_VERSION pom=$(pom_digest)" ]]
}

# Resolve the jars into $CACHE/lib once; later calls find the marker and return.
ensure_resolved() {
    is_resolved && return 0
    find_mvn
    mkdir -p "$CACHE"
    exec 8>"$CACHE/.lock"
    flock -w 600 8 || die "timed out waiting for another resolution in $CACHE"
    if ! is_resolved; then
        log "resolving Kafka $KAFKA_VERSION jars with Maven into $LIB (once) ..."
        local tmp="$CACHE/lib.tmp.$$" t0=$SECONDS
        rm -rf -- "$tmp"
        if ! mvn -q -B -Dstyle.color=never -f "$POM" -Dkafka.version="$KAFKA_VERSION" \
            dependency:copy-dependencies -DoutputDirectory="$tmp" >&2; then
            rm -rf -- "$tmp"
            die "maven could not resolve the Kafka $KAFKA_VERSION jars (see above)"
        fi
        [[ -n "$(find "$tmp" -maxdepth 1 -name "kafka_2.13-$KAFKA_VERSION.jar")" ]] ||
            die "resolution finished but kafka_2.13-$KAFKA_VERSION.jar is missing in $tmp"
        rm -rf -- "$LIB"
        mv -- "$tmp" "$LIB"
        printf 'kafka=%s pom=%s\n' "$KAFKA_VERSION" "$(pom_digest)" >"$MARKER"
        log "resolved $(find "$LIB" -name '*.jar' | wc -l) jars in $((SECONDS - t0)) s"
    fi
    exec 8>&-
}

# --------------------------------------------------------------- java runs --

write_tools_log4j() {
    mkdir -p "$CONF"
    cat >"$CONF/tools-log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by deploy/local/kafka.sh: CLI tools log warnings to stderr. -->
<Configuration status="warn">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
EOF
}

# TOOL_CMD=(java ... CLASS ARGS...): a Kafka CLI class on the broker's
# classpath, with JVM settings that start quickly.
TOOL_CMD=()
tool_cmd() {
    local class="$1"
    shift
    find_java
    ensure_resolved
    [[ -f "$CONF/tools-log4j2.xml" ]] || write_tools_log4j
    TOOL_CMD=("$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true
        -Dlog4j2.configurationFile="$CONF/tools-log4j2.xml"
        -cp "$LIB/*" "$class" "$@")
}

run_tool() {
    tool_cmd "$@"
    "${TOOL_CMD[@]}"
}

# Run a CLI class, adding --bootstrap-server unless the caller gave one.
run_client_tool() {
    local class="$1" a
    shift
    for a in "$@"; do
        case "$a" in
            --bootstrap-server | --bootstrap-server=* | --bootstrap-controller | --bootstrap-controller=* | --help | -h | --version)
                run_tool "$class" "$@"
                return
                ;;
        esac
    done
    run_tool "$class" --bootstrap-server "$BOOTSTRAP" "$@"
}

# ------------------------------------------------------------ broker files --

write_server_config() {
    mkdir -p "$CONF" "$LOGS" "$DATA"
    local tmp="$SERVER_PROPS.tmp"
    cat >"$tmp" <<EOF
# Written by deploy/local/kafka.sh on every start; edit the script, not this.
# Single-node KRaft: this process is both broker and controller.
process.roles=broker,controller
node.id=1

# Dynamic KRaft quorum (formatted with --standalone): no controller.quorum.voters.
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=$DATA
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1

# Internal topics can only have one replica here.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1

# Test-friendly timings.
group.initial.rebalance.delay.ms=0
transaction.max.timeout.ms=900000
log.retention.hours=24
log.segment.bytes=104857600
log.retention.check.interval.ms=300000
EOF
    mv -- "$tmp" "$SERVER_PROPS"

    cat >"$CONF/log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by deploy/local/kafka.sh: broker logs under ${sys:kafka.logs.dir}. -->
<Configuration status="warn" name="cdcflow-kafka">
  <Properties>
    <Property name="dir">${sys:kafka.logs.dir}</Property>
    <Property name="pattern">[%d] %p %m (%c)%n</Property>
  </Properties>
  <Appenders>
    <RollingFile name="server" fileName="${dir}/server.log" filePattern="${dir}/server.log.%i">
      <PatternLayout pattern="${pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>
    <RollingFile name="controller" fileName="${dir}/controller.log" filePattern="${dir}/controller.log.%i">
      <PatternLayout pattern="${pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
    <RollingFile name="stateChange" fileName="${dir}/state-change.log" filePattern="${dir}/state-change.log.%i">
      <PatternLayout pattern="${pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="org.apache.kafka.controller" level="INFO" additivity="false"><AppenderRef ref="controller"/></Logger>
    <Logger name="state.change.logger" level="INFO" additivity="false"><AppenderRef ref="stateChange"/></Logger>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
  </Loggers>
</Configuration>
EOF
    write_probe_config
}

# Admin-client settings for the readiness probe: fail fast, retry in the loop.
write_probe_config() {
    mkdir -p "$CONF"
    cat >"$CONF/probe.properties" <<'EOF'
request.timeout.ms=5000
default.api.timeout.ms=10000
socket.connection.setup.timeout.ms=2000
socket.connection.setup.timeout.max.ms=5000
EOF
}

# The KRaft bootstrap checkpoint written by `format --standalone` records the
# controller endpoint, so the listener ports are fixed at format time.
check_same_ports() {
    local had want="$HOST:$PORT:$CONTROLLER_PORT"
    had="$(cat "$STATE/formatted-for" 2>/dev/null || true)"
    if [[ -n "$had" && "$had" != "$want" ]]; then
        die "state in $STATE is for $had (host:broker:controller), not $want; use those ports, another CDCFLOW_KAFKA_DIR, or '$0 reset'"
    fi
}

format_storage_once() {
    local want="$HOST:$PORT:$CONTROLLER_PORT"
    check_same_ports
    [[ -f "$DATA/meta.properties" ]] && return 0
    local id
    id="$(run_tool "$CLASS_STORAGE" random-uuid | tail -n 1 | tr -d '[:space:]')"
    [[ -n "$id" ]] || die "StorageTool random-uuid printed nothing"
    log "formatting $DATA (cluster id $id)"
    run_tool "$CLASS_STORAGE" format --standalone -t "$id" -c "$SERVER_PROPS" >&2 ||
        die "StorageTool format failed"
    printf '%s\n' "$id" >"$STATE/cluster.id"
    printf '%s\n' "$want" >"$STATE/formatted-for"
}

# ---------------------------------------------------------- process checks --

# Pid of the broker that runs on *this* state dir, or nothing.  A pid file's
# pid counts only while that process is a JVM running our server.properties.
broker_pid() {
    local pid
    [[ -f "$PIDFILE" ]] || return 1
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [[ -n "$pid" ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -Fxq -- "$SERVER_PROPS" || return 1
    printf '%s\n' "$pid"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The broker answers a metadata request (TopicCommand --list) within the time.
broker_answers() {
    local secs="${1:-20}"
    [[ -f "$CONF/probe.properties" ]] || write_probe_config
    tool_cmd "$CLASS_TOPICS" --bootstrap-server "$BOOTSTRAP" \
        --command-config "$CONF/probe.properties" --list
    timeout "$secs" "${TOOL_CMD[@]}" >/dev/null 2>&1
}

# -------------------------------------------------------------- subcommands --

take_lock() {
    mkdir -p "$(dirname "$STATE")"
    exec 9>"$STATE.lock"
    flock -w 300 9 || die "another kafka.sh start/stop holds $STATE.lock"
}

wait_ready() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT)) left
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "the broker (pid $pid) exited during start-up; last lines of its logs:"
            tail -n 30 "$LOGS/kafka.out" >&2 2>/dev/null || true
            tail -n 30 "$LOGS/server.log" >&2 2>/dev/null || true
            rm -f -- "$PIDFILE"
            die "broker did not start (logs in $LOGS)"
        fi
        left=$((deadline - SECONDS))
        ((left > 0)) || die "broker (pid $pid) not ready after ${START_TIMEOUT}s; logs in $LOGS (still running: '$0 stop' ends it)"
        if port_open "$PORT" && broker_answers "$((left < 20 ? left : 20))"; then
            return 0
        fi
        sleep 1
    done
}

cmd_start() {
    find_java
    take_lock
    check_same_ports
    local pid t0=$SECONDS
    if pid="$(broker_pid)"; then
        if broker_answers 30; then
            log "already running (pid $pid, state $STATE)"
            printf '%s\n' "$BOOTSTRAP"
            return 0
        fi
        log "running (pid $pid) but not answering yet; waiting"
        wait_ready "$pid"
        printf '%s\n' "$BOOTSTRAP"
        return 0
    fi
    rm -f -- "$PIDFILE"
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        ! port_open "$p" || die "$HOST:$p is already in use by another process (set CDCFLOW_KAFKA_PORT / CDCFLOW_KAFKA_CONTROLLER_PORT)"
    done

    ensure_resolved
    write_server_config
    write_tools_log4j
    format_storage_once

    log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (controller $HOST:$CONTROLLER_PORT, state $STATE)"
    {
        printf '\n===== %s start (kafka %s) =====\n' "$(date '+%F %T')" "$KAFKA_VERSION"
    } >>"$LOGS/kafka.out"
    local -a detach=()
    command -v setsid >/dev/null 2>&1 && detach=(setsid)
    # The inner bash records its own pid and execs java, so the pid file holds
    # the JVM's pid.  setsid: a Ctrl-C in the caller's terminal leaves it alone.
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner bash.
    "${detach[@]}" nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PIDFILE" \
        "$JAVA" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
        -Dkafka.logs.dir="$LOGS" -Dlog4j2.configurationFile="$CONF/log4j2.xml" \
        -cp "$LIB/*" "$CLASS_BROKER" "$SERVER_PROPS" \
        </dev/null >>"$LOGS/kafka.out" 2>&1 8>&- 9>&- &
    local launcher=$!
    local _
    for _ in $(seq 50); do
        pid="$(broker_pid)" && break
        kill -0 "$launcher" 2>/dev/null || break
        sleep 0.1
    done
    pid="$(broker_pid)" || {
        tail -n 30 "$LOGS/kafka.out" >&2 || true
        die "the broker process did not come up (logs in $LOGS)"
    }
    wait_ready "$pid"
    log "ready in $((SECONDS - t0)) s: bootstrap $BOOTSTRAP (pid $pid, logs $LOGS)"
    printf '%s\n' "$BOOTSTRAP"
}

cmd_stop() {
    take_lock
    local pid
    if ! pid="$(broker_pid)"; then
        rm -f -- "$PIDFILE"
        log "not running"
        return 0
    fi
    log "stopping broker (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still running after ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
    rm -f -- "$PIDFILE"
    log "stopped"
}

cmd_status() {
    local pid
    check_same_ports
    if ! pid="$(broker_pid)"; then
        printf 'stopped (state %s)\n' "$STATE"
        return 3
    fi
    if is_resolved && broker_answers 30; then
        printf 'running, healthy: pid %s, bootstrap %s, state %s\n' "$pid" "$BOOTSTRAP" "$STATE"
        return 0
    fi
    printf 'running, NOT answering: pid %s, bootstrap %s, logs %s\n' "$pid" "$BOOTSTRAP" "$LOGS"
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

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND [ARGS...]

  start                    resolve jars if needed, format once, start, wait until ready;
                           prints the bootstrap address ($BOOTSTRAP)
  stop                     SIGTERM, then SIGKILL after ${STOP_TIMEOUT}s
  status                   exit 0 running and answering, 1 running not answering, 3 stopped
  reset                    stop and delete the state dir ($STATE)
  bootstrap                print the bootstrap address
  topics ARGS...           $CLASS_TOPICS
  console-producer ARGS... $CLASS_PRODUCER
  console-consumer ARGS... $CLASS_CONSUMER
  tool CLASS ARGS...       any Kafka main class on the same classpath
  resolve                  only resolve the jars into $LIB

topics / console-* add --bootstrap-server $BOOTSTRAP unless given one.
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
        bootstrap) printf '%s\n' "$BOOTSTRAP" ;;
        resolve) ensure_resolved ;;
        topics) run_client_tool "$CLASS_TOPICS" "$@" ;;
        console-producer) run_client_tool "$CLASS_PRODUCER" "$@" ;;
        console-consumer) run_client_tool "$CLASS_CONSUMER" "$@" ;;
        tool)
            [[ $# -ge 1 ]] || die "usage: $0 tool CLASS [ARGS...]"
            run_tool "$@"
            ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
