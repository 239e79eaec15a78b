-- Termination, restore and purge (organisation lifecycle).
-- Written for MySQL 8.4 and MariaDB 10.11 alike (no MariaDB-only column clause), and safe to run
-- again after a crash half-way: the ALTER runs only if its first column is missing. (Databases
-- migrated by this file's first, MariaDB-only form have its checksum updated at start-up: see
-- `tenancy::migrations::REWRITTEN`.)
SET @lifecycle = (SELECT IF(COUNT(*) = 0,
    'ALTER TABLE tenants ADD COLUMN archive_database VARCHAR(64) NULL COMMENT ''where the tables wait while archived'', ADD COLUMN terminated_by_event CHAR(36) NULL COMMENT ''event_id of the OrganisationTerminated of the current archive'', ADD COLUMN termination_reason TEXT NULL, ADD COLUMN restored_at DATETIME(3) NULL, ADD COLUMN purged_at DATETIME(3) NULL',
    'DO 0')
    FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tenants' AND COLUMN_NAME = 'archive_database');
PREPARE lifecycle FROM @lifecycle;
EXECUTE lifecycle;
DEALLOCATE PREPARE lifecycle;

-- Lifecycle events already applied, so the purge of an archive can tell "not reached yet"
-- (wait: a replay is catching up) from "superseded by a restore" (skip).
CREATE TABLE IF NOT EXISTS lifecycle_log (
    event_id CHAR(36) NOT NULL PRIMARY KEY,
    organisation_id CHAR(36) NOT NULL,
    kind VARCHAR(32) NOT NULL,
    outcome VARCHAR(32) NOT NULL,
    occurred_at DATETIME(3) NOT NULL,
    KEY ix_lifecycle_log_organisation (organisation_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
