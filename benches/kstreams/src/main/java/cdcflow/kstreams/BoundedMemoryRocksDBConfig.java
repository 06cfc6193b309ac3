package cdcflow.kstreams;

import java.util.Map;

import org.apache.kafka.streams.state.RocksDBConfigSetter;
import org.rocksdb.BlockBasedTableConfig;
import org.rocksdb.Cache;
import org.rocksdb.LRUCache;
import org.rocksdb.Options;
import org.rocksdb.WriteBufferManager;

/**
 * Bounds the off-heap memory of every RocksDB store of the instance, as the "RocksDB" section
 * of Kafka Streams' memory-management guide shows: one LRU cache shared by all stores holds
 * data, index and filter blocks, and a write-buffer manager charges the memtables to it.
 * Used only with {@code --rocksdb-memory-mb}.
 */
public final class BoundedMemoryRocksDBConfig implements RocksDBConfigSetter {
    /** Share of the total given to memtables, and to high-priority index and filter blocks. */
    private static final double MEMTABLE_SHARE = 0.5;
    private static final double INDEX_FILTER_BLOCK_RATIO = 0.1;
    private static final long BLOCK_SIZE = 4 * 1024;
    private static final int N_MEMTABLES = 3;

    private static long totalBytes;
    private static Cache cache;
    private static WriteBufferManager writeBufferManager;
    private static long memtableSize;

    static synchronized void configure(long total) {
        totalBytes = total;
    }

    /** Built on first use: the native library is loaded by then (Kafka Streams loads it). */
    private static synchronized void shared() {
        if (cache == null) {
            long memtables = (long) (totalBytes * MEMTABLE_SHARE);
            cache = new LRUCache(totalBytes, -1, false, INDEX_FILTER_BLOCK_RATIO);
            writeBufferManager = new WriteBufferManager(memtables, cache);
            memtableSize = Math.max(1024 * 1024, memtables / N_MEMTABLES);
        }
    }

    @Override
    public void setConfig(String storeName, Options options, Map<String, Object> configs) {
        shared();
        BlockBasedTableConfig table = (BlockBasedTableConfig) options.tableFormatConfig();
        // These three together bound RocksDB's memory to the cache's size.
        table.setBlockCache(cache);
        table.setCacheIndexAndFilterBlocks(true);
        options.setWriteBufferManager(writeBufferManager);
        // Recommended with them by the guide.
        table.setCacheIndexAndFilterBlocksWithHighPriority(true);
        table.setPinTopLevelIndexAndFilter(true);
        table.setBlockSize(BLOCK_SIZE);
        options.setMaxWriteBufferNumber(N_MEMTABLES);
        options.setWriteBufferSize(memtableSize);
        options.setTableFormatConfig(table);
    }

    @Override
    public void close(String storeName, Options options) {
        // The cache and the write-buffer manager are shared by every store: never closed here.
    }
}
