-- Prices, versioned by effective date. Rows are never updated: a new rate is a new effective_from.
-- Rates are integer nano-USD (1e-9 USD) per million tokens.
CREATE TABLE prices (
    provider        TEXT        NOT NULL,  -- a provider name, or '*' for any provider
    model           TEXT        NOT NULL,  -- provider model name as served (RouteInfo.model)
    effective_from  DATE        NOT NULL,
    input_nanos_per_mtok        BIGINT NOT NULL CHECK (input_nanos_per_mtok >= 0),
    cached_input_nanos_per_mtok BIGINT NOT NULL CHECK (cached_input_nanos_per_mtok >= 0),
    output_nanos_per_mtok       BIGINT NOT NULL CHECK (output_nanos_per_mtok >= 0),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model, effective_from)
);

-- One row per request, keyed by Switchboard's request id.
CREATE TABLE usage_records (
    request_id            UUID        PRIMARY KEY,
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
    recorded_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX usage_records_app_time ON usage_records (app, time);
CREATE INDEX usage_records_time ON usage_records (time);
