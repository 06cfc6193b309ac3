package cdcflow.kstreams;

import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.time.ZoneOffset;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import com.fasterxml.jackson.databind.node.NullNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.processor.api.RecordMetadata;
import org.apache.kafka.streams.state.KeyValueStore;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The {@code orders} pipeline of examples/shop.toml: decodes a Debezium Postgres change (no
 * schema wrapper needed; a {@code schema}/{@code payload} wrapper is unwrapped, without
 * Connect logical-type conversion), gates its version against the entity's stored state
 * (newer: applied, equal: duplicate, older: stale), and for applied changes runs the six rules
 * and forwards their CloudEvents keyed by entity.
 */
public final class OrdersProcessor implements Processor<byte[], byte[], String, CloudEvent> {
    public static final String STORE = "entities";
    private static final Logger LOG = LoggerFactory.getLogger(OrdersProcessor.class);
    private static final DateTimeFormatter TIME =
            DateTimeFormatter.ofPattern("uuuu-MM-dd'T'HH:mm:ss.SSS'Z'").withZone(ZoneOffset.UTC);
    private static final JsonNodeFactory NODES = JsonNodeFactory.instance;

    private final String pipeline;
    private final String eventSource;
    private final Counters counters;
    private final Json json = new Json();
    private ProcessorContext<String, CloudEvent> context;
    private KeyValueStore<String, EntityState> store;

    public OrdersProcessor(String pipeline, String eventSource, Counters counters) {
        this.pipeline = pipeline;
        this.eventSource = eventSource;
        this.counters = counters;
    }

    @Override
    public void init(ProcessorContext<String, CloudEvent> context) {
        this.context = context;
        this.store = context.getStateStore(STORE);
    }

    @Override
    public void process(Record<byte[], byte[]> record) {
        try {
            handle(record);
        } catch (BadRecord bad) {
            counters.failed.increment();
            if (LOG.isDebugEnabled()) {
                LOG.debug("skipped a record ({}): {}", bad.reason(), bad.getMessage());
            }
        } finally {
            counters.recordProcessed();
        }
    }

    private void handle(Record<byte[], byte[]> record) {
        if (record.value() == null) {
            counters.skipped.increment(); // the tombstone after a delete
            return;
        }
        JsonNode value = unwrap(json.parse(record.value()));
        String op = text(value.get("op"));
        if (op == null || !(op.equals("c") || op.equals("u") || op.equals("d") || op.equals("r"))) {
            if (op == null) {
                throw new BadRecord("invalid_envelope", "no op");
            }
            counters.skipped.increment(); // 'm' (logical message) and 't' (truncate)
            return;
        }
        if (record.key() == null) {
            throw new BadRecord("missing_key", "record has no key");
        }
        JsonNode keyFields = unwrap(json.parse(record.key()));
        String key = canonicalKey(keyFields);
        JsonNode source = value.get("source");
        Version version = Version.of(source, json);

        EntityState stored = store.get(key);
        if (stored != null) {
            int order = version.compareTo(stored.version());
            if (order == 0) {
                counters.duplicate.increment();
                return;
            }
            if (order < 0) {
                counters.stale.increment();
                return;
            }
        }
        ObjectNode before = object(value.get("before"));
        ObjectNode after = object(value.get("after"));
        ObjectNode previous = stored == null || stored.deleted() ? null : (ObjectNode) json.parse(stored.image());
        ObjectNode old = before != null ? before : previous;

        List<Fired> fired = rules(op, after, old, previous, keyFields);
        counters.applied.increment();
        if (!fired.isEmpty()) {
            String sequence = version.sequence();
            String entityVersion = version.text();
            String time = sourceTime(source, value);
            String causation = causation();
            String correlation = correlation(value, source);
            for (Fired event : fired) {
                CloudEvent document = new CloudEvent(
                        "1.0",
                        EventIds.eventId(pipeline, event.rule, key, sequence).toString(),
                        eventSource,
                        event.type,
                        key,
                        time,
                        "application/json",
                        event.data,
                        entityVersion,
                        sequence,
                        key,
                        causation,
                        correlation);
                Record<String, CloudEvent> out = new Record<>(key, document, record.timestamp());
                out.headers().add("content-type", CloudEvent.CONTENT_TYPE.getBytes(StandardCharsets.UTF_8));
                context.forward(out);
                counters.events.increment();
            }
        }
        byte[] image = op.equals("d") || after == null ? null : json.bytes(after);
        store.put(key, new EntityState(version, image));
    }

    private record Fired(String rule, String type, ObjectNode data) {}

