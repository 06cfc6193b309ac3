#!/usr/bin/env bash
# Run a real single-node Apache Kafka 4.x broker (KRaft, broker+controller in
# one JVM) on 127.0.0.1, from jars that Maven resolves from Maven Central.
#
#   kafka.sh start | stop | status | reset | bootstrap | secure-info
#   kafka.sh topics ARGS... | console-producer ARGS... | console-consumer ARGS...
#   kafka.sh tool CLASS ARGS...
#
# CDCFLOW_KAFKA_SECURE=1 adds two listeners beside PLAINTEXT: mutual TLS on
# CDCFLOW_KAFKA_SSL_PORT (default broker port + 3) and SASL_SSL with
# SCRAM-SHA-512 on CDCFLOW_KAFKA_SASL_SSL_PORT (broker port + 4).  The
# certificates (a test CA, the broker's, a client's, and an unrelated CA) are
# made with openssl under the state dir on first start; the SCRAM user is
# created when the storage is formatted.  `secure-info` prints where they are.
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
SECURE="${CDCFLOW_KAFKA_SECURE:-0}"
SSL_PORT="${CDCFLOW_KAFKA_SSL_PORT:-$((PORT + 3))}"
SASL_SSL_PORT="${CDCFLOW_KAFKA_SASL_SSL_PORT:-$((PORT + 4))}"
SCRAM_USER=cdcflow

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

    [[ "$SECURE" == 0 || "$SECURE" == 1 ]] || die "CDCFLOW_KAFKA_SECURE must be 0 or 1, got '$SECURE'"
    require_number CDCFLOW_KAFKA_SSL_PORT "$SSL_PORT"
    require_number CDCFLOW_KAFKA_SASL_SSL_PORT "$SASL_SSL_PORT"

    LIB="$CACHE/lib"
    MARKER="$CACHE/.resolved"
    DATA="$STATE/data"
    CONF="$STATE/config"
    PIDFILE="$STATE/kafka.pid"
    SERVER_PROPS="$CONF/server.properties"
    BOOTSTRAP="$HOST:$PORT"
    TLS="$STATE/tls"
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
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT$(secure_listeners)
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT$(secure_listeners)
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL

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
    if [[ "$SECURE" == 1 ]]; then write_secure_config >>"$tmp"; fi
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

# ------------------------------------------------------ secured listeners --

secure_listeners() {
    if [[ "$SECURE" == 1 ]]; then
        printf ',SSL://%s:%s,SASL_SSL://%s:%s' "$HOST" "$SSL_PORT" "$HOST" "$SASL_SSL_PORT"
    fi
}

write_secure_config() {
    local password
    password="$(cat "$TLS/store-password")"
    cat <<EOF

# Secured listeners (CDCFLOW_KAFKA_SECURE=1): mutual TLS, and SASL_SSL with SCRAM.
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS/broker.p12
ssl.keystore.password=$password
ssl.key.password=$password
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.pem
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
EOF
}

# openssl CMD ARGS...: quiet unless it fails.
run_openssl() {
    local out
    out="$(openssl "$@" 2>&1)" || die "openssl $1 failed: $out"
}

# sign_cert NAME SUBJECT [SAN]: a key and a certificate signed by the test CA.
sign_cert() {
    local name="$1" subject="$2" san="${3:-}"
    run_openssl req -new -newkey rsa:2048 -nodes -keyout "$TLS/$name.key" -out "$TLS/$name.csr" -subj "$subject"
    local ext="$TLS/$name.ext"
    printf 'basicConstraints=CA:FALSE\n' >"$ext"
    if [[ -n "$san" ]]; then printf 'subjectAltName=%s\n' "$san" >>"$ext"; fi
    run_openssl x509 -req -in "$TLS/$name.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial \
        -out "$TLS/$name.pem" -days 3650 -sha256 -extfile "$ext"
    rm -f -- "$TLS/$name.csr" "$ext"
}

