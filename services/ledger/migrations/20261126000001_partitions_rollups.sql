-- Storage for years of traffic: usage rows partitioned by month on `time`, hourly and daily
-- rollups maintained as rows arrive, partition maintenance functions, and views for BI tools.
-- Existing rows are moved into the partitioned table and rolled up.

ALTER TABLE usage_records RENAME TO usage_records_unpartitioned;
ALTER TABLE usage_records_unpartitioned RENAME CONSTRAINT usage_records_pkey TO usage_records_unpartitioned_pkey;
ALTER INDEX usage_records_app_time RENAME TO usage_records_unpartitioned_app_time;
ALTER INDEX usage_records_time RENAME TO usage_records_unpartitioned_time;
ALTER INDEX usage_records_unpriced RENAME TO usage_records_unpartitioned_unpriced;

-- Append-only, one row per request. A primary key of a partitioned table must contain the
-- partition key: (request_id, time) is unique because the event's time is fixed per request id
-- (set once by the gateway; replays and redeliveries carry the same bytes). The ledger's insert
-- also refuses a request id already recorded within 7 days of the new row's time (see repo.rs).
CREATE TABLE usage_records (
    request_id            UUID        NOT NULL,
    time                  TIMESTAMPTZ NOT NULL,
    app                   TEXT        NOT NULL,
    team                  TEXT        NOT NULL,
    key_id                TEXT        NOT NULL,
    requested_model       TEXT        NOT NULL,
    provider              TEXT        NOT NULL,
    model                 TEXT        NOT NULL,
    attempts              INTEGER     NOT NULL,
    prompt_tokens         BIGINT      NOT NULL,
    completion_tokens     BIGINT      NOT NULL,
    cached_prompt_tokens  BIGINT      NOT NULL,
    cost_usd_nanos        BIGINT,              -- NULL: no known price for the model (unpriced)
    saved_usd_nanos       BIGINT      NOT NULL DEFAULT 0,
    cache                 TEXT        NOT NULL CHECK (cache IN ('unspecified', 'miss', 'hit', 'bypass')),
    status                TEXT        NOT NULL CHECK (status IN ('unspecified', 'ok', 'error', 'partial')),
    error_code            TEXT        NOT NULL DEFAULT '',
    streamed              BOOLEAN     NOT NULL,
    latency_ms            BIGINT      NOT NULL,
    trace_id              TEXT        NOT NULL DEFAULT '',
    tags                  JSONB       NOT NULL DEFAULT '{}'::jsonb,
    recorded_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    cache_write_tokens    BIGINT      NOT NULL DEFAULT 0,
    reasoning_tokens      BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (request_id, time)
) PARTITION BY RANGE (time);

-- Rows outside every monthly partition (far past or future) land here; creating the month's
-- partition later moves them (ledger_ensure_usage_partition).
CREATE TABLE usage_records_default PARTITION OF usage_records DEFAULT;

CREATE INDEX usage_records_time ON usage_records (time, request_id);
CREATE INDEX usage_records_app_time ON usage_records (app, time);
CREATE INDEX usage_records_trace ON usage_records (trace_id) WHERE trace_id <> '';
CREATE INDEX usage_records_unpriced ON usage_records (time) WHERE cost_usd_nanos IS NULL;

-- Rollups: one row per (bucket, app, team, key, route, provider, model), updated in the same
-- transaction as the rows they count, from the rows actually inserted. Retention never drops them.
CREATE TABLE usage_rollup_hourly (
    bucket                TIMESTAMPTZ NOT NULL,   -- start of the UTC hour
    app                   TEXT        NOT NULL,
    team                  TEXT        NOT NULL,
    key_id                TEXT        NOT NULL,
    route                 TEXT        NOT NULL,   -- usage_records.requested_model
    provider              TEXT        NOT NULL,
    model                 TEXT        NOT NULL,
    requests              BIGINT      NOT NULL,
    prompt_tokens         BIGINT      NOT NULL,
    completion_tokens     BIGINT      NOT NULL,
    cached_prompt_tokens  BIGINT      NOT NULL,
    cache_write_tokens    BIGINT      NOT NULL,
    reasoning_tokens      BIGINT      NOT NULL,
    cost_usd_nanos        BIGINT      NOT NULL,   -- priced rows only
    unpriced_requests     BIGINT      NOT NULL,
    saved_usd_nanos       BIGINT      NOT NULL,
    error_requests        BIGINT      NOT NULL,
    cache_hits            BIGINT      NOT NULL,
    PRIMARY KEY (bucket, app, team, key_id, route, provider, model)
);

