-- Several workers per consumer group: lifecycle steps under way, lifecycle order, workers.
-- Portable and safe to run again (see 0004).
SET @scaling = (SELECT IF(COUNT(*) = 0,
    'ALTER TABLE tenants ADD COLUMN lifecycle_pending VARCHAR(80) NULL COMMENT ''terminate:{event id} or restore:{event id} while that step is under way; projectors hold the events of the tenant meanwhile'', ADD COLUMN lifecycle_at DATETIME(3) NULL COMMENT ''when the latest termination or restore applied is placed; older ones are ignored''',
    'DO 0')
    FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tenants' AND COLUMN_NAME = 'lifecycle_pending');
PREPARE scaling FROM @scaling;
EXECUTE scaling;
DEALLOCATE PREPARE scaling;

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
