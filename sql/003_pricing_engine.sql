-- The pricing engine (UsageEvent v2, PricedUsage v2): every meter, which card and version priced
-- the event, the cost per meter, and whether the model had its own price.
ALTER TABLE {database}.usage_events
    ADD COLUMN IF NOT EXISTS cache_write_1h_tokens UInt64 DEFAULT 0 AFTER cache_write_tokens,
    ADD COLUMN IF NOT EXISTS input_audio_tokens UInt64 DEFAULT 0 AFTER reasoning_tokens,
    ADD COLUMN IF NOT EXISTS output_audio_tokens UInt64 DEFAULT 0 AFTER input_audio_tokens,
    ADD COLUMN IF NOT EXISTS audio_seconds Decimal(18, 6) DEFAULT 0 AFTER output_audio_tokens,
    ADD COLUMN IF NOT EXISTS characters UInt64 DEFAULT 0 AFTER audio_seconds,
    ADD COLUMN IF NOT EXISTS images UInt64 DEFAULT 0 AFTER characters,
    ADD COLUMN IF NOT EXISTS image_size LowCardinality(String) DEFAULT '' AFTER images,
    ADD COLUMN IF NOT EXISTS image_quality LowCardinality(String) DEFAULT '' AFTER image_size,
    ADD COLUMN IF NOT EXISTS requests UInt64 DEFAULT 0 AFTER image_quality,
    ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String) DEFAULT 'standard' AFTER requests,
    ADD COLUMN IF NOT EXISTS region LowCardinality(String) DEFAULT 'global' AFTER service_tier,
    -- priced: the model's own card; fallback: no card, charged at the fallback card so budgets
    -- move; unpriced: no card and no fallback (cost_usd is NULL: unknown, never zero).
    ADD COLUMN IF NOT EXISTS pricing_status LowCardinality(String) DEFAULT 'priced' AFTER price_card,
    ADD COLUMN IF NOT EXISTS card_version LowCardinality(String) DEFAULT '' AFTER pricing_status,
    ADD COLUMN IF NOT EXISTS itemised Map(LowCardinality(String), Decimal(38, 12)) AFTER card_version,
    ADD COLUMN IF NOT EXISTS unpriced_reason String DEFAULT '' AFTER itemised,
    MODIFY COLUMN cost_usd Nullable(Decimal(38, 12));

-- Re-pricing never overwrites usage_events (the price charged when the event streamed through).
-- Each `spendstream reprice` run writes the recomputed cost of the events it covered here, under
-- a new pricing_version; usage_cost_latest gives every event's most recent cost.
CREATE TABLE IF NOT EXISTS {database}.usage_repriced
(
    pricing_version UInt32,
    event_id        UUID,
    event_time      DateTime64(6, 'UTC'),
    project         LowCardinality(String),
    provider        LowCardinality(String),
    model           LowCardinality(String),
    cost_usd        Nullable(Decimal(38, 12)),
    previous_cost_usd Nullable(Decimal(38, 12)),
    price_card      LowCardinality(String),
    card_version    LowCardinality(String),
    pricing_status  LowCardinality(String),
    itemised        Map(LowCardinality(String), Decimal(38, 12)),
    repriced_at     DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree(repriced_at)
PARTITION BY toYYYYMM(event_time)
-- one row per event and version: a retried run of the same version collapses.
ORDER BY (project, toDate(event_time), event_id, pricing_version);

CREATE TABLE IF NOT EXISTS {database}.pricing_runs
(
    pricing_version UInt32,
    started_at      DateTime64(6, 'UTC'),
    range_from      DateTime64(6, 'UTC'),
    range_to        DateTime64(6, 'UTC'),
    model_filter    String,
    catalogue_cards UInt32,
    events          UInt64,
    previous_total_usd Nullable(Decimal(38, 12)),
    new_total_usd   Nullable(Decimal(38, 12))
)
ENGINE = MergeTree
ORDER BY pricing_version;

-- The latest cost of every event: the newest re-pricing if any, else the streamed price.
CREATE VIEW IF NOT EXISTS {database}.usage_cost_latest AS
SELECT
    e.event_id AS event_id,
    e.event_time AS event_time,
    e.project AS project,
    e.provider AS provider,
    e.model AS model,
    if(r.latest_version > 0, r.latest_cost_usd, e.cost_usd) AS cost_usd,
    if(r.latest_version > 0, r.latest_status, e.pricing_status) AS pricing_status,
    if(r.latest_version > 0, r.latest_card, e.price_card) AS price_card,
    greatest(r.latest_version, 1) AS pricing_version
FROM {database}.usage_events AS e FINAL
LEFT JOIN
(
    SELECT event_id, max(pricing_version) AS latest_version,
           argMax(cost_usd, pricing_version) AS latest_cost_usd,
           argMax(pricing_status, pricing_version) AS latest_status,
           argMax(price_card, pricing_version) AS latest_card
    FROM {database}.usage_repriced FINAL
    GROUP BY event_id
) AS r ON e.event_id = r.event_id;
