#!/usr/bin/env bash
# Kafka Connect in distributed mode (one worker) with Debezium's Postgres and
# MariaDB connectors, from jars that Maven resolves from Maven Central.  It
# talks to the broker that kafka.sh runs.
#
#   connect.sh start | stop | status | reset | url | plugins
#   connect.sh register FILE | delete NAME | connectors
#
# `start` and `url` print only the REST URL on stdout; everything else goes to
# stderr.  See deploy/local/README.md.
set -euo pipefail

LOG_NAME=connect.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# One Debezium version for both connectors: 3.5.0.Final is the newest release
# of debezium-connector-mariadb on Maven Central.  Debezium 3.5 calls
# org.apache.kafka.common.utils.Sanitizer, which Kafka 4.4 moved to
# ...utils.internals (NoClassDefFoundError in the task on connect-runtime
# 4.4.0), so the worker is Connect 4.3.1, the newest that runs it; it talks to
# the 4.4.0 broker as any client does.  Debezium 3.7.0.Final's Postgres
# connector runs on 4.4.0: CDCFLOW_CONNECT_VERSION=4.4.0
# CDCFLOW_DEBEZIUM_VERSION=3.7.0.Final CDCFLOW_CONNECT_PLUGINS=postgres
# (see README.md).
CONNECT_VERSION="${CDCFLOW_CONNECT_VERSION:-4.3.1}"
DEBEZIUM_VERSION="${CDCFLOW_DEBEZIUM_VERSION:-3.5.0.Final}"
PLUGIN_NAMES="${CDCFLOW_CONNECT_PLUGINS:-postgres mariadb}"
PORT="${CDCFLOW_CONNECT_PORT:-18083}"
BOOTSTRAP="${CDCFLOW_KAFKA_BOOTSTRAP:-127.0.0.1:${CDCFLOW_KAFKA_PORT:-19092}}"
GROUP="${CDCFLOW_CONNECT_GROUP:-cdcflow-connect}"
OFFSET_FLUSH_MS="${CDCFLOW_CONNECT_OFFSET_FLUSH_MS:-1000}"
CACHE="${CDCFLOW_CONNECT_CACHE:-$CDCFLOW_CACHE/connect-$CONNECT_VERSION}"
DEBEZIUM_CACHE="${CDCFLOW_DEBEZIUM_CACHE:-$CDCFLOW_CACHE/debezium-$DEBEZIUM_VERSION}"
STATE="${CDCFLOW_CONNECT_DIR:-$CDCFLOW_CACHE/connect-run}"
HEAP="${CDCFLOW_CONNECT_HEAP:-512m}"
START_TIMEOUT="${CDCFLOW_CONNECT_START_TIMEOUT:-120}"
REGISTER_TIMEOUT="${CDCFLOW_CONNECT_REGISTER_TIMEOUT:-120}"
STOP_TIMEOUT="${CDCFLOW_CONNECT_STOP_TIMEOUT:-30}"

CLASS_WORKER=org.apache.kafka.connect.cli.ConnectDistributed
WORKER_POM="$LIB_DIR/connect-pom.xml"
PLUGIN_POM="$LIB_DIR/debezium-pom.xml"

check_settings() {
    check_service_settings CONNECT
    require_number CDCFLOW_CONNECT_OFFSET_FLUSH_MS "$OFFSET_FLUSH_MS"
    require_number CDCFLOW_CONNECT_REGISTER_TIMEOUT "$REGISTER_TIMEOUT"
    require_heap CDCFLOW_CONNECT_HEAP "$HEAP"
    [[ "$GROUP" =~ ^[A-Za-z0-9._-]+$ ]] || die "CDCFLOW_CONNECT_GROUP may hold only letters, digits, '.', '_', '-': '$GROUP'"
    CACHE="$(check_dir "$CACHE")"
    DEBEZIUM_CACHE="$(check_dir "$DEBEZIUM_CACHE")"
    LIB="$CACHE/lib"
    PLUGINS="$DEBEZIUM_CACHE/plugins"
    CONF="$STATE/config"
    PIDFILE="$STATE/connect.pid"
    WORKER_PROPS="$CONF/connect-distributed.properties"
    REST="http://$HOST:$PORT"
    TOPIC_CONFIGS="$GROUP.configs"
    TOPIC_OFFSETS="$GROUP.offsets"
    TOPIC_STATUS="$GROUP.status"
}

