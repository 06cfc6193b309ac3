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

LOG_NAME=kafka.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

POM="$LIB_DIR/pom.xml"

KAFKA_VERSION="${CDCFLOW_KAFKA_VERSION:-4.4.0}"
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

# ---------------------------------------------------------------- settings --

check_settings() {
    check_service_settings KAFKA
    require_number CDCFLOW_KAFKA_CONTROLLER_PORT "$CONTROLLER_PORT"
    [[ "$PORT" != "$CONTROLLER_PORT" ]] || die "broker and controller ports must differ ($PORT)"
    require_heap CDCFLOW_KAFKA_HEAP "$HEAP"
    CACHE="$(check_dir "$CACHE")"
    local d
    for d in "$CACHE" "$STATE"; do
        # Kafka splits log.dirs on commas; backslashes are escapes in .properties.
        [[ "$d" != *[,\\]* ]] || die "path must not contain ',' or '\\': $d"
    done

    LIB="$CACHE/lib"
    MARKER="$CACHE/.resolved"
    DATA="$STATE/data"
    CONF="$STATE/config"
    PIDFILE="$STATE/kafka.pid"
    SERVER_PROPS="$CONF/server.properties"
    BOOTSTRAP="$HOST:$PORT"
}

# ----------------------------------------------------------- jar resolution --

need_java() { find_java "the Kafka $KAFKA_VERSION broker"; }

resolved_marker() { printf 'kafka=%s pom=%s\n' "$KAFKA_VERSION" "$(digest "$POM")"; }

jars_resolved() { is_resolved "$LIB" "$MARKER" "$(resolved_marker)"; }

# Resolve the jars into $CACHE/lib once; later calls find the marker and return.
ensure_resolved() {
    resolve_into "the Kafka $KAFKA_VERSION jars" "$LIB" "$MARKER" "$(resolved_marker)" "$CACHE/.lock" \
        "kafka_2.13-$KAFKA_VERSION.jar" -f "$POM" -Dkafka.version="$KAFKA_VERSION"
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
    need_java
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

    {
        log4j2_head cdcflow-kafka broker kafka.logs.dir '[%d] %p %m (%c)%n'
        log4j2_rolling server server.log 5
        log4j2_rolling controller controller.log 3
        log4j2_rolling stateChange state-change.log 3
        cat <<'EOF'
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
    } >"$CONF/log4j2.xml"
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
broker_pid() { pidfile_pid "$PIDFILE" "$SERVER_PROPS"; }

# The broker answers a metadata request (TopicCommand --list) within the time.
broker_answers() {
    local secs="${1:-20}"
    [[ -f "$CONF/probe.properties" ]] || write_probe_config
    tool_cmd "$CLASS_TOPICS" --bootstrap-server "$BOOTSTRAP" \
        --command-config "$CONF/probe.properties" --list
    timeout "$secs" "${TOOL_CMD[@]}" >/dev/null 2>&1
}

# wait_ready's probe: the port is open and the broker answers within the
# seconds left (20 at most).
broker_ready() {
    local left="$1"
    ((left > 0)) && port_open "$PORT" && broker_answers "$((left < 20 ? left : 20))"
}

# status: the jars are there and the broker answers.
broker_healthy() { jars_resolved && broker_answers 30; }

# -------------------------------------------------------------- subcommands --

broker_exited() {
    log "the broker (pid $1) exited during start-up; last lines of its logs:"
    tail -n 30 "$LOGS/kafka.out" >&2 2>/dev/null || true
    tail -n 30 "$LOGS/server.log" >&2 2>/dev/null || true
    rm -f -- "$PIDFILE"
    die "broker did not start (logs in $LOGS)"
}

broker_timed_out() {
    die "broker (pid $1) not ready after ${START_TIMEOUT}s; logs in $LOGS (still running: '$0 stop' ends it)"
}

cmd_start() {
    need_java
    take_lock "$STATE"
    check_same_ports
    local pid t0
    t0="$(now_ms)"
    if pid="$(broker_pid)"; then
        wait_ready "$pid" 1 broker broker_ready
        report_running "$pid" "$BOOTSTRAP"
        return 0
    fi
    rm -f -- "$PIDFILE"
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        require_free_port "$p" "CDCFLOW_KAFKA_PORT / CDCFLOW_KAFKA_CONTROLLER_PORT"
    done

    ensure_resolved
    write_server_config
    write_tools_log4j
    format_storage_once

    log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (controller $HOST:$CONTROLLER_PORT, state $STATE)"
    start_banner "$LOGS/kafka.out" "kafka $KAFKA_VERSION"
    local launcher
    launcher="$(launch_with_pidfile "$LOGS/kafka.out" "$PIDFILE" \
        "$JAVA" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
        -Dkafka.logs.dir="$LOGS" -Dlog4j2.configurationFile="$CONF/log4j2.xml" \
        -cp "$LIB/*" "$CLASS_BROKER" "$SERVER_PROPS")"
    pid="$(await_pid broker_pid "$launcher" "$LOGS/kafka.out" broker)"
    wait_ready "$pid" 1 broker broker_ready
    report_ready "$t0" "$pid" "$BOOTSTRAP" bootstrap
}

cmd_stop() {
    stop_service broker_pid TERM broker
    rm -f -- "$PIDFILE"
}

cmd_status() {
    check_same_ports
    service_status broker_pid broker_healthy "bootstrap $BOOTSTRAP, state $STATE" "bootstrap $BOOTSTRAP, logs $LOGS"
}

cmd_reset() {
    cmd_stop
    delete_state
}

cmd_bootstrap() { printf '%s\n' "$BOOTSTRAP"; }
cmd_pid() { broker_pid || die "no broker runs on $STATE"; }
cmd_resolve() { ensure_resolved; }
cmd_topics() { run_client_tool "$CLASS_TOPICS" "$@"; }
cmd_console_producer() { run_client_tool "$CLASS_PRODUCER" "$@"; }
cmd_console_consumer() { run_client_tool "$CLASS_CONSUMER" "$@"; }

cmd_tool() {
    [[ $# -ge 1 ]] || die "usage: $0 tool CLASS [ARGS...]"
    run_tool "$@"
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
  pid                      print the broker's pid (exit 1 when stopped): the benchmarks pin it
  topics ARGS...           $CLASS_TOPICS
  console-producer ARGS... $CLASS_PRODUCER
  console-consumer ARGS... $CLASS_CONSUMER
  tool CLASS ARGS...       any Kafka main class on the same classpath
  resolve                  only resolve the jars into $LIB

topics / console-* add --bootstrap-server $BOOTSTRAP unless given one.
EOF
}

dispatch "start stop status reset bootstrap pid resolve topics console-producer console-consumer tool" "$@"
