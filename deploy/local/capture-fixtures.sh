#!/usr/bin/env bash
# Regenerate tests/fixtures/debezium-real/*.jsonl: real Debezium records,
# captured from a real stack, in the JSON Lines format of `kcat -C -J` (the
# input format of `cdcflow replay`):
#   {"topic","partition","offset","tstype","ts","broker","headers":[name,value,...],"key","payload"}
#
#   deploy/local/capture-fixtures.sh
#
# It runs a stack of its own, fresh every time (own ports and state dirs, so it
# never meets the developer stack of stack.sh or a test broker): Kafka, PostgreSQL,
# MariaDB, Kafka Connect with three connectors (postgres-shop,
# postgres-shop-schemas, mariadb-shop).  It loads deploy/local/sql/*.sql (the
# seeds become the initial snapshot), plays a fixed scenario of SQL changes,
# waits until every expected record is in Kafka, reads the topics with the
# console consumer and writes one file per case.  At the end it deletes that
# stack and its state (CDCFLOW_FIXTURES_KEEP=1 keeps it running).
#
# Environment: CDCFLOW_FIXTURES_OUT (default tests/fixtures/debezium-real),
# CDCFLOW_FIXTURES_KAFKA_PORT (19492; the controller takes the next port),
# CDCFLOW_FIXTURES_PG_PORT (15442), CDCFLOW_FIXTURES_MARIADB_PORT (13316),
# CDCFLOW_FIXTURES_CONNECT_PORT (18093), CDCFLOW_FIXTURES_DIR
# (~/.cache/cdcflow/fixtures-stack).
set -euo pipefail

LOG_NAME=capture-fixtures.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE="$LIB_DIR"

OUT="${CDCFLOW_FIXTURES_OUT:-$REPO_ROOT/tests/fixtures/debezium-real}"
BASE="$(check_dir "${CDCFLOW_FIXTURES_DIR:-$CDCFLOW_CACHE/fixtures-stack}")"
KPORT="${CDCFLOW_FIXTURES_KAFKA_PORT:-19492}"
require_number CDCFLOW_FIXTURES_KAFKA_PORT "$KPORT"

# The isolated stack: every script reads these.
export CDCFLOW_KAFKA_PORT="$KPORT"
export CDCFLOW_KAFKA_CONTROLLER_PORT="$((KPORT + 1))"
export CDCFLOW_KAFKA_DIR="$BASE/kafka"
export CDCFLOW_KAFKA_BOOTSTRAP="127.0.0.1:$KPORT"
export CDCFLOW_PG_PORT="${CDCFLOW_FIXTURES_PG_PORT:-15442}"
export CDCFLOW_PG_DIR="$BASE/postgres"
export CDCFLOW_MARIADB_PORT="${CDCFLOW_FIXTURES_MARIADB_PORT:-13316}"
export CDCFLOW_MARIADB_DIR="$BASE/mariadb"
export CDCFLOW_CONNECT_PORT="${CDCFLOW_FIXTURES_CONNECT_PORT:-18093}"
export CDCFLOW_CONNECT_DIR="$BASE/connect"
export CDCFLOW_CONNECT_GROUP=cdcflow-fixtures
export CDCFLOW_STACK_CONNECTORS="postgres-shop postgres-shop-schemas mariadb-shop"
# The connectors' own defaults: topic prefixes shop, shopschemas, shopmaria.
unset CDCFLOW_TOPIC_PREFIX CDCFLOW_SCHEMAS_TOPIC_PREFIX CDCFLOW_MARIADB_TOPIC_PREFIX \
    CDCFLOW_PG_DATABASE CDCFLOW_MARIADB_DATABASE CDCFLOW_MARIADB_SERVER_ID

need_cmd jq

