-- The guard's audit trail: one row per guard decision that found something or acted (and one per
-- request the gateway let through unchecked because its route fails open). Append-only: rows are
-- never updated or deleted (a trigger refuses it, also for the table's owner). Never holds a
-- checked value, a pseudonym or a hash of either: entity types, counts and actions only.
CREATE TABLE IF NOT EXISTS audit_events (
    event_id            TEXT        PRIMARY KEY,          -- <request_id>:<direction>:<sequence>
    occurred_at         TIMESTAMPTZ NOT NULL,             -- when the guard decided
    recorded_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    request_id          TEXT        NOT NULL,
    app                 TEXT        NOT NULL,
    team                TEXT        NOT NULL,
    route               TEXT        NOT NULL,
    direction           TEXT        NOT NULL CHECK (direction IN ('prompt', 'answer')),
    sequence            INTEGER     NOT NULL,
    decision            TEXT        NOT NULL,             -- allow | transform | block | unchecked
    -- Findings, index-aligned: kind (entity | injection | content_filter), type, count, action.
    finding_kinds       TEXT[]      NOT NULL,
    entity_types        TEXT[]      NOT NULL,
    entity_counts       INTEGER[]   NOT NULL,
    actions             TEXT[]      NOT NULL,
    policy_version      TEXT        NOT NULL,
    detector_version    TEXT        NOT NULL,
    injection_score     REAL        NOT NULL,
    injection_decision  TEXT        NOT NULL,             -- none | flag | block
    content_topics      TEXT[]      NOT NULL,
    trace_id            TEXT        NOT NULL,
    source              TEXT        NOT NULL              -- guard | gateway
);

CREATE INDEX IF NOT EXISTS audit_events_app_time ON audit_events (app, occurred_at);
CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events (request_id);

CREATE OR REPLACE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