# The test PKI, made once per state dir: a CA, the broker's certificate for
# 127.0.0.1 and localhost (in a PKCS12 keystore), a client certificate for
# mutual TLS, an unrelated CA (a client trusting only it must be refused), and
# the SCRAM user's password.
ensure_tls() {
    [[ "$SECURE" == 1 ]] || return 0
    [[ -f "$TLS/.complete" ]] && return 0
    command -v openssl >/dev/null 2>&1 || die "openssl is needed for CDCFLOW_KAFKA_SECURE=1 (apt-get install openssl)"
    log "making test certificates in $TLS"
    rm -rf -- "$TLS"
    mkdir -p "$TLS"
    chmod 700 "$TLS"
    run_openssl req -x509 -newkey rsa:2048 -nodes -keyout "$TLS/ca.key" -out "$TLS/ca.pem" -days 3650 \
        -subj "/CN=cdcflow test CA"
    run_openssl req -x509 -newkey rsa:2048 -nodes -keyout "$TLS/other-ca.key" -out "$TLS/other-ca.pem" \
        -days 3650 -subj "/CN=unrelated test CA"
    sign_cert broker "/CN=localhost" "DNS:localhost,IP:$HOST"
    sign_cert client "/CN=cdcflow-client"
    openssl rand -hex 16 >"$TLS/store-password"
    openssl rand -hex 16 >"$TLS/scram-password"
    run_openssl pkcs12 -export -in "$TLS/broker.pem" -inkey "$TLS/broker.key" -certfile "$TLS/ca.pem" \
        -name broker -out "$TLS/broker.p12" -passout "file:$TLS/store-password"
    touch "$TLS/.complete"
}

cmd_secure_info() {
    [[ "$SECURE" == 1 ]] || die "CDCFLOW_KAFKA_SECURE is not 1: the broker has no secured listeners"
    [[ -f "$TLS/.complete" ]] || die "no certificates in $TLS yet: start the broker first"
    cat <<EOF
ssl_bootstrap=$HOST:$SSL_PORT
sasl_ssl_bootstrap=$HOST:$SASL_SSL_PORT
ca_file=$TLS/ca.pem
other_ca_file=$TLS/other-ca.pem
client_cert_file=$TLS/client.pem
client_key_file=$TLS/client.key
scram_user=$SCRAM_USER
scram_password_file=$TLS/scram-password
EOF
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
# A secured broker's storage also holds its SCRAM user, made at format time.
formatted_for() {
    printf '%s:%s:%s' "$HOST" "$PORT" "$CONTROLLER_PORT"
    if [[ "$SECURE" == 1 ]]; then printf ':secure'; fi
}

check_same_ports() {
    local had want
    want="$(formatted_for)"
    had="$(cat "$STATE/formatted-for" 2>/dev/null || true)"
    if [[ -n "$had" && "$had" != "$want" ]]; then
        die "state in $STATE is for $had (host:broker:controller[:secure]), not $want; use those settings, another CDCFLOW_KAFKA_DIR, or '$0 reset'"
    fi
}

format_storage_once() {
    local want
    want="$(formatted_for)"
    check_same_ports
    [[ -f "$DATA/meta.properties" ]] && return 0
    local id
    id="$(run_tool "$CLASS_STORAGE" random-uuid | tail -n 1 | tr -d '[:space:]')"
    [[ -n "$id" ]] || die "StorageTool random-uuid printed nothing"
    log "formatting $DATA (cluster id $id)"
    local scram=()
    if [[ "$SECURE" == 1 ]]; then
        scram=(--add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$(cat "$TLS/scram-password")]")
    fi
    run_tool "$CLASS_STORAGE" format --standalone -t "$id" -c "$SERVER_PROPS" "${scram[@]}" >&2 ||
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

    if [[ "$SECURE" == 1 ]]; then
        for p in "$SSL_PORT" "$SASL_SSL_PORT"; do
            require_free_port "$p" "CDCFLOW_KAFKA_SSL_PORT / CDCFLOW_KAFKA_SASL_SSL_PORT"
        done
    fi

    ensure_resolved
    ensure_tls
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
  secure-info              with CDCFLOW_KAFKA_SECURE=1: the TLS and SASL_SSL addresses,
                           certificate files and SCRAM user, as key=value lines
  pid                      print the broker's pid (exit 1 when stopped): the benchmarks pin it
  topics ARGS...           $CLASS_TOPICS
  console-producer ARGS... $CLASS_PRODUCER
  console-consumer ARGS... $CLASS_CONSUMER
  tool CLASS ARGS...       any Kafka main class on the same classpath
  resolve                  only resolve the jars into $LIB

topics / console-* add --bootstrap-server $BOOTSTRAP unless given one.
EOF
}

dispatch "start stop status reset bootstrap secure-info pid resolve topics console-producer console-consumer tool" "$@"
