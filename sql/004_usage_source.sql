-- UsageEvent v3: where the counts come from. reported (the provider's usage object), estimated
-- (the provider reported none, e.g. a stream cut short; counted by the client and flagged),
-- missing (no usage, no estimate: the counts are a lower bound).
ALTER TABLE {database}.usage_events
    ADD COLUMN IF NOT EXISTS usage_source LowCardinality(String) DEFAULT 'reported' AFTER region;