# ----------------------------------------------------------- jar resolution --

# The worker's jars and one plugin folder per connector, each resolved once
# (the markers stay outside plugin.path).
ensure_resolved() {
    resolve_into "the Kafka Connect $CONNECT_VERSION jars" "$LIB" "$CACHE/.resolved" \
        "kafka=$CONNECT_VERSION pom=$(digest "$WORKER_POM")" "$CACHE/.resolved.lock" \
        "connect-runtime-$CONNECT_VERSION.jar" -f "$WORKER_POM" -Dkafka.version="$CONNECT_VERSION"
    [[ -f "$LIB/connect-runtime-$CONNECT_VERSION.jar" ]] ||
        die "connect-runtime-$CONNECT_VERSION.jar is missing in $LIB"
    local name marker
    for name in $PLUGIN_NAMES; do
        [[ "$name" =~ ^[a-z0-9]+$ ]] || die "CDCFLOW_CONNECT_PLUGINS: bad connector name '$name'"
        marker="$DEBEZIUM_CACHE/.debezium-connector-$name.resolved"
        # Keep the worker's own jars out of the plugin folder: the exclusions in
        # debezium-pom.xml, and excludeGroupIds for anything that slips through.
        resolve_into "debezium-connector-$name $DEBEZIUM_VERSION" "$PLUGINS/debezium-connector-$name" "$marker" \
            "debezium=$DEBEZIUM_VERSION connector=$name pom=$(digest "$PLUGIN_POM")" "$marker.lock" \
            "debezium-connector-$name-$DEBEZIUM_VERSION.jar" \
            -f "$PLUGIN_POM" -Ddebezium.version="$DEBEZIUM_VERSION" -Ddebezium.connector="$name" \
            -DincludeScope=runtime -DexcludeGroupIds=org.apache.kafka,org.slf4j
        [[ -f "$PLUGINS/debezium-connector-$name/debezium-connector-$name-$DEBEZIUM_VERSION.jar" ]] ||
            die "debezium-connector-$name-$DEBEZIUM_VERSION.jar is missing in $PLUGINS/debezium-connector-$name"
    done
}

# ------------------------------------------------------------- worker files --

write_config() {
    mkdir -p "$CONF" "$LOGS"
    local tmp="$WORKER_PROPS.tmp"
    cat >"$tmp" <<EOF
# Written by deploy/local/connect.sh on every start; edit the script, not this.
bootstrap.servers=$BOOTSTRAP
group.id=$GROUP

# Internal topics, named after the group so that several workers (tests) can
# share one broker; one replica and one partition each on a one-node broker.
config.storage.topic=$TOPIC_CONFIGS
offset.storage.topic=$TOPIC_OFFSETS
status.storage.topic=$TOPIC_STATUS
config.storage.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
offset.storage.partitions=1
status.storage.partitions=1

# Source offsets are flushed this often: after a crash, Debezium re-sends
# every change since the last flush (at-least-once).
offset.flush.interval.ms=$OFFSET_FLUSH_MS

key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter

listeners=http://$HOST:$PORT
rest.advertised.host.name=$HOST
rest.advertised.port=$PORT

# One folder per connector, each with its own class loader.  The Debezium
# jars carry ServiceLoader manifests, so no reflective scan is needed.
plugin.path=$PLUGINS
plugin.discovery=service_load

# Source connectors create their topics (the broker does not auto-create);
# each connector config sets topic.creation.default.*.
topic.creation.enable=true

# A single worker: rebalance without delay on (re)start.
scheduled.rebalance.max.delay.ms=0
EOF
    mv -- "$tmp" "$WORKER_PROPS"

    {
        log4j2_head cdcflow-connect worker connect.logs.dir '[%d] %p %X{connector.context}%m (%c)%n'
        log4j2_rolling connect connect.log 5
        cat <<'EOF'
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="connect"/></Root>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Logger name="org.reflections" level="ERROR"/>
  </Loggers>
</Configuration>
EOF
    } >"$CONF/log4j2.xml"
}

