-- Leasehold's tables in PostgreSQL, schema version 1. `leasehold_guard::pg::migrate`
-- runs this file in one transaction, under an advisory lock, so processes
-- starting together do not race; every statement is idempotent.

-- One high-water mark per resource: the highest fencing token accepted.
-- Tokens are u64 on the wire; a bigint holds 0..=i64::MAX of them, and the
-- guard refuses larger ones before they reach the database.
CREATE TABLE IF NOT EXISTS leasehold_fences (
    resource text PRIMARY KEY
        CHECK (octet_length(resource) BETWEEN 1 AND 512),
    token bigint NOT NULL CHECK (token >= 0)
);

-- Idempotency keys: key -> started or completed, when, the request's
-- fingerprint and the recorded outcome (empty while started).
CREATE TABLE IF NOT EXISTS leasehold_idempotency (
    key text PRIMARY KEY CHECK (octet_length(key) BETWEEN 1 AND 255),
    completed boolean NOT NULL,
    at_ms bigint NOT NULL,
    fingerprint bytea NOT NULL,
    outcome bytea NOT NULL DEFAULT ''
);

-- collect_expired deletes by age.
CREATE INDEX IF NOT EXISTS leasehold_idempotency_at_ms ON leasehold_idempotency (at_ms);
