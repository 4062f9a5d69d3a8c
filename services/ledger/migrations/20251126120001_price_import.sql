-- Prices: a source (configured prices override imported ones), every token class, one large-prompt
-- tier, and LiteLLM's metadata. Rows are still never updated: a changed price is a new version.
ALTER TABLE prices ADD COLUMN source TEXT NOT NULL DEFAULT 'config'
    CHECK (source IN ('config', 'litellm'));
ALTER TABLE prices DROP CONSTRAINT prices_pkey;
ALTER TABLE prices ADD PRIMARY KEY (source, provider, model, effective_from);

-- Per-token-class rates, integer nano-USD per million tokens.
ALTER TABLE prices
    ADD COLUMN cache_write_nanos_per_mtok BIGINT CHECK (cache_write_nanos_per_mtok >= 0),  -- NULL: input rate
    ADD COLUMN reasoning_nanos_per_mtok   BIGINT CHECK (reasoning_nanos_per_mtok >= 0),    -- NULL: output rate
    -- When prompt_tokens > tier_above_prompt_tokens the whole request takes the tier_* rates
    -- (a NULL tier rate: that class's base rate).
    ADD COLUMN tier_above_prompt_tokens        BIGINT CHECK (tier_above_prompt_tokens >= 0),
    ADD COLUMN tier_input_nanos_per_mtok       BIGINT CHECK (tier_input_nanos_per_mtok >= 0),
    ADD COLUMN tier_cached_input_nanos_per_mtok BIGINT CHECK (tier_cached_input_nanos_per_mtok >= 0),
    ADD COLUMN tier_cache_write_nanos_per_mtok BIGINT CHECK (tier_cache_write_nanos_per_mtok >= 0),
    ADD COLUMN tier_output_nanos_per_mtok      BIGINT CHECK (tier_output_nanos_per_mtok >= 0),
    ADD COLUMN tier_reasoning_nanos_per_mtok   BIGINT CHECK (tier_reasoning_nanos_per_mtok >= 0),
    -- Imported prices: LiteLLM's key, provider, mode and context window, and the import that added it.
    ADD COLUMN litellm_key      TEXT,
    ADD COLUMN litellm_provider TEXT,
    ADD COLUMN mode             TEXT,
    ADD COLUMN max_input_tokens BIGINT,
    ADD COLUMN import_id        BIGINT;

-- One row per `switchboard prices import` (dry runs are not recorded).
CREATE TABLE price_imports (
    id              BIGSERIAL   PRIMARY KEY,
    source          TEXT        NOT NULL,
    file            TEXT        NOT NULL,
    file_sha256     TEXT        NOT NULL,
    effective_from  DATE        NOT NULL,
    imported_by     TEXT        NOT NULL,   -- the operator (--actor, else $USER)
    db_user         TEXT        NOT NULL DEFAULT current_user,
    imported_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    entries         INTEGER     NOT NULL,
    inserted        INTEGER     NOT NULL,
    unchanged       INTEGER     NOT NULL,
    skipped         INTEGER     NOT NULL,
    invalid         INTEGER     NOT NULL,
    report          JSONB       NOT NULL    -- invalid entries and rounding notes, with JSON paths
);

-- Every token class of a usage row (prompt_tokens includes cache reads and writes; completion_tokens
-- includes reasoning), so that a row can be re-priced.
ALTER TABLE usage_records
    ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens   BIGINT NOT NULL DEFAULT 0;

-- `switchboard prices reprice`: who re-priced which period with what outcome ...
CREATE TABLE reprice_audits (
    id              BIGSERIAL   PRIMARY KEY,
    requested_by    TEXT        NOT NULL,
    db_user         TEXT        NOT NULL DEFAULT current_user,
    requested_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    since           TIMESTAMPTZ NOT NULL,
    until           TIMESTAMPTZ NOT NULL,
    model           TEXT,                   -- NULL: every model
    reason          TEXT        NOT NULL DEFAULT '',
    rows_examined   BIGINT      NOT NULL,
    rows_changed    BIGINT      NOT NULL,
    old_total_usd_nanos NUMERIC NOT NULL,   -- priced rows only
    new_total_usd_nanos NUMERIC NOT NULL,
    old_unpriced    BIGINT      NOT NULL,
    new_unpriced    BIGINT      NOT NULL
);

-- ... and every row it changed, old and new cost (NULL = unpriced).
CREATE TABLE reprice_changes (
    audit_id        BIGINT      NOT NULL REFERENCES reprice_audits (id),
    request_id      UUID        NOT NULL,
    old_cost_usd_nanos BIGINT,
    new_cost_usd_nanos BIGINT,
    PRIMARY KEY (audit_id, request_id)
);

-- Unpriced usage by model over time, without scanning priced rows.
CREATE INDEX usage_records_unpriced ON usage_records (time) WHERE cost_usd_nanos IS NULL;
