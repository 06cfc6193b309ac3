package cdcflow.kstreams;

import java.nio.ByteBuffer;

import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;

/**
 * The stored state of one entity: its last applied version (Postgres commit LSN, then change
 * LSN) and its last row image as compact JSON bytes, or {@code null} once deleted (a tombstone
 * state that keeps its version, so older changes stay stale), as cdcflow's {@code EntityState}.
 */
public record EntityState(Version version, byte[] image) {

    public boolean deleted() {
        return image == null;
    }

    /**
     * A compact binary serde, as a Kafka Streams user would write for a hot store: one flag byte
     * (1 = live, 0 = deleted), the two version components (8 bytes each), then the image bytes.
     */
    public static Serde<EntityState> serde() {
        return Serdes.serdeFrom(new StateSerializer(), new StateDeserializer());
    }

    private static final int HEADER = 1 + 8 + 8;

    static final class StateSerializer implements Serializer<EntityState> {
        @Override
        public byte[] serialize(String topic, EntityState state) {
            if (state == null) {
                return null;
            }
            byte[] image = state.image();
            ByteBuffer buffer = ByteBuffer.allocate(HEADER + (image == null ? 0 : image.length));
            buffer.put((byte) (image == null ? 0 : 1));
            buffer.putLong(state.version().commit());
            buffer.putLong(state.version().change());
            if (image != null) {
                buffer.put(image);
            }
            return buffer.array();
        }
    }

    static final class StateDeserializer implements Deserializer<EntityState> {
        @Override
        public EntityState deserialize(String topic, byte[] data) {
            if (data == null) {
                return null;
            }
            if (data.length < HEADER) {
                throw new SerializationException("entity state of " + data.length + " bytes");
            }
            ByteBuffer buffer = ByteBuffer.wrap(data);
            boolean live = buffer.get() == 1;
            Version version = new Version(buffer.getLong(), buffer.getLong());
            byte[] image = null;
            if (live) {
                image = new byte[data.length - HEADER];
                buffer.get(image);
            }
            return new EntityState(version, image);
        }
    }
}