finish() {
    local rc=$?
    if [[ "${CDCFLOW_FIXTURES_KEEP:-0}" == 1 ]]; then
        log "CDCFLOW_FIXTURES_KEEP=1: the fixture stack keeps running (state $BASE);"
        log "  end it with the same environment and: deploy/local/stack.sh reset"
    else
        log "deleting the fixture stack ($BASE)"
        "$HERE/stack.sh" reset >/dev/null 2>&1 || log "warning: stack.sh reset failed; state in $BASE"
        rm -rf -- "$BASE"
    fi
    [[ -z "${TMP:-}" ]] || rm -rf -- "$TMP"
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

T0="$(now_ms)"
log "fresh fixture stack under $BASE (Kafka 127.0.0.1:$KPORT)"
"$HERE/stack.sh" reset >/dev/null 2>&1 || true
"$HERE/stack.sh" up >/dev/null

TMP="$(mktemp -d)"

# ---------------------------------------------------------------- scenario --

pg() { "$HERE/postgres.sh" psql -U cdcflow -X -q -v ON_ERROR_STOP=1 -c "$1" >/dev/null; }
maria() { "$HERE/mariadb.sh" mysql --user=cdcflow --password=cdcflow -e "$1"; }

log "playing the scenario"
# PostgreSQL, one transaction per statement.
pg "INSERT INTO orders (id, customer_id, status, amount, created_at)
    VALUES (1001, 7, 'pending', 120.00, '2024-11-25 09:58:00+00')"
pg "UPDATE orders SET status = 'paid' WHERE id = 1001"
# A TOASTed notes column (STORAGE EXTERNAL, ~2.9 kB), then an update that leaves it alone.
pg "INSERT INTO customers (id, email, name, credit_limit, birth_date, updated_at, notes)
    VALUES (9, 'grace@example.com', 'Grace', 2500.00, '1906-12-09', '2024-11-25 10:00:00',
            repeat('Grace Hopper wrote the first compiler. ', 75))"
pg "UPDATE customers SET email = 'grace.hopper@example.com' WHERE id = 9"
pg "INSERT INTO orders (id, customer_id, status, amount, created_at)
    VALUES (1003, 9, 'pending', 15.00, '2024-11-25 10:05:00+00')"
pg "DELETE FROM orders WHERE id = 1003"
pg "INSERT INTO orders (id, customer_id, status, amount, created_at)
    VALUES (1002, 8, 'pending', 75.50, '2024-11-25 10:06:00+00')"
pg "UPDATE orders SET id = 1102 WHERE id = 1002"
# Every type of type_samples, each large column above the 2 kB TOAST threshold on
# its own, then an update of `counter` alone.
pg "INSERT INTO type_samples (id, counter, price, ratio, happened_at, local_at, day, at_time,
                              doc, docb, uid, blob, tags, scores, mood, flag, big_text)
    VALUES (2, 0, -0.5, 12345678901234567890.0123456789, '1969-07-20 20:17:40.5+00',
            '1969-07-20 20:17:40.5', '1969-07-20', '20:17:40.5',
            '{\"small\": true}', jsonb_build_object('big', repeat('j', 2500)),
            '6ba7b810-9dad-11d1-80b4-00c04fd430c8', decode(repeat('00ff', 1250), 'hex'),
            ARRAY(SELECT 'tag-' || i FROM generate_series(1, 300) i),
            ARRAY(SELECT i FROM generate_series(1, 600) i), 'sad', false,
            repeat('lorem ipsum ', 250))"
pg "UPDATE type_samples SET counter = counter + 1 WHERE id = 2"
pg "TRUNCATE orders"

# MariaDB.
maria "INSERT INTO orders (id, customer_id, status, amount, created_at)
       VALUES (1001, 7, 'pending', 120.00, '2024-11-25 09:58:00')"
maria "UPDATE orders SET status = 'paid' WHERE id = 1001"
maria "DELETE FROM orders WHERE id = 1001"
maria "UPDATE orders SET id = 1100 WHERE id = 1000"
maria "UPDATE customers SET email = 'ada.lovelace@example.com' WHERE id = 7"

# Records each topic must hold when the scenario has been captured.
declare -A EXPECT=(
    [shop.public.orders]=11         # r 1000; c,u 1001; c,d,tombstone 1003; c 1002, d 1002, tombstone, c 1102; t
    [shop.public.customers]=4       # r 7, r 8; c 9, u 9
    [shopschemas.public.orders]=11  # the same, schema-wrapped (not kept: postgres-shop covers it)
    [shopschemas.public.customers]=4
    [shopschemas.public.type_samples]=3 # r 1; c 2, u 2
    [shopmaria.shop.orders]=8       # r 1000; c,u,d,tombstone 1001; d 1000, tombstone, c 1100
    [shopmaria.shop.customers]=3    # r 7, r 8; u 7
)

end_offsets() {
    "$HERE/kafka.sh" tool org.apache.kafka.tools.GetOffsetShell \
        --bootstrap-server "$CDCFLOW_KAFKA_BOOTSTRAP" --topic '^shop(schemas|maria)?\..*' 2>/dev/null
}

