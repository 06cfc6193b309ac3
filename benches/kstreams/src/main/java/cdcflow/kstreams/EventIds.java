package cdcflow.kstreams;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.UUID;

/**
 * Deterministic event ids: a name-based UUID (version 5, SHA-1) of (pipeline, rule, entity key,
 * version sequence) joined by the unit separator 0x1f, under the namespace
 * UUIDv5(URL, "urn:cdcflow:business-event"). The same construction as cdcflow's
 * {@code event_id}, so both contenders give one change the same ids, and a replay of a change
 * gives the same ids again.
 */
public final class EventIds {
    private static final ThreadLocal<MessageDigest> SHA1 = ThreadLocal.withInitial(() -> {
        try {
            return MessageDigest.getInstance("SHA-1");
        } catch (NoSuchAlgorithmException error) {
            throw new IllegalStateException(error);
        }
    });

    private static final UUID NAMESPACE_URL = UUID.fromString("6ba7b811-9dad-11d1-80b4-00c04fd430c8");
    private static final UUID NAMESPACE = v5(NAMESPACE_URL, "urn:cdcflow:business-event".getBytes(StandardCharsets.UTF_8));

    private EventIds() {}

    public static UUID eventId(String pipeline, String rule, String entityKey, String sequence) {
        String name = pipeline + '\u001f' + rule + '\u001f' + entityKey + '\u001f' + sequence;
        return v5(NAMESPACE, name.getBytes(StandardCharsets.UTF_8));
    }

    /** RFC 9562 version 5: SHA-1 of namespace bytes then name, version and variant bits set. */
    static UUID v5(UUID namespace, byte[] name) {
        MessageDigest sha1 = SHA1.get();
        sha1.reset();
        ByteBuffer ns = ByteBuffer.allocate(16);
        ns.putLong(namespace.getMostSignificantBits()).putLong(namespace.getLeastSignificantBits());
        sha1.update(ns.array());
        sha1.update(name);
        byte[] hash = sha1.digest();
        hash[6] = (byte) ((hash[6] & 0x0f) | 0x50);
        hash[8] = (byte) ((hash[8] & 0x3f) | 0x80);
        ByteBuffer bits = ByteBuffer.wrap(hash, 0, 16);
        return new UUID(bits.getLong(), bits.getLong());
    }
}
