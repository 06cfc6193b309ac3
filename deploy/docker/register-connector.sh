#!/bin/sh
# One-shot service of docker-compose.yml (runs in the curl image, busybox sh): creates or
# updates a Kafka Connect connector from a JSON file of its config, then waits until the
# connector and every task run. PUT .../config is idempotent, so `docker compose up` again is
# harmless. Exits non-zero, with Connect's status, when a task fails or the wait times out.
#
# Environment: CONNECT_URL (http://connect:8083), CONNECTOR_NAME, CONNECTOR_CONFIG (a file
# holding the flat config object), REGISTER_TIMEOUT (seconds, 180).
set -eu

CONNECT_URL="${CONNECT_URL:-http://connect:8083}"
NAME="${CONNECTOR_NAME:?set CONNECTOR_NAME}"
CONFIG="${CONNECTOR_CONFIG:?set CONNECTOR_CONFIG}"
TIMEOUT="${REGISTER_TIMEOUT:-180}"

log() { echo "register-connector: $*" >&2; }

[ -r "$CONFIG" ] || { log "cannot read $CONFIG"; exit 1; }

# Connect answers 409 while its workers rebalance, and may still be loading plugins: retry.
log "PUT $CONNECT_URL/connectors/$NAME/config ($CONFIG)"
curl -fsS --retry 20 --retry-delay 3 --retry-all-errors --max-time 30 \
    -X PUT -H 'Content-Type: application/json' --data "@$CONFIG" \
    "$CONNECT_URL/connectors/$NAME/config" >/dev/null

deadline=$(($(date +%s) + TIMEOUT))
status=""
while :; do
    status="$(curl -fsS --max-time 10 "$CONNECT_URL/connectors/$NAME/status" 2>/dev/null || true)"
    case "$status" in
        *'"state":"FAILED"'*)
            log "connector $NAME failed: $status"
            exit 1
            ;;
    esac
    # {"connector":{"state":"RUNNING",...},"tasks":[{"id":0,"state":"RUNNING",...}],...}
    running="$(printf '%s' "$status" | grep -o '"state":"RUNNING"' | wc -l)"
    states="$(printf '%s' "$status" | grep -o '"state":"[A-Z]*"' | wc -l)"
    if [ "$states" -ge 2 ] && [ "$running" -eq "$states" ]; then
        log "connector $NAME and its $((running - 1)) task(s) are RUNNING"
        exit 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "connector $NAME not RUNNING after ${TIMEOUT}s: ${status:-no status}"
        exit 1
    fi
    sleep 2
done
