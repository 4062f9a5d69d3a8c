-- Budgets (ADR 007): spend limits per key, app, team or the organisation, enforced through leases.
-- Money is integer nano-USD.
CREATE TABLE budgets (
    id                    TEXT        PRIMARY KEY,
    scope_kind            TEXT        NOT NULL CHECK (scope_kind IN ('key', 'app', 'team', 'org')),
    scope_id              TEXT        NOT NULL,            -- '' for the organisation
    period                TEXT        NOT NULL CHECK (period IN ('day', 'week', 'month', 'lifetime')),
    time_zone             TEXT        NOT NULL,            -- IANA name of the calendar periods
    limit_usd_nanos       BIGINT      NOT NULL CHECK (limit_usd_nanos >= 0),
    hard                  BOOLEAN     NOT NULL,
    alert_thresholds_pct  INTEGER[]   NOT NULL DEFAULT '{}',
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX budgets_scope ON budgets (scope_kind, scope_id);

-- A slice of a budget's period granted to one gateway replica. While open (closed_at NULL) the
-- whole grant counts against the budget; once closed (released, or reclaimed after expiry) only
-- what the gateway reported spent does. So Σ open grants + Σ closed spend ≤ limit at all times.
CREATE TABLE budget_leases (
    id                 UUID        PRIMARY KEY,
    budget_id          TEXT        NOT NULL REFERENCES budgets (id) ON DELETE CASCADE,
    period_start       TIMESTAMPTZ NOT NULL,                -- '-infinity' for lifetime budgets
    holder             TEXT        NOT NULL,
    granted_usd_nanos  BIGINT      NOT NULL CHECK (granted_usd_nanos >= 0),
    spent_usd_nanos    BIGINT      NOT NULL DEFAULT 0 CHECK (spent_usd_nanos >= 0),
    expires_at         TIMESTAMPTZ NOT NULL,
    closed_at          TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX budget_leases_period ON budget_leases (budget_id, period_start);
CREATE INDEX budget_leases_open ON budget_leases (budget_id, expires_at) WHERE closed_at IS NULL;

-- Soft (and hard) budget alerts already published: once per threshold per period.
CREATE TABLE budget_alerts_sent (
    budget_id      TEXT        NOT NULL REFERENCES budgets (id) ON DELETE CASCADE,
    period_start   TIMESTAMPTZ NOT NULL,
    threshold_pct  INTEGER     NOT NULL,
    spent_usd_nanos BIGINT     NOT NULL,
    sent_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (budget_id, period_start, threshold_pct)
);

-- Shared per-minute rate-limit windows: what has been granted to gateways in each minute.
CREATE TABLE rate_windows (
    scope            TEXT        NOT NULL,
    window_start     TIMESTAMPTZ NOT NULL,
    granted_requests BIGINT      NOT NULL DEFAULT 0,
    granted_tokens   BIGINT      NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, window_start)
);
