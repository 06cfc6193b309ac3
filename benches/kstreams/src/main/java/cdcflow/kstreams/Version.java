package cdcflow.kstreams;

import com.fasterxml.jackson.databind.JsonNode;

/**
 * A Postgres source position: commit LSN, then change LSN, compared as unsigned integers, the
 * way cdcflow's {@code version.by = "source_position"} orders Postgres changes.
 */
public record Version(long commit, long change) implements Comparable<Version> {

    @Override
    public int compareTo(Version other) {
        int byCommit = Long.compareUnsigned(commit, other.commit);
        return byCommit != 0 ? byCommit : Long.compareUnsigned(change, other.change);
    }

    /** The human form, cdcflow's {@code entityversion}: decimal components joined by '.'. */
    public String text() {
        return Long.toUnsignedString(commit) + "." + Long.toUnsignedString(change);
    }

    /** Lexicographically ordered text (16 hex digits per component), cdcflow's {@code sequence}. */
    public String sequence() {
        char[] text = new char[33];
        hex(commit, text, 0);
        text[16] = '.';
        hex(change, text, 17);
        return new String(text);
    }

    private static final char[] HEX = "0123456789abcdef".toCharArray();

    private static void hex(long value, char[] into, int at) {
        for (int digit = 15; digit >= 0; digit--) {
            into[at + digit] = HEX[(int) (value & 0xf)];
            value >>>= 4;
        }
    }

    /**
     * The version of a Debezium Postgres change. {@code source.sequence} is JSON text
     * {@code ["<last commit lsn>","<change lsn>"]}; the change LSN is {@code source.lsn} when
     * present, else the second element. A null first element (snapshot reads) takes the change
     * LSN, as in cdcflow, so a later re-snapshot orders after earlier streaming.
     */
    public static Version of(JsonNode source, Json json) {
        if (source == null || !source.isObject()) {
            throw new BadRecord("missing_version", "source block is missing");
        }
        Long change = unsigned(source.get("lsn"), "source.lsn");
        Long commit = null;
        JsonNode sequence = source.get("sequence");
        if (sequence != null && !sequence.isNull()) {
            if (!sequence.isTextual()) {
                throw new BadRecord("invalid_version", "source.sequence is not text");
            }
            JsonNode parts = json.parse(sequence.textValue());
            if (parts == null || !parts.isArray() || parts.size() != 2) {
                throw new BadRecord("invalid_version", "source.sequence is not a two-element array");
            }
            commit = unsigned(parts.get(0), "source.sequence[0]");
            if (change == null) {
                change = unsigned(parts.get(1), "source.sequence[1]");
            }
        }
        if (change == null) {
            throw new BadRecord("missing_version", "source.lsn is missing");
        }
        return new Version(commit == null ? change : commit, change);
    }

    private static Long unsigned(JsonNode node, String field) {
        if (node == null || node.isNull()) {
            return null;
        }
        try {
            if (node.isIntegralNumber() && node.canConvertToLong() && node.longValue() >= 0) {
                return node.longValue();
            }
            if (node.isTextual()) {
                return Long.parseUnsignedLong(node.textValue());
            }
        } catch (NumberFormatException ignored) {
            // reported below
        }
        throw new BadRecord("invalid_version", field + " holds " + node + ": expected an LSN");
    }
}