CREATE TABLE usage_rollup_daily (LIKE usage_rollup_hourly INCLUDING ALL);
COMMENT ON COLUMN usage_rollup_daily.bucket IS 'start of the UTC day';

-- The monthly partition holding `month` (any day of it): usage_records_pYYYY_MM for
-- [first day, first day of the next month) UTC. Rows of that month waiting in the default
-- partition are moved into it. Idempotent; returns whether it created the partition.
CREATE FUNCTION ledger_ensure_usage_partition(p_month DATE) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    v_first DATE := date_trunc('month', p_month)::date;
    v_lo TIMESTAMPTZ := (v_first::timestamp AT TIME ZONE 'UTC');
    v_hi TIMESTAMPTZ := ((v_first + INTERVAL '1 month')::timestamp AT TIME ZONE 'UTC');
    v_part TEXT := format('usage_records_p%s', to_char(v_first, 'YYYY_MM'));
BEGIN
    IF to_regclass(v_part) IS NOT NULL THEN
        RETURN FALSE;
    END IF;
    -- One creator at a time (several ledger replicas run the maintenance task).
    PERFORM pg_advisory_xact_lock(hashtext('switchboard.ledger.partitions'));
    IF to_regclass(v_part) IS NOT NULL THEN
        RETURN FALSE;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE usage_records INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', v_part);
    EXECUTE format(
        'WITH moved AS (DELETE FROM usage_records_default WHERE time >= %L AND time < %L RETURNING *) '
        'INSERT INTO %I SELECT * FROM moved', v_lo, v_hi, v_part);
    EXECUTE format('ALTER TABLE usage_records ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        v_part, v_lo, v_hi);
    RETURN TRUE;
END
$$;

-- Retention: drops every monthly partition that ends on or before `cutoff` (first day of a
-- month) and deletes older rows from the default partition. Rollups are kept. Returns the
-- dropped partitions' names.
CREATE FUNCTION ledger_drop_usage_partitions_before(p_cutoff DATE) RETURNS SETOF TEXT
LANGUAGE plpgsql AS $$
DECLARE
    v_part TEXT;
    v_month DATE;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('switchboard.ledger.partitions'));
    FOR v_part IN
        SELECT c.relname::text FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_records'::regclass AND c.relname ~ '^usage_records_p[0-9]{4}_[0-9]{2}$'
        ORDER BY c.relname
    LOOP
        v_month := to_date(substring(v_part FROM 16), 'YYYY_MM');
        IF v_month + INTERVAL '1 month' <= p_cutoff THEN
            EXECUTE format('DROP TABLE %I', v_part);
            RETURN NEXT v_part;
        END IF;
    END LOOP;
    DELETE FROM usage_records_default WHERE time < (p_cutoff::timestamp AT TIME ZONE 'UTC');
END
$$;

-- Partitions for the months already recorded, and the current one.
SELECT ledger_ensure_usage_partition(m)
FROM (
    SELECT DISTINCT (date_trunc('month', time AT TIME ZONE 'UTC'))::date AS m FROM usage_records_unpartitioned
    UNION SELECT (date_trunc('month', now() AT TIME ZONE 'UTC'))::date
) months;

INSERT INTO usage_records (request_id, time, app, team, key_id, requested_model, provider, model, attempts,
    prompt_tokens, completion_tokens, cached_prompt_tokens, cost_usd_nanos, saved_usd_nanos, cache, status,
    error_code, streamed, latency_ms, trace_id, tags, recorded_at, cache_write_tokens, reasoning_tokens)
