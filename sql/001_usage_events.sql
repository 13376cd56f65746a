-- One row per priced usage event: the history users query with SQL.
-- Money is exact: cost_usd is Decimal(38, 12), i.e. pico-USD resolution, the unit the stream uses.
CREATE TABLE IF NOT EXISTS {database}.usage_events
(
    event_id            UUID,
    event_time          DateTime64(6, 'UTC'),
    project             LowCardinality(String),
    team                Nullable(String),
    user                Nullable(String),
    service             LowCardinality(String),
    provider            LowCardinality(String),
    model               LowCardinality(String),
    input_tokens        UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens  UInt64,
    output_tokens       UInt64,
    reasoning_tokens    UInt64,
    tags                Map(String, String),
    cost_usd            Decimal(38, 12),
    price_card          LowCardinality(String),
    priced_at           DateTime64(6, 'UTC'),
    inserted_at         DateTime64(6, 'UTC') DEFAULT now64(6)
)
-- ReplacingMergeTree removes rows that repeat the whole sorting key. A re-delivered event (emitter
-- retry, sink replay after a crash) repeats project, day and event_id, so it collapses to one row.
-- Deduplication happens at merge time: query with FINAL (or GROUP BY event_id) for exact totals.
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(event_time)
-- project first: nearly every query filters or groups by project; then the day, so time-range
-- scans per project are contiguous; event_id last makes the key unique per event (the dedup key).
ORDER BY (project, toDate(event_time), event_id);
