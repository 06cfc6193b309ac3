package cdcflow.kstreams;

import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.StoreBuilder;
import org.apache.kafka.streams.state.Stores;

/**
 * The Kafka Streams contender of cdcflow's Kafka benchmark: the {@code orders} pipeline of
 * examples/shop.toml (version gate + six rules + CloudEvents out) on the Processor API over a
 * persistent RocksDB key-value store with its changelog.
 *
 * <pre>
 * run.sh --bootstrap 127.0.0.1:19092 --input shop.public.orders --output shop.order-events \
 *        --application-id bench-kstreams-eos --guarantee exactly_once_v2 --expect 1000000
 * </pre>
 *
 * Exits once {@code --expect} input records were processed (0: never), or on SIGTERM, after a
 * clean close (which commits); prints one JSON line on stdout: records, applied, duplicate,
 * stale, events, skipped, failed, elapsed_ms (start to closed), processing_ms (first record to
 * closed), records_per_s.
 */
public final class Main {
    private static final String USAGE = """
            usage: run.sh --bootstrap HOST:PORT --input TOPIC --output TOPIC --application-id ID
                          --guarantee exactly_once_v2|at_least_once [--expect N]
                          [--state-dir DIR] [--commit-interval-ms MS] [--cache-max-bytes BYTES]
                          [--rocksdb-memory-mb MB] [--pipeline NAME] [--event-source URI]
                          [--clean-up] [--set KEY=VALUE]...
              --expect N            exit after N input records (default 0: run until SIGTERM)
              --state-dir DIR       Kafka Streams state.dir (default $TMPDIR/cdcflow-kstreams)
              --commit-interval-ms  default: Kafka's (100 for exactly_once_v2, 30000 for at_least_once)
              --cache-max-bytes     statestore.cache.max.bytes (default 10485760, Kafka's default)
              --rocksdb-memory-mb   bound RocksDB's off-heap memory (block cache, index and filter
                                    blocks and memtables of every store) to MB, as Kafka Streams'
                                    memory-management guide shows (default 0: RocksDB defaults)
              --clean-up            delete this application's local state after closing
              --set KEY=VALUE       any other Kafka Streams or client setting (producer.linger.ms=5)
            """;