# ---------------------------------------------------------- process checks --

worker_pid() { pidfile_pid "$PIDFILE" "$WORKER_PROPS"; }

# curl the REST API: rest METHOD PATH [curl args...]; prints the body, and the
# HTTP status on the last line.
rest() {
    local method="$1" path="$2"
    shift 2
    curl -sS --max-time 30 -X "$method" -w '\n%{http_code}' "$@" "$REST$path"
}

# The worker has joined its group when GET /connectors answers 200.
answers() {
    local code
    code="$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "$REST/connectors" 2>/dev/null)" || return 1
    [[ "$code" == 200 ]]
}

# -------------------------------------------------------------- subcommands --

worker_exited() {
    log "the worker (pid $1) exited during start-up; last lines of its logs:"
    tail -n 30 "$LOGS/connect.out" >&2 2>/dev/null || true
    tail -n 30 "$LOGS/connect.log" >&2 2>/dev/null || true
    rm -f -- "$PIDFILE"
    die "Kafka Connect did not start (logs in $LOGS)"
}

worker_timed_out() {
    tail -n 20 "$LOGS/connect.log" >&2 2>/dev/null || true
    die "Kafka Connect (pid $1) not ready after ${START_TIMEOUT}s; is Kafka up at $BOOTSTRAP? logs in $LOGS ('$0 stop' ends it)"
}

# The first broker of BOOTSTRAP answers on its port.
kafka_up() {
    local bhost="${BOOTSTRAP%%,*}"
    port_open "${bhost##*:}" "${bhost%:*}"
}

cmd_start() {
    find_java "Kafka Connect $CONNECT_VERSION"
    need_cmd curl
    take_lock "$STATE"
    local pid t0
    t0="$(now_ms)"
    if pid="$(worker_pid)"; then
        wait_ready "$pid" 0.25 worker answers
        report_running "$pid" "$REST" REST
        return 0
    fi
    rm -f -- "$PIDFILE"
    require_free_port "$PORT" CDCFLOW_CONNECT_PORT
    kafka_up || die "no Kafka broker at ${BOOTSTRAP%%,*} (deploy/local/kafka.sh start, or set CDCFLOW_KAFKA_BOOTSTRAP)"
    ensure_resolved
    write_config
    start_banner "$LOGS/connect.out" "connect $CONNECT_VERSION, debezium $DEBEZIUM_VERSION"
    log "starting Kafka Connect $CONNECT_VERSION (Debezium $DEBEZIUM_VERSION: $PLUGIN_NAMES) on $REST, group $GROUP, Kafka $BOOTSTRAP"
    local launcher
    launcher="$(launch_with_pidfile "$LOGS/connect.out" "$PIDFILE" \
        "$JAVA" -Xms128m -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
        -Dconnect.logs.dir="$LOGS" -Dlog4j2.configurationFile="$CONF/log4j2.xml" \
        -cp "$LIB/*" "$CLASS_WORKER" "$WORKER_PROPS")"
    pid="$(await_pid worker_pid "$launcher" "$LOGS/connect.out" worker)"
    wait_ready "$pid" 0.25 worker answers
    report_ready "$t0" "$pid" "$REST" REST
}

cmd_stop() {
    stop_service worker_pid TERM "Kafka Connect"
    rm -f -- "$PIDFILE"
}

