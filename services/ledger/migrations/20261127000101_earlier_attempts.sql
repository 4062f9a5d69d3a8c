-- Re-pricing prices every attempt that consumed tokens, as recording does: a row keeps the usage of
-- the attempts before the serving one that consumed tokens (a stream cut short, then a retry or
-- fallback). Their cost was always part of cost_usd_nanos; only their tokens were not kept.
--
-- NULL: a single attempt, or a row recorded before this column existed. A row with attempts > 1
-- and NULL here has an unknown earlier-attempt usage: re-pricing leaves it as recorded and counts
-- it in reprice_audits.rows_skipped. Rows recorded from now on with attempts > 1 always have an
-- array (empty when no earlier attempt consumed tokens).
--
-- A nullable column without a default: no rewrite of any partition. ALTER TABLE on the partitioned
-- table adds it to every partition (the default one and the monthly ones), at the end, so
-- ledger_ensure_usage_partition's `CREATE TABLE .. (LIKE usage_records ..)` and its
-- `INSERT .. SELECT *` from the default partition keep matching column orders.
ALTER TABLE usage_records ADD COLUMN earlier_attempts JSONB;

COMMENT ON COLUMN usage_records.earlier_attempts IS
    'earlier attempts that consumed tokens: [{provider, model, prompt_tokens, cached_prompt_tokens, '
    'cache_write_tokens, completion_tokens, reasoning_tokens}], each priced at its own price and '
    'included in cost_usd_nanos; NULL: a single attempt, or (attempts > 1) recorded before this column existed: unknown';

-- Rows a re-pricing left as recorded because their earlier attempts' usage is unknown.
ALTER TABLE reprice_audits ADD COLUMN rows_skipped BIGINT NOT NULL DEFAULT 0;

-- BI: the same view with the earlier attempts at the end (a view may only gain columns at its end).
CREATE OR REPLACE VIEW v_usage AS
SELECT request_id, time, app, team, key_id, requested_model AS route, provider, model, attempts,
    prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_tokens, reasoning_tokens,
    cost_usd_nanos, cost_usd_nanos::numeric / 1000000000 AS cost_usd,
    saved_usd_nanos, saved_usd_nanos::numeric / 1000000000 AS saved_usd,
    cost_usd_nanos IS NULL AS unpriced, cache, status, error_code, streamed, latency_ms, trace_id, tags,
    recorded_at, earlier_attempts
FROM usage_records;