total=0
for t in "${!EXPECT[@]}"; do total=$((total + EXPECT[$t])); done
log "waiting for $total records in ${#EXPECT[@]} topics"
deadline=$((SECONDS + 120))
while :; do
    offsets="$(end_offsets || true)"
    pending=""
    for t in "${!EXPECT[@]}"; do
        have="$(awk -F: -v t="$t" '$1 == t && $2 == 0 { print $3 }' <<<"$offsets")"
        [[ "${have:-0}" -ge "${EXPECT[$t]}" ]] || pending+=" $t(${have:-0}/${EXPECT[$t]})"
    done
    [[ -z "$pending" ]] && break
    ((SECONDS < deadline)) || die "records still missing after 120 s:$pending"
    sleep 1
done
for t in "${!EXPECT[@]}"; do
    have="$(awk -F: -v t="$t" '$1 == t && $2 == 0 { print $3 }' <<<"$offsets")"
    [[ "$have" -eq "${EXPECT[$t]}" ]] ||
        die "$t holds $have records, expected ${EXPECT[$t]}: the scenario and EXPECT disagree"
done

# ---------------------------------------------------------------- capture --

# dump TOPIC COUNT: the topic as kcat -C -J lines, via the console consumer's
# DefaultMessageFormatter with control-character separators (JSON text never
# holds them raw).
US=$'\x1f' RS=$'\x1e' NUL_LITERAL='<<cdcflow-null>>'
dump() {
    local topic="$1" count="$2"
    "$HERE/kafka.sh" console-consumer --bootstrap-server "$CDCFLOW_KAFKA_BOOTSTRAP" \
        --topic "$topic" --from-beginning --max-messages "$count" --timeout-ms 30000 \
        --isolation-level read_committed \
        --formatter-property print.timestamp=true --formatter-property print.partition=true \
        --formatter-property print.offset=true --formatter-property print.headers=true \
        --formatter-property print.key=true --formatter-property print.value=true \
        --formatter-property "key.separator=$US" --formatter-property "headers.separator=$RS" \
        --formatter-property "null.literal=$NUL_LITERAL" 2>/dev/null |
        jq -R -c --arg topic "$topic" --arg us "$US" --arg rs "$RS" --arg nul "$NUL_LITERAL" '
            def nullable: if . == $nul then null else . end;
            split($us) as $f
            | if ($f | length) != 6 then error("unexpected formatter output: \(.)") else . end
            | ($f[0] | capture("^(?<type>[A-Za-z]+):(?<ts>-?[0-9]+)$")) as $t
            | {
                topic: $topic,
                partition: ($f[1] | ltrimstr("Partition:") | tonumber),
                offset: ($f[2] | ltrimstr("Offset:") | tonumber),
                tstype: ({CreateTime: "create", LogAppendTime: "logappend"}[$t.type] // "notavailable"),
                ts: ($t.ts | tonumber),
                broker: 1,
                headers: (if $f[3] == "NO_HEADERS" then []
                          else [$f[3] | split($rs)[] | capture("^(?<k>[^:]*):(?<v>.*)$")
                                | .k, (.v | nullable)] end),
                key: ($f[4] | nullable),
                payload: ($f[5] | nullable)
              }'
}

for t in "${!EXPECT[@]}"; do
    dump "$t" "${EXPECT[$t]}" >"$TMP/$t.jsonl"
    n="$(wc -l <"$TMP/$t.jsonl")"
    [[ "$n" -eq "${EXPECT[$t]}" ]] || die "read $n records from $t, expected ${EXPECT[$t]}"
done

# select FILE... -- JQ_FILTER: the records of FILEs for which the filter holds;
# `v` is the envelope (schema wrapper removed), `id` the key's id.
select_records() {
    local filter="${*: -1}"
    local -a files=("${@:1:$#-1}")
    jq -c "
        def unwrap: if type == \"object\" and has(\"schema\") and has(\"payload\") then .payload else . end;
        (if .payload == null then null else .payload | fromjson | unwrap end) as \$v
        | (if .key == null then null else .key | fromjson | unwrap | .id end) as \$id
        | select($filter)" "${files[@]}"
}

FIX="$TMP/out"
mkdir -p "$FIX"
O="$TMP/shop.public.orders.jsonl" C="$TMP/shop.public.customers.jsonl"
# shellcheck disable=SC2016 # the filters are jq, not shell
{
select_records "$O" "$C" '$v != null and $v.op == "r"' >"$FIX/postgres-snapshot.jsonl"
select_records "$O" '$id == 1001 and $v.op == "c"' >"$FIX/postgres-insert.jsonl"
select_records "$O" '$id == 1001 and $v.op == "u"' >"$FIX/postgres-update.jsonl"
select_records "$C" '$id == 9' >"$FIX/postgres-update-toast-unchanged.jsonl"
select_records "$O" '$id == 1003' >"$FIX/postgres-delete.jsonl"
select_records "$O" '$id == 1002 or $id == 1102' >"$FIX/postgres-pk-change.jsonl"
select_records "$O" '$v != null and $v.op == "t"' >"$FIX/postgres-truncate.jsonl"
cp "$TMP/shopschemas.public.type_samples.jsonl" "$FIX/postgres-schemas-types.jsonl"
cp "$TMP/shopschemas.public.customers.jsonl" "$FIX/postgres-schemas-customers.jsonl"
cp "$TMP/shopmaria.shop.orders.jsonl" "$FIX/mariadb-orders.jsonl"
cp "$TMP/shopmaria.shop.customers.jsonl" "$FIX/mariadb-customers.jsonl"
}

# Every record of the shop topics is in exactly one postgres-* file.
n_orders="$(cat "$FIX"/postgres-{snapshot,insert,update,delete,pk-change,truncate}.jsonl "$FIX/postgres-update-toast-unchanged.jsonl" | wc -l)"
want=$((${EXPECT["shop.public.orders"]} + ${EXPECT["shop.public.customers"]}))
[[ "$n_orders" -eq "$want" ]] || die "the postgres-* files hold $n_orders records, expected $want"

# ---------------------------------------------------------------- versions --

PG_VERSION="$("$HERE/postgres.sh" psql -X -At -c 'SHOW server_version')"
MARIADB_VERSION="$("$HERE/mariadb.sh" mysql -N -B -e 'SELECT VERSION()')"
DEBEZIUM_VERSION="$(jq -r 'select(.payload != null) | .payload | fromjson | .source.version' "$FIX/postgres-insert.jsonl")"
CONNECT_VERSION="$("$HERE/connect.sh" url >/dev/null && curl -s "http://127.0.0.1:$CDCFLOW_CONNECT_PORT/" | jq -r .version)"
KAFKA_VERSION="${CDCFLOW_KAFKA_VERSION:-4.4.0}"

cat >"$FIX/README.md" <<EOF
# Real Debezium records

Written by \`deploy/local/capture-fixtures.sh\` on $(date -u '+%Y-%m-%d') (UTC); run it again
to regenerate every file here. Nothing in these files is edited by hand: each line is a record
that Debezium wrote to Kafka, read back with Kafka's console consumer and written in the JSON
Lines format of \`kcat -C -J\` (the input format of \`cdcflow replay\`), with the record's real
topic, partition, offset, timestamp, headers, key and value. \`broker\` is always 1, the
single broker's node id.

Captured with: Debezium $DEBEZIUM_VERSION (Postgres and MariaDB connectors), Kafka Connect
$CONNECT_VERSION, Apache Kafka $KAFKA_VERSION (broker), PostgreSQL $PG_VERSION (pgoutput), MariaDB
$MARIADB_VERSION. Schema and seed rows: \`deploy/local/sql/\`; connector configs:
\`deploy/debezium/\`; the scenario (the SQL statements) is in the script.

The Postgres tables use REPLICA IDENTITY DEFAULT. Positions (\`lsn\`, \`sequence\`, binlog
\`file\`/\`pos\`), \`txId\`, \`ts_*\` and the \`runId\` header change on every capture.

| file | topic | what it holds |
| --- | --- | --- |
| \`postgres-snapshot.jsonl\` | \`shop.public.orders\`, \`shop.public.customers\` | the initial snapshot: \`op: r\` for order 1000 and customers 7 and 8 (\`source.snapshot\` \`first\`/\`first_in_data_collection\`/\`last\`; one position shared by the snapshot) |
| \`postgres-insert.jsonl\` | \`shop.public.orders\` | \`op: c\`, order 1001 |
| \`postgres-update.jsonl\` | \`shop.public.orders\` | \`op: u\`, order 1001 paid: \`before: null\` (REPLICA IDENTITY DEFAULT) |
| \`postgres-update-toast-unchanged.jsonl\` | \`shop.public.customers\` | customer 9: \`op: c\` with a 2.9 kB \`notes\` (stored out of line), then \`op: u\` changing only the email: \`notes\` is \`"__debezium_unavailable_value"\` |
| \`postgres-delete.jsonl\` | \`shop.public.orders\` | order 1003: \`op: c\`, \`op: d\`, then the tombstone (payload null). With REPLICA IDENTITY DEFAULT Postgres sends only the key: in \`before\` the nullable columns are null and the NOT NULL ones carry Debezium's stand-ins, the column default or the type's zero (\`status\` \`"pending"\`, \`amount\` \`"0.00"\`, \`created_at\` \`"1970-01-01T00:00:00.000000Z"\`), not the row's values |
| \`postgres-pk-change.jsonl\` | \`shop.public.orders\` | order 1002 created, then \`UPDATE ... SET id = 1102\`: \`op: d\` of 1002 (key-only \`before\` with stand-ins, as above) and its tombstone, both with header \`__debezium.newkey\`, then \`op: c\` of 1102 with header \`__debezium.oldkey\`; the delete and the create share one \`source.sequence\` |
| \`postgres-truncate.jsonl\` | \`shop.public.orders\` | \`TRUNCATE orders\`: \`op: t\`, key null, \`before\`/\`after\` null (\`skipped.operations=none\`) |
| \`postgres-schemas-types.jsonl\` | \`shopschemas.public.type_samples\` | schema-wrapped (\`{"schema","payload"}\` in key and value), decimals precise: row 1 snapshot (\`r\`); row 2 created (\`c\`) with numeric (Decimal, VariableScaleDecimal), timestamptz (ZonedTimestamp), timestamp (MicroTimestamp), date (Date), time (MicroTime), json/jsonb (Json), uuid (Uuid), bytea (bytes, base64), text[] and int[] (array), an enum (Enum), boolean and large out-of-line text, bytea, arrays and jsonb; then an update of \`counter\` only (\`u\`): the placeholder in each out-of-line column |
| \`postgres-schemas-customers.jsonl\` | \`shopschemas.public.customers\` | the customers records of the first files, schema-wrapped, decimals precise (\`credit_limit\` as base64) |
| \`mariadb-orders.jsonl\` | \`shopmaria.shop.orders\` | MariaDB binlog: snapshot \`r\` of 1000 (\`server_id\` 0, \`gtid\` null, the snapshot's binlog \`file\`/\`pos\`); 1001 \`c\`, \`u\` (full \`before\`), \`d\` (full \`before\`), tombstone; then \`UPDATE ... SET id = 1100 WHERE id = 1000\`: \`d\` of 1000 and its tombstone (\`__debezium.newkey\`), \`c\` of 1100 (\`__debezium.oldkey\`), the delete and the create at the same \`file\`/\`pos\`/\`row\`. The TIMESTAMP(6) column reads \`"2024-11-24T17:00:00Z"\` in the snapshot but \`"2024-11-24T17:00:00.000000Z"\` from the binlog |
| \`mariadb-customers.jsonl\` | \`shopmaria.shop.customers\` | snapshot of 7 and 8, then an email change of 7 (DATETIME(6) as epoch microseconds, DATE as epoch days) |

The placeholder for a column that Postgres did not send (unchanged and stored out of line) is
the connector's \`unavailable.value.placeholder\`, \`__debezium_unavailable_value\`, encoded
by column type (postgres-schemas-types.jsonl, offset 2; the same without the schema wrapper):

| column type | value in \`after\` |
| --- | --- |
| text | \`"__debezium_unavailable_value"\` |
| jsonb (\`io.debezium.data.Json\`) | \`"__debezium_unavailable_value"\`: the bare text, not a JSON document |
| bytea | \`"X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ=="\`: base64 of the placeholder's bytes |
| text[] | \`["__debezium_unavailable_value"]\`: a one-element array |
| integer[] | \`[95,95,100,101,98,101,122,105,117,109,95,117,110,97,118,97,105,108,97,98,108,101,95,118,97,108,117,101]\`: the placeholder's 28 bytes as numbers |
EOF

mkdir -p "$OUT"
rm -f -- "$OUT"/*.jsonl
cp "$FIX"/* "$OUT"/
log "wrote $(find "$OUT" -name '*.jsonl' | wc -l) fixture files ($(cat "$OUT"/*.jsonl | wc -l) records) to $OUT in $(elapsed "$T0" "$(now_ms)") s"
