package cdcflow.kstreams;

import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.LongAdder;

/**
 * What the processors did, shared by every task of the instance. {@link #done} opens once
 * {@code expect} input records were processed (never when {@code expect} is 0).
 */
public final class Counters {
    final AtomicLong records = new AtomicLong();
    final LongAdder applied = new LongAdder();
    final LongAdder duplicate = new LongAdder();
    final LongAdder stale = new LongAdder();
    final LongAdder events = new LongAdder();
    /** Tombstones, logical messages and truncates: counted, never gated. */
    final LongAdder skipped = new LongAdder();
    /** Records cdcflow would dead-letter (undecodable, no version, a rule error). */
    final LongAdder failed = new LongAdder();
    final AtomicLong firstRecordNanos = new AtomicLong();
    final CountDownLatch done = new CountDownLatch(1);
    private final long expect;

    public Counters(long expect) {
        this.expect = expect;
    }

    /** Counts one processed input record; opens {@link #done} at the expected count. */
    void recordProcessed() {
        long seen = records.incrementAndGet();
        if (seen == 1) {
            firstRecordNanos.compareAndSet(0, System.nanoTime());
        }
        if (seen == expect) {
            done.countDown();
        }
    }
}