    /** The six rules of the {@code orders} pipeline, in the order of examples/shop.toml. */
    private static List<Fired> rules(String op, ObjectNode after, ObjectNode old, ObjectNode previous, JsonNode key) {
        List<Fired> fired = new ArrayList<>(2);
        boolean update = op.equals("u");
        if (op.equals("c")) {
            fired.add(new Fired("created", "com.example.shop.OrderCreated", data(
                    "order_id", field(after, "after", "id"),
                    "customer_id", field(after, "after", "customer_id"),
                    "amount", field(after, "after", "amount"),
                    "status", field(after, "after", "status"))));
        }
        if (update && old != null) {
            JsonNode status = field(after, "after", "status");
            JsonNode oldStatus = field(old, "old", "status");
            if (isText(status, "paid") && !isText(oldStatus, "paid")) {
                fired.add(new Fired("paid", "com.example.shop.OrderPaid", data(
                        "order_id", field(after, "after", "id"),
                        "amount", field(after, "after", "amount"),
                        "from_status", oldStatus)));
            }
            if (isText(status, "shipped") && !isText(oldStatus, "shipped")) {
                fired.add(new Fired("shipped", "com.example.shop.OrderShipped", data(
                        "order_id", field(after, "after", "id"),
                        "from_status", oldStatus)));
            }
            if (isText(status, "cancelled") && !isText(oldStatus, "cancelled")) {
                fired.add(new Fired("cancelled", "com.example.shop.OrderCancelled", data(
                        "order_id", field(after, "after", "id"),
                        "from_status", oldStatus,
                        "amount", field(after, "after", "amount"))));
            }
            // 'amount' in changed: the values differ, a missing field counting as null.
            if (!orNull(old.get("amount")).equals(orNull(after == null ? null : after.get("amount")))) {
                fired.add(new Fired("amount_changed", "com.example.shop.OrderAmountChanged", data(
                        "order_id", field(after, "after", "id"),
                        "from", old.get("amount"),
                        "to", field(after, "after", "amount"))));
            }
        }
        if (op.equals("d")) {
            fired.add(new Fired("deleted", "com.example.shop.OrderDeleted", data(
                    "order_id", field(key, "key", "id"),
                    "last_status", previous != null ? field(previous, "previous", "status") : NullNode.getInstance())));
        }
        return fired;
    }

    /** A field of an image, as CEL reads it: a missing image or field is a rule error. */
    private static JsonNode field(JsonNode image, String name, String field) {
        if (image == null || image.isNull()) {
            throw new BadRecord("rule_error", name + " is null, reading ." + field);
        }
        JsonNode value = image.get(field);
        if (value == null) {
            throw new BadRecord("rule_error", "no such key: " + field + " in " + name);
        }
        return value;
    }

    private static boolean isText(JsonNode node, String text) {
        return node != null && node.isTextual() && node.textValue().equals(text);
    }

    private static JsonNode orNull(JsonNode node) {
        return node == null ? NullNode.getInstance() : node;
    }

    private static ObjectNode data(Object... pairs) {
        ObjectNode data = NODES.objectNode();
        for (int index = 0; index < pairs.length; index += 2) {
            data.set((String) pairs[index], orNull((JsonNode) pairs[index + 1]));
        }
        return data;
    }

    private static ObjectNode object(JsonNode node) {
        return node != null && node.isObject() ? (ObjectNode) node : null;
    }

    private static String text(JsonNode node) {
        return node != null && node.isTextual() ? node.textValue() : null;
    }

    /** The JsonConverter wrapper {@code {"schema":…,"payload":…}} is unwrapped. */
    private static JsonNode unwrap(JsonNode node) {
        if (node != null && node.isObject() && node.size() == 2 && node.has("schema") && node.has("payload")) {
            return node.get("payload");
        }
        return node;
    }

    /**
     * cdcflow's entity key text: a single-field key is the field's scalar text ({"id":42} is
     * 42), a composite key compact JSON with sorted field names.
     */
    static String canonicalKey(JsonNode fields) {
        if (fields == null || fields.isNull()) {
            throw new BadRecord("missing_key", "record key is null");
        }
        if (fields.isObject() && fields.size() == 1) {
            return scalarOrJson(fields.elements().next());
        }
        if (fields.isObject()) {
            Map<String, JsonNode> sorted = new TreeMap<>();
            for (Iterator<Map.Entry<String, JsonNode>> it = fields.fields(); it.hasNext(); ) {
                Map.Entry<String, JsonNode> entry = it.next();
                sorted.put(entry.getKey(), entry.getValue());
            }
            ObjectNode canonical = NODES.objectNode();
            sorted.forEach(canonical::set);
            return canonical.toString();
        }
        return scalarOrJson(fields);
    }

    private static String scalarOrJson(JsonNode value) {
        return value.isTextual() ? value.textValue() : value.toString();
    }

    /** CloudEvents {@code time}: the source commit time, else the envelope's {@code ts_ms}. */
    private static String sourceTime(JsonNode source, JsonNode value) {
        JsonNode millis = source.get("ts_ms");
        if (millis == null || !(millis.isIntegralNumber() || millis.isTextual())) {
            millis = value.get("ts_ms");
        }
        if (millis == null || millis.isNull()) {
            return null;
        }
        try {
            long epochMillis = millis.isTextual() ? Long.parseLong(millis.textValue()) : millis.longValue();
            return TIME.format(Instant.ofEpochMilli(epochMillis));
        } catch (NumberFormatException error) {
            return null;
        }
    }

    /** {@code topic/partition/offset} of the input record. */
    private String causation() {
        return context.recordMetadata()
                .map((RecordMetadata meta) -> meta.topic() + "/" + meta.partition() + "/" + meta.offset())
                .orElse("");
    }

    /** The envelope's {@code transaction.id}, else the connector's txId, gtid, xid or txid. */
    private static String correlation(JsonNode value, JsonNode source) {
        JsonNode transaction = value.get("transaction");
        if (transaction != null && transaction.isObject()) {
            String id = scalarText(transaction.get("id"));
            if (id != null) {
                return id;
            }
        }
        for (String name : new String[] {"txId", "gtid", "xid", "txid"}) {
            JsonNode id = source.get(name);
            if (id != null) {
                return scalarText(id);
            }
        }
        return null;
    }

    private static String scalarText(JsonNode node) {
        if (node == null || node.isNull() || node.isContainerNode()) {
            return null;
        }
        return node.isTextual() ? node.textValue() : node.asText();
    }
}
