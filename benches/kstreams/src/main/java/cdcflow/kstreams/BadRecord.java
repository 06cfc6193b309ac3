package cdcflow.kstreams;

/** A record that cannot be processed (cdcflow would dead-letter it): counted and skipped. */
public final class BadRecord extends RuntimeException {
    private final String reason;

    public BadRecord(String reason, String message) {
        super(message, null, false, false);
        this.reason = reason;
    }

    public String reason() {
        return reason;
    }
}
