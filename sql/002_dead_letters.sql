-- Dead letters are also kept in ClickHouse, so "what did we fail to meter, and why" is one query.
CREATE TABLE IF NOT EXISTS {database}.dead_letters
(
    failed_at        DateTime64(6, 'UTC'),
    reason           LowCardinality(String),
    detail           String,
    source_topic     LowCardinality(String),
    source_partition Int32,
    source_offset    Int64,
    key              Nullable(String),
    payload          String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(failed_at)
-- one row per failed message (topic, partition, offset) and reason; replays collapse.
ORDER BY (source_topic, source_partition, source_offset, reason, detail);
