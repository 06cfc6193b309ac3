package cdcflow.kstreams;

import java.io.IOException;

import com.fasterxml.jackson.annotation.JsonInclude;
import com.fasterxml.jackson.annotation.JsonProperty;
import com.fasterxml.jackson.annotation.JsonPropertyOrder;
import com.fasterxml.jackson.databind.ObjectWriter;
import com.fasterxml.jackson.databind.node.ObjectNode;
import org.apache.kafka.common.errors.SerializationException;
import org.apache.kafka.common.serialization.Serializer;

/**
 * A business event as a structured-mode CloudEvents 1.0 document, the same attributes and
 * extensions cdcflow writes (src/engine/event.rs): {@code entityversion}, {@code sequence},
 * {@code partitionkey}, {@code causationid} and {@code correlationid}.
 */
@JsonInclude(JsonInclude.Include.NON_NULL)
@JsonPropertyOrder({"specversion", "id", "source", "type", "subject", "time", "datacontenttype",
    "data", "entityversion", "sequence", "partitionkey", "causationid", "correlationid"})
public record CloudEvent(
        String specversion,
        String id,
        String source,
        @JsonProperty("type") String type,
        String subject,
        String time,
        String datacontenttype,
        ObjectNode data,
        String entityversion,
        String sequence,
        String partitionkey,
        String causationid,
        String correlationid) {

    /** The record header cdcflow sets on structured-mode events. */
    public static final String CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8";

    /** Jackson serialisation of the whole document as the record value. */
    public static final class JsonSerializer implements Serializer<CloudEvent> {
        private final ObjectWriter writer = Json.MAPPER.writerFor(CloudEvent.class);

        @Override
        public byte[] serialize(String topic, CloudEvent event) {
            if (event == null) {
                return null;
            }
            try {
                return writer.writeValueAsBytes(event);
            } catch (IOException error) {
                throw new SerializationException("cannot serialise event " + event.id(), error);
            }
        }
    }
}