cmd_status() {
    service_status worker_pid answers "REST $REST, group $GROUP, Kafka $BOOTSTRAP" "REST $REST, logs $LOGS"
}

# reset: stop, delete the state dir, and delete the worker's internal topics
# (its connectors and their source offsets) when the broker answers.
cmd_reset() {
    cmd_stop
    delete_state
    local t
    if kafka_up; then
        for t in "$TOPIC_CONFIGS" "$TOPIC_OFFSETS" "$TOPIC_STATUS"; do
            "$LIB_DIR/kafka.sh" topics --bootstrap-server "$BOOTSTRAP" --delete --if-exists --topic "$t" >&2 &&
                log "deleted topic $t"
        done
    else
        log "Kafka at $BOOTSTRAP is down: internal topics $GROUP.{configs,offsets,status} kept"
    fi
}

cmd_url() { printf '%s\n' "$REST"; }

cmd_resolve() { ensure_resolved; }

need_running() {
    require_running worker_pid "Kafka Connect"
    answers || die "Kafka Connect at $REST does not answer yet"
}

# Substitute ${VAR} and ${VAR:-default} in a connector file from the
# environment (JSON-escaped).  An unset VAR without a default is an error.
substitute() {
    perl -pe '
        s#\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}#
            my ($n, $d) = ($1, $2);
            my $v = (defined $ENV{$n} && $ENV{$n} ne "") ? $ENV{$n}
                  : defined $d ? $d
                  : die "unset variable $n (no default) on line $.\n";
            $v =~ s/(["\\])/\\$1/g;
            $v
        #ge' "$1"
}

print_status() {
    local name="$1"
    rest GET "/connectors/$name/status" | sed '$d' | jq -r '
        "connector \(.name): \(.connector.state) on \(.connector.worker_id)",
        (.tasks[] | "  task \(.id): \(.state)")' >&2 || true
}

# register FILE: create or update the connector (PUT .../config), then wait
# until the connector and all its tasks are RUNNING.  Prints the name.
cmd_register() {
    local file="${1:-}"
    [[ -n "$file" && -f "$file" ]] || die "usage: $0 register FILE (a JSON file {\"name\": ..., \"config\": {...}})"
    need_cmd jq
    need_running
    # The connector's placeholders default to this worker's settings.
    export CDCFLOW_KAFKA_BOOTSTRAP="$BOOTSTRAP"
    local json name config
    json="$(substitute "$file")" || die "$file: placeholder substitution failed"
    jq -e 'type == "object" and (.name | type == "string") and (.config | type == "object")' \
        >/dev/null <<<"$json" || die "$file: expected {\"name\": \"...\", \"config\": {...}}"
    name="$(jq -r .name <<<"$json")"
    [[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "$file: connector name '$name' must be letters, digits, '.', '_', '-'"
    # Postgres slot and publication names: lower-case letters, digits, '_' (the
    # files derive them from the topic prefix, so the prefix must be one too).
    local key value
    for key in slot.name publication.name; do
        value="$(jq -r --arg k "$key" '.config[$k] // empty' <<<"$json")"
        [[ -z "$value" || "$value" =~ ^[a-z0-9_]{1,63}$ ]] ||
            die "$file: $key '$value' may hold only a-z, 0-9 and '_' (choose a topic prefix of those)"
    done
    config="$(jq -c --arg n "$name" '.config + {name: $n}' <<<"$json")"

    local t0 out code
    t0="$(now_ms)"
    out="$(rest PUT "/connectors/$name/config" -H 'Content-Type: application/json' --data-binary "$config")" ||
        die "PUT /connectors/$name/config failed (is the worker up at $REST?)"
    code="${out##*$'\n'}"
    case "$code" in
        201) log "created connector $name from $file" ;;
        200)
            log "updated connector $name from $file; restarting failed tasks, if any"
            rest POST "/connectors/$name/restart?includeTasks=true&onlyFailed=true" >/dev/null || true
            ;;
        *) die "PUT /connectors/$name/config answered $code: $(sed '$d' <<<"$out")" ;;
    esac

    local deadline=$((SECONDS + REGISTER_TIMEOUT)) body state tasks failed
    while :; do
        out="$(rest GET "/connectors/$name/status" 2>/dev/null)" || out=$'\n000'
        code="${out##*$'\n'}"
        body="$(sed '$d' <<<"$out")"
        if [[ "$code" == 200 ]]; then
            state="$(jq -r '.connector.state' <<<"$body")"
            tasks="$(jq -r '[.tasks[].state] | join(",")' <<<"$body")"
            failed="$(jq -r '[.connector.trace // empty, (.tasks[] | select(.state == "FAILED") | .trace)] | first // empty' <<<"$body")"
            if [[ "$state" == FAILED || "$tasks" == *FAILED* ]]; then
                print_status "$name"
                log "trace of the failure:"
                printf '%s\n' "$failed" >&2
                die "connector $name failed (worker log: $LOGS/connect.log)"
            fi
            if [[ "$state" == RUNNING && -n "$tasks" && "$tasks" =~ ^(RUNNING,?)+$ ]]; then
                log "connector $name and its task(s) RUNNING after $(elapsed "$t0" "$(now_ms)") s"
                printf '%s\n' "$name"
                return 0
            fi
        fi
        if ((SECONDS >= deadline)); then
            print_status "$name"
            tail -n 20 "$LOGS/connect.log" >&2 2>/dev/null || true
            die "connector $name not RUNNING after ${REGISTER_TIMEOUT}s (status $code; worker log: $LOGS/connect.log)"
        fi
        sleep 0.25
    done
}

# delete NAME: remove the connector.  A Postgres connector's replication slot
# and publication stay in the database (they keep WAL): drop them there, e.g.
#   postgres.sh psql -c "SELECT pg_drop_replication_slot('cdcflow_shop')"
cmd_delete() {
    local name="${1:-}"
    [[ -n "$name" ]] || die "usage: $0 delete NAME"
    need_running
    local out code
    out="$(rest DELETE "/connectors/$name")" || die "DELETE /connectors/$name failed"
    code="${out##*$'\n'}"
    case "$code" in
        204 | 200) log "deleted connector $name" ;;
        404) log "no connector $name" ;;
        *) die "DELETE /connectors/$name answered $code: $(sed '$d' <<<"$out")" ;;
    esac
}