SELECT request_id, time, app, team, key_id, requested_model, provider, model, attempts,
    prompt_tokens, completion_tokens, cached_prompt_tokens, cost_usd_nanos, saved_usd_nanos, cache, status,
    error_code, streamed, latency_ms, trace_id, tags, recorded_at, cache_write_tokens, reasoning_tokens
FROM usage_records_unpartitioned;

INSERT INTO usage_rollup_hourly
SELECT date_trunc('hour', time, 'UTC'), app, team, key_id, requested_model, provider, model,
    COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_prompt_tokens), SUM(cache_write_tokens),
    SUM(reasoning_tokens), COALESCE(SUM(cost_usd_nanos), 0), COUNT(*) FILTER (WHERE cost_usd_nanos IS NULL),
    SUM(saved_usd_nanos), COUNT(*) FILTER (WHERE status = 'error'), COUNT(*) FILTER (WHERE cache = 'hit')
FROM usage_records GROUP BY 1, 2, 3, 4, 5, 6, 7;

INSERT INTO usage_rollup_daily
SELECT date_trunc('day', time, 'UTC'), app, team, key_id, requested_model, provider, model,
    COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_prompt_tokens), SUM(cache_write_tokens),
    SUM(reasoning_tokens), COALESCE(SUM(cost_usd_nanos), 0), COUNT(*) FILTER (WHERE cost_usd_nanos IS NULL),
    SUM(saved_usd_nanos), COUNT(*) FILTER (WHERE status = 'error'), COUNT(*) FILTER (WHERE cache = 'hit')
FROM usage_records GROUP BY 1, 2, 3, 4, 5, 6, 7;

DROP TABLE usage_records_unpartitioned;

-- Views for BI tools. Money as exact NUMERIC US dollars (nanos / 10^9), never float.

-- Raw rows (within retention).
CREATE VIEW v_usage AS
SELECT request_id, time, app, team, key_id, requested_model AS route, provider, model, attempts,
    prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_tokens, reasoning_tokens,
    cost_usd_nanos, cost_usd_nanos::numeric / 1000000000 AS cost_usd,
    saved_usd_nanos, saved_usd_nanos::numeric / 1000000000 AS saved_usd,
    cost_usd_nanos IS NULL AS unpriced, cache, status, error_code, streamed, latency_ms, trace_id, tags,
    recorded_at
FROM usage_records;

-- Hourly and daily spend per (app, team, key, route, provider, model), kept beyond retention.
CREATE VIEW v_spend_hourly AS
SELECT bucket AS hour, app, team, key_id, route, provider, model, requests, prompt_tokens, completion_tokens,
    cached_prompt_tokens, cache_write_tokens, reasoning_tokens, cost_usd_nanos,
    cost_usd_nanos::numeric / 1000000000 AS cost_usd, unpriced_requests,
    saved_usd_nanos, saved_usd_nanos::numeric / 1000000000 AS saved_usd, error_requests, cache_hits
FROM usage_rollup_hourly;

CREATE VIEW v_spend_daily AS
SELECT (bucket AT TIME ZONE 'UTC')::date AS day, app, team, key_id, route, provider, model, requests,
    prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_tokens, reasoning_tokens, cost_usd_nanos,
    cost_usd_nanos::numeric / 1000000000 AS cost_usd, unpriced_requests,
    saved_usd_nanos, saved_usd_nanos::numeric / 1000000000 AS saved_usd, error_requests, cache_hits
FROM usage_rollup_daily;

-- Requests recorded with tokens but no known price (cost NULL), within retention.
CREATE VIEW v_unpriced AS
SELECT request_id, time, app, team, key_id, requested_model AS route, provider, model,
    prompt_tokens, completion_tokens, cached_prompt_tokens, cache_write_tokens, reasoning_tokens, trace_id
FROM usage_records WHERE cost_usd_nanos IS NULL;
