package cdcflow.kstreams;

import java.io.IOException;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;

/** The one Jackson mapper of the application, with parse errors as {@link BadRecord}. */
public final class Json {
    public static final ObjectMapper MAPPER = new ObjectMapper();

    public JsonNode parse(byte[] bytes) {
        try {
            return MAPPER.readTree(bytes);
        } catch (IOException error) {
            throw new BadRecord("invalid_json", error.getMessage());
        }
    }

    public JsonNode parse(String text) {
        try {
            return MAPPER.readTree(text);
        } catch (IOException error) {
            throw new BadRecord("invalid_json", error.getMessage());
        }
    }

    /** Compact JSON bytes of a node (the stored image). */
    public byte[] bytes(JsonNode node) {
        try {
            return MAPPER.writeValueAsBytes(node);
        } catch (IOException error) {
            throw new IllegalStateException(error);
        }
    }
}