    public static void main(String[] argv) throws Exception {
        Map<String, String> args = new LinkedHashMap<>();
        List<String> overrides = new ArrayList<>();
        boolean cleanUp = false;
        for (int index = 0; index < argv.length; index++) {
            String arg = argv[index];
            if (arg.equals("-h") || arg.equals("--help")) {
                System.err.print(USAGE);
                return;
            }
            if (arg.equals("--clean-up")) {
                cleanUp = true;
                continue;
            }
            if (!arg.startsWith("--") || index + 1 >= argv.length) {
                fail("unexpected argument `" + arg + "`");
            }
            String value = argv[++index];
            if (arg.equals("--set")) {
                overrides.add(value);
            } else {
                args.put(arg.substring(2), value);
            }
        }
        for (String required : List.of("bootstrap", "input", "output", "application-id", "guarantee")) {
            if (!args.containsKey(required)) {
                fail("--" + required + " is required");
            }
        }
        String guarantee = args.get("guarantee");
        if (!guarantee.equals(StreamsConfig.EXACTLY_ONCE_V2) && !guarantee.equals(StreamsConfig.AT_LEAST_ONCE)) {
            fail("--guarantee must be exactly_once_v2 or at_least_once, not `" + guarantee + "`");
        }
        long expect = Long.parseLong(args.getOrDefault("expect", "0"));
        String pipeline = args.getOrDefault("pipeline", "orders");
        String eventSource = args.getOrDefault("event-source", "/cdcflow/pipelines/" + pipeline);
        long rocksdbMemoryMb = Long.parseLong(args.getOrDefault("rocksdb-memory-mb", "0"));

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, args.get("application-id"));
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, args.get("bootstrap"));
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, guarantee);
        // One stream thread: the contender gets one core.
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        props.put(StreamsConfig.STATE_DIR_CONFIG, args.getOrDefault("state-dir",
                Path.of(System.getProperty("java.io.tmpdir"), "cdcflow-kstreams").toString()));
        // Kafka's defaults unless given: 100 ms under exactly_once_v2, 30 s under at_least_once.
        if (args.containsKey("commit-interval-ms")) {
            props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, Long.parseLong(args.get("commit-interval-ms")));
        }
        props.put(StreamsConfig.STATESTORE_CACHE_MAX_BYTES_CONFIG,
                Long.parseLong(args.getOrDefault("cache-max-bytes", String.valueOf(10L * 1024 * 1024))));
        // Start from the beginning of the preloaded input (Kafka Streams' default, made explicit).
        props.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");
        // Larger producer batches than the 16 KiB default: events are ~600 bytes and every
        // partition of the output gets a steady stream. linger.ms stays Kafka Streams' 100 ms
        // default (under exactly_once_v2 each commit flushes the producer anyway).
        props.put(StreamsConfig.producerPrefix(ProducerConfig.BATCH_SIZE_CONFIG), 128 * 1024);
        if (rocksdbMemoryMb > 0) {
            BoundedMemoryRocksDBConfig.configure(rocksdbMemoryMb * 1024 * 1024);
            props.put(StreamsConfig.ROCKSDB_CONFIG_SETTER_CLASS_CONFIG, BoundedMemoryRocksDBConfig.class);
        }
        for (String override : overrides) {
            int eq = override.indexOf('=');
            if (eq <= 0) {
                fail("--set needs KEY=VALUE, not `" + override + "`");
            }
            props.put(override.substring(0, eq), override.substring(eq + 1));
        }

        Counters counters = new Counters(expect);
        Topology topology = topology(args.get("input"), args.get("output"), pipeline, eventSource, counters);
        KafkaStreams streams = new KafkaStreams(topology, props);

        AtomicInteger exitCode = new AtomicInteger();
        streams.setUncaughtExceptionHandler(error -> {
            System.err.println("cdcflow-kstreams: stream thread failed: " + error);
            exitCode.set(1);
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.PENDING_ERROR) {
                exitCode.compareAndSet(0, 1);
                counters.done.countDown();
            }
        });
        CountDownLatch closed = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            counters.done.countDown(); // SIGTERM: close cleanly, print the summary, then exit
            try {
                closed.await(120, TimeUnit.SECONDS);
            } catch (InterruptedException ignored) {
                Thread.currentThread().interrupt();
            }
        }, "cdcflow-kstreams-shutdown"));

        long started = System.nanoTime();
        streams.start();
        counters.done.await();
        boolean clean = streams.close(Duration.ofSeconds(120));
        long finished = System.nanoTime();
        if (cleanUp) {
            streams.cleanUp();
        }
        if (!clean) {
            exitCode.compareAndSet(0, 1);
        }

        long first = counters.firstRecordNanos.get();
        long processingNanos = first == 0 ? 0 : finished - first;
        long records = counters.records.get();
        System.out.println(String.format(Locale.ROOT,
                "{\"records\":%d,\"applied\":%d,\"duplicate\":%d,\"stale\":%d,\"events\":%d,"
                        + "\"skipped\":%d,\"failed\":%d,\"elapsed_ms\":%d,\"processing_ms\":%d,"
                        + "\"records_per_s\":%.0f,\"guarantee\":\"%s\",\"clean_close\":%b}",
                records, counters.applied.sum(), counters.duplicate.sum(), counters.stale.sum(),
                counters.events.sum(), counters.skipped.sum(), counters.failed.sum(),
                TimeUnit.NANOSECONDS.toMillis(finished - started),
                TimeUnit.NANOSECONDS.toMillis(processingNanos),
                processingNanos == 0 ? 0.0 : records * 1e9 / processingNanos, guarantee, clean));
        System.out.flush();
        closed.countDown();
        if (exitCode.get() != 0) {
            Runtime.getRuntime().halt(exitCode.get());
        }
    }

    /** input (bytes) -> gate and rules over the `entities` store -> output (CloudEvents JSON). */
    static Topology topology(String input, String output, String pipeline, String eventSource, Counters counters) {
        StoreBuilder<KeyValueStore<String, EntityState>> store = Stores
                .keyValueStoreBuilder(Stores.persistentKeyValueStore(OrdersProcessor.STORE),
                        Serdes.String(), EntityState.serde())
                // The record cache in front of RocksDB and the changelog (logging is on by default).
                .withCachingEnabled();
        return new Topology()
                .addSource("debezium", new ByteArrayDeserializer(), new ByteArrayDeserializer(), input)
                .addProcessor("gate-and-rules", () -> new OrdersProcessor(pipeline, eventSource, counters), "debezium")
                .addStateStore(store, "gate-and-rules")
                .addSink("events", output, new StringSerializer(), new CloudEvent.JsonSerializer(), "gate-and-rules");
    }

    private static void fail(String message) {
        System.err.println("cdcflow-kstreams: " + message);
        System.err.print(USAGE);
        System.exit(2);
    }
}
