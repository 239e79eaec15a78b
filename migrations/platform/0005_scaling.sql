-- Several workers per consumer group: lifecycle steps under way, lifecycle order, workers.
ALTER TABLE tenants
    ADD COLUMN IF NOT EXISTS lifecycle_pending VARCHAR(80) NULL
        COMMENT 'terminate:{event id} or restore:{event id} while that step is under way; projectors hold the tenant''s events meanwhile',
    ADD COLUMN IF NOT EXISTS lifecycle_at DATETIME(3) NULL
        COMMENT 'occurred_at of the latest termination or restore applied; older ones are ignored';

-- Offsets kept per (brand, supplier) pair need longer projection names than 64 characters.
ALTER TABLE projection_offsets MODIFY projection VARCHAR(128) NOT NULL;

-- What each running `tenancy run` reports (assignment, held events, outages), for
-- `tenancy status`. Rewritten every few seconds by its worker; a row whose heartbeat stopped is a
-- worker that is gone.
CREATE TABLE IF NOT EXISTS workers (
    worker_id CHAR(36) NOT NULL PRIMARY KEY,
    host VARCHAR(255) NOT NULL,
    pid INT NOT NULL,
    http_addr VARCHAR(64) NULL,
    started_at DATETIME(3) NOT NULL,
    heartbeat_at DATETIME(3) NOT NULL,
    report JSON NOT NULL,
    KEY ix_workers_heartbeat (heartbeat_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