cmd_connectors() {
    need_cmd jq
    need_running
    rest GET "/connectors?expand=status" | sed '$d' | jq -r '
        to_entries[] | .value.status |
        "\(.name)\t\(.connector.state)\ttasks: \([.tasks[] | "\(.id)=\(.state)"] | join(" "))"'
}

cmd_plugins() {
    need_cmd jq
    need_running
    rest GET "/connector-plugins" | sed '$d' | jq -r '.[] | "\(.class)\t\(.type)\t\(.version)"'
}

usage() {
    cat <<EOF
usage: $(basename "$0") COMMAND [ARGS...]

  start            resolve jars if needed, start the worker, wait until the REST API
                   answers; prints $REST
  stop             SIGTERM, SIGKILL after ${STOP_TIMEOUT}s
  status           exit 0 running and answering, 1 running not answering, 3 stopped
  reset            stop, delete the state dir ($STATE) and the internal
                   topics $GROUP.{configs,offsets,status}
  url              print the REST URL
  register FILE    create/update the connector in FILE (\${VAR} and \${VAR:-default}
                   substituted from the environment), wait until it and its tasks
                   are RUNNING (up to ${REGISTER_TIMEOUT}s); fails with the task's trace
  delete NAME      delete a connector
  connectors       list connectors and task states
  plugins          list the connector plugins the worker loaded
  resolve          only resolve the jars
EOF
}

dispatch "start stop status reset url register delete connectors plugins resolve" "$@"
