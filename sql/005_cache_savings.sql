-- PricedUsage v4: a call served from the gateway's response cache (usage_source 'cache') costs
-- nothing (cost_usd 0) and saved_usd records what it would have cost at the card's price, so the
-- cache's savings are a SUM away. 0 for every other event.
ALTER TABLE {database}.usage_events
    ADD COLUMN IF NOT EXISTS saved_usd Decimal(38, 12) DEFAULT 0 AFTER usage_source;
